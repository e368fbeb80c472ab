"""Reading an adapter's weights file: safetensors, or a pickled ``.bin`` with ``weights_only=True``.

Whatever the file holds, the result is a dict of names to dense floating-point tensors or one
:class:`LataError` line naming the file: a safetensors header is checked in Python before the
Rust reader sees it, so a malformed file is never a traceback (nor a Rust panic).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .errors import LataError, first_line, shorten
from .lowrank import serial

__all__ = [
    "FLOAT_DTYPES", "check_factor_values", "check_floating", "factor_norms", "read_pickle", "read_safetensors",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ITEM_SIZES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}  # the safetensors names of FLOAT_DTYPES
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
_FLOAT32_MAX = torch.finfo(torch.float32).max


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` after :func:`check_safetensors_header`; any failure is one line."""
    try:
        check_safetensors_header(path)
        return load_file(path)
    except (KeyboardInterrupt, SystemExit, LataError):
        raise
    except BaseException as exc:  # SafetensorError, OSError, and pyo3's PanicException (a BaseException)
        raise LataError(f"{path}: corrupt or truncated safetensors file ({first_line(exc)})") from None


def check_safetensors_header(path: Path) -> None:
    """Check the header (length, JSON, dtypes, shapes, offsets) of a safetensors file.

    Layout: 8 bytes little-endian header length N, N bytes of JSON
    ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then data.
    A dtype other than F16, BF16, F32, F64 is refused: LoRA factors are floating point.
    """

    def corrupt(problem: str) -> LataError:
        return LataError(f"{path}: corrupt or truncated safetensors file ({problem})")

    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little")
        if len(prefix) < 8 or length > min(size - 8, _MAX_HEADER_BYTES):
            raise corrupt(f"header length {length} in a file of {size} bytes")
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, ints past the digit limit, deep nesting
        raise corrupt(f"header is not valid JSON: {first_line(exc)}") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    data_bytes = size - 8 - length
    for key, entry in header.items():
        if key != "__metadata__":
            _check_entry(path, key, entry, data_bytes, corrupt)


def _check_entry(path: Path, key: str, entry: Any, data_bytes: int, corrupt: Callable[[str], LataError]) -> None:
    name = first_line(key, 100)
    if not isinstance(entry, dict):
        raise corrupt(f"entry {name} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _ITEM_SIZES:
        raise LataError(
            f"{path}: tensor {name} has dtype {shorten(dtype)}; LoRA factors must be floating point "
            "(F16, BF16, F32 or F64)"
        )
    if not (_naturals(shape) and _naturals(offsets) and len(offsets) == 2):
        raise corrupt(f"tensor {name} has shape {shorten(shape)} and data_offsets {shorten(offsets)}")
    begin, end = offsets
    if not begin <= end <= data_bytes or end - begin != math.prod(shape) * _ITEM_SIZES[dtype]:
        raise corrupt(
            f"tensor {name}: data_offsets {shorten(offsets)} don't fit shape {shorten(shape)} "
            f"in {data_bytes} data bytes"
        )


def _naturals(value: Any) -> bool:
    """A list of non-negative ints (not bools)."""
    return isinstance(value, list) and all(
        isinstance(item, int) and not isinstance(item, bool) and item >= 0 for item in value
    )


def read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)``, which must give a dict of tensor names to tensors."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        lines = str(exc).splitlines() or [""]
        reason = next((line.strip() for line in lines if "Unsupported global" in line), lines[0])
        raise LataError(f"{path}: could not be read with weights_only=True ({first_line(reason)})") from None
    if not isinstance(loaded, dict):
        raise LataError(f"{path}: holds a {type(loaded).__name__}; expected a dict of tensor names to tensors")
    for key, value in loaded.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise LataError(
                f"{path}: entry {shorten(key)} is of type {type(value).__name__}; "
                "expected a dict of tensor names to tensors"
            )
    return {key: value.detach() for key, value in loaded.items()}  # a saved nn.Parameter keeps requires_grad


def check_floating(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Every tensor dense (strided) with a floating-point dtype of :data:`FLOAT_DTYPES`."""
    for key, tensor in tensors.items():
        if tensor.layout != torch.strided or tensor.dtype not in FLOAT_DTYPES:
            kind = str(tensor.dtype if tensor.layout == torch.strided else tensor.layout).removeprefix("torch.")
            raise LataError(
                f"{path}: tensor {first_line(key, 100)} is {kind}; LoRA factors must be dense floating point "
                "(float16, bfloat16, float32 or float64)"
            )


def factor_norms(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """Frobenius norm of every tensor (float32 maths, float64 for float64 tensors), one pass, one sync.

    A NaN or Inf anywhere makes its tensor's norm non-finite, so this is also the finiteness check.
    """
    with serial():  # two threads make each small reduction ~200x slower here (8 ms vs 0.04 ms on 2 cores)
        norms = [
            torch.linalg.vector_norm(t, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32).double()
            for t in tensors.values()
        ]
    return dict(zip(tensors, torch.stack(norms).tolist(), strict=True)) if norms else {}


def check_factor_values(
    name: str, factors: tuple[torch.Tensor, torch.Tensor], norms: tuple[float, float], scale: float, source: Path
) -> None:
    """Refuse NaN / Inf in module ``name``'s ``(A, B)``, and a scaled delta that overflows float32.

    ``norms`` are the factors' :func:`factor_norms`; ``|scale| |B| max(|A|, 1)`` bounds both the
    scaled factor ``scale * B`` and the delta ``scale * B @ A`` (a wild ``lora_alpha`` overflows it).
    """
    (A, B), (norm_A, norm_B) = factors, norms
    if not (math.isfinite(norm_A) and math.isfinite(norm_B)):
        if bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all()):
            raise LataError(f"{source}: module {name} has weights too large to combine (their squared norm overflows)")
        raise LataError(f"{source}: module {name} has NaN or Inf weights")
    if abs(scale) * norm_B * max(norm_A, 1.0) > _FLOAT32_MAX:
        raise LataError(
            f"{source}: module {name}: its scale (lora_alpha / r = {scale:.3g}) times its weights "
            "overflows float32; is lora_alpha right?"
        )
