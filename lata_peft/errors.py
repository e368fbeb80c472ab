"""The one error class users see. The CLI prints its message on one line and exits 2."""

from __future__ import annotations

from typing import Any


class LataError(Exception):
    """Bad input or a refused operation; the message names the file and the problem."""


def shorten(value: Any, limit: int = 100) -> str:
    """``repr(value)`` cut to ``limit`` characters (an ellipsis marks the cut), for error messages.

    >>> shorten("x" * 500, limit=8)
    "'xxxxxx…"
    """
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # ints past Python's digit limit, very deep nesting
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def first_line(value: Any, limit: int = 200) -> str:
    """``str(value)``'s first line cut to ``limit`` characters (an ellipsis marks any cut): exception
    reasons and module or tensor names in error messages."""
    lines = str(value).strip().splitlines() or [""]
    text = lines[0] or type(value).__name__
    cut = len(lines) > 1 or len(text) > limit
    return text[: limit - 1] + "…" if cut else text
