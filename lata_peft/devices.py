"""Where computation runs: the one cuda-or-cpu choice, and bf16 autocast."""

from __future__ import annotations

import torch

__all__ = ["autocast", "default_device"]


def default_device() -> torch.device:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: str | torch.device, mode: str | None) -> torch.autocast:
    """bfloat16 matmuls (weights stay float32) when ``mode`` is ``"bf16"``; a no-op otherwise."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=mode == "bf16")
