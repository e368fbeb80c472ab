"""Where computation runs: ``--device cpu|cuda|auto``, and bf16 autocast.

The CPU is the default and the tested path. ``cuda`` runs each module's maths (merges, SVDs,
truncation, the fold's ``W + s B A`` and its 4-bit quantisation) on the GPU, one module at a time;
inputs are read and outputs written from the CPU, so device memory holds one module's working set.
"""

from __future__ import annotations

import torch

from .errors import LataError

__all__ = ["DEVICES", "autocast", "default_device", "resolve_device"]

DEVICES = ("cpu", "cuda", "auto")


def default_device() -> torch.device:
    """``cuda`` when a GPU is visible, else ``cpu`` (model evaluation's default)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (refused in one line when no GPU is visible), or ``auto`` (``cuda`` if visible)."""
    if name not in DEVICES:
        raise LataError(f"--device {name!r}: expected one of {', '.join(DEVICES)}")
    if name == "auto":
        return default_device()
    if name == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise LataError(f"--device cuda: no CUDA GPU is visible (torch {torch.__version__}, {build}); "
                        "use --device cpu or auto")
    return torch.device(name)


def autocast(device: str | torch.device, mode: str | None) -> torch.autocast:
    """bfloat16 matmuls (weights stay float32) when ``mode`` is ``"bf16"``; a no-op otherwise."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=mode == "bf16")
