"""The one error class users see. The CLI prints its message on one line and exits 2."""

from __future__ import annotations


class LataError(Exception):
    """Bad input or a refused operation; the message names the file and the problem."""
