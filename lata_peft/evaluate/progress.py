"""Batching with progress for the evaluators (the protocol is :class:`lata_peft.progress.Progress`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

from ..progress import Progress

__all__ = ["Progress", "batches", "tracked"]

T = TypeVar("T")


def batches(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """``items`` in consecutive chunks of ``size`` (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    return [items[i:i + size] for i in range(0, len(items), size)]


def tracked(chunks: Sequence[T], progress: Progress | None, description: str) -> Iterable[T]:
    """Iterate ``chunks``, calling ``progress.start(len(chunks), description)`` first and
    ``progress.advance()`` after each one."""
    if progress is None:
        return chunks

    def run() -> Iterator[T]:
        progress.start(len(chunks), description)
        for chunk in chunks:
            yield chunk
            progress.advance()

    return run()
