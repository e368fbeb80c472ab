"""The floating-point dtypes users name on the command line, in recipes and in configs, and the finite check."""

from __future__ import annotations

import math

import torch

from .errors import LataError

__all__ = ["DTYPES", "all_finite", "parse_dtype"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str, flag: str = "--dtype") -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; an unknown name is a :class:`LataError` naming ``flag``."""
    if name not in DTYPES:
        raise LataError(f"{flag} {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in ``tensor``: its sum accumulated in float64 is finite exactly then (NaN and Inf
    propagate, ``inf - inf`` is NaN, and float64 can't overflow on sums of float32/16 values; float64
    tensors take ``isfinite``). One reduction, 10-20x faster than ``torch.isfinite(t).all()`` on bfloat16
    and float16 CPU tensors."""
    if not tensor.is_floating_point():
        return True
    if tensor.dtype == torch.float64:  # its sum could overflow; isfinite is fast on float64
        return bool(torch.isfinite(tensor).all())
    return math.isfinite(float(tensor.sum(dtype=torch.float64)))
