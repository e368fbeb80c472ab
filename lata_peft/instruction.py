"""The instruction vector as two full models: ``iota = theta_instruct - theta_base``, read per module.

For task adapters trained on an instruct model (the paper's other setting) there is no
instruction adapter; the instruction vector is the difference of the instruct and base
checkpoints. Only the modules the task adapters target are read, one at a time, from the
two models' safetensors; the task side stays factored:
``<s B A, D>_F = s * sum((B^T D) * A)`` costs O(out * in * r) and never forms ``B @ A``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import LataError
from .lowrank import LowRank
from .models import resolve_model

__all__ = ["DenseInstruction", "inner_dense"]


def inner_dense(x: LowRank, dense: torch.Tensor) -> float:
    """``<s B A, D>_F = s * sum((B^T D) * A)`` for a dense (out, in) ``D``."""
    B, A = x.B.double(), x.A.double()
    return float(x.scale * torch.sum((B.T @ dense.double()) * A))  # (r, in) * (r, in)


class DenseInstruction:
    """Reads ``W_instruct - W_base`` for one module at a time from two transformers model folders."""

    def __init__(self, base: str | Path, instruct: str | Path) -> None:
        self.base, self.instruct = resolve_model(base), resolve_model(instruct)
        self.name = f"{self.instruct.name}-minus-{self.base.name}"
        self._base_index = self._index(self.base)
        self._instruct_index = self._index(self.instruct)

    @staticmethod
    def _index(folder: Path) -> dict[str, Path]:
        index_file = folder / "model.safetensors.index.json"
        if index_file.is_file():
            weight_map = json.loads(index_file.read_text())["weight_map"]
            return {key: folder / name for key, name in weight_map.items()}
        path = folder / "model.safetensors"
        with safe_open(path, framework="pt") as handle:
            return dict.fromkeys(handle.keys(), path)

    def _read(self, index: dict[str, Path], key: str, folder: Path) -> torch.Tensor:
        if key not in index:
            raise LataError(f"{folder}: has no weight {key} that the task adapter targets")
        with safe_open(index[key], framework="pt") as handle:
            return handle.get_tensor(key).to(torch.float64)

    def delta(self, module: str, shape: tuple[int, int]) -> torch.Tensor:
        """Dense ``W_instruct - W_base`` of ``module`` in weight space, checked against ``shape``."""
        key = f"{module}.weight"
        delta = self._read(self._instruct_index, key, self.instruct) - self._read(self._base_index, key, self.base)
        if delta.shape[0] != shape[0] or delta.numel() != shape[0] * shape[1]:
            raise LataError(f"{self.instruct}: {key} has shape {tuple(delta.shape)}, the adapter's delta {shape}")
        return delta.reshape(shape)
