"""The floating-point dtypes users name on the command line, in recipes and in configs."""

from __future__ import annotations

import torch

from .errors import LataError

__all__ = ["DTYPES", "parse_dtype"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str, flag: str = "--dtype") -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; an unknown name is a :class:`LataError` naming ``flag``."""
    if name not in DTYPES:
        raise LataError(f"{flag} {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]
