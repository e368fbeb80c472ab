"""The progress protocol every long step reports to (the CLI passes a rich progress bar)."""

from __future__ import annotations

from typing import Protocol

__all__ = ["Progress"]


class Progress(Protocol):
    """Anything with ``start(total, description)`` and ``advance()``."""

    def start(self, total: int, description: str) -> None: ...

    def advance(self) -> None: ...
