"""The progress protocol every long step reports to (the CLI passes a rich progress bar)."""

from __future__ import annotations

from typing import Protocol

__all__ = ["Progress"]


class Progress(Protocol):
    """Anything with ``start(total, description, unit)`` and ``advance(amount)``; ``unit`` is ``""`` for
    counted items, or ``"bytes"`` (the fold counts the bytes of the base it has read, so its ETA holds
    when tensors differ in size)."""

    def start(self, total: int, description: str, unit: str = "") -> None: ...

    def advance(self, amount: int = 1) -> None: ...
