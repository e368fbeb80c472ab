"""The one error class users see. The CLI prints its message on one line and exits 2."""

from __future__ import annotations

import reprlib
from typing import Any

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 6, 6, 120, 120


class LataError(Exception):
    """Bad input or a refused operation; the message names the file and the problem."""


def shorten(value: Any, limit: int = 100) -> str:
    """``repr(value)`` cut to ``limit`` characters (an ellipsis marks the cut), for error messages.

    Bounded in time and memory whatever ``value`` is (``reprlib``: a YAML "billion laughs" of
    shared lists, ints past Python's digit limit, deep nesting).

    >>> shorten("x" * 500, limit=8)
    "'xxxxxx…"
    """
    try:
        text = _REPR.repr(value)
    except (ValueError, RecursionError):
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def first_line(value: Any, limit: int = 200) -> str:
    """``str(value)``'s first line cut to ``limit`` characters (an ellipsis marks any cut): exception
    reasons and module or tensor names in error messages."""
    lines = str(value).strip().splitlines() or [""]
    text = lines[0] or type(value).__name__
    cut = len(lines) > 1 or len(text) > limit
    return text[: limit - 1] + "…" if cut else text
