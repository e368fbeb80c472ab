"""Fold factored deltas into a base model's weights, full precision or 4-bit NF4, streamed.

The base's safetensors are read one tensor at a time and written in output shards, so
peak memory is one output shard plus one full-precision weight (never the whole
full-precision model). For each adapted weight ``W <- W + dW`` (``dW`` formed from its
factors for that one module, in fp32). With ``four_bit`` every weight that transformers
would quantise is quantised once with bitsandbytes NF4 (``quantize_4bit``) and stored
in transformers' pre-quantised layout (``weight``, ``weight.absmax``, ``weight.quant_map``,
``weight.quant_state.bitsandbytes__nf4``, ...), with ``quantization_config`` in
``config.json``, so ``AutoModelForCausalLM.from_pretrained(OUT)`` reloads ``Linear4bit``
modules. In a 4-bit base, a weight an adapter changes is dequantised once, changed and
quantised once; the others are copied bit for bit when they are already in the NF4 format
being written (block size, double quantisation, storage), else requantised once. This is
the only module that uses bitsandbytes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .adapter import LoraModule
from .dtypes import DTYPES
from .errors import LataError

__all__ = ["FoldResult", "QuantOptions", "fold_modules", "resolve_base"]

WEIGHT_FILES = re.compile(r"^(model|diffusion_pytorch_model)(-\d{5}-of-\d{5})?\.safetensors$")
QUANT_STATE_SUFFIX = ".quant_state.bitsandbytes__nf4"
QUANT_STATE_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4",
                     "quant_state.bitsandbytes__fp4")
SHARD_BYTES = 256 * 1024**2  # output shard buffer: bounds peak memory (the 1.1B NF4 benchmark: 1.27x target)


@dataclass(frozen=True)
class QuantOptions:
    """NF4 settings; ``None`` fields come from the base's ``quantization_config`` or defaults."""

    blocksize: int | None = None
    compute_dtype: str | None = None
    double_quant: bool | None = None
    quant_storage: str | None = None


@dataclass
class FoldResult:
    out: Path
    four_bit: bool
    folded: int
    quantized: int
    copied: int = 0  # of ``quantized``: 4-bit base weights no adapter touches, copied verbatim
    module_errors: dict[str, float] = field(default_factory=dict)
    total_relative_error: float | None = None
    bytes_written: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out), "four_bit": self.four_bit, "folded_modules": self.folded,
            "quantized_modules": self.quantized, "copied_4bit_modules": self.copied,
            "bytes_written": self.bytes_written,
            "total_relative_error_4bit_vs_full_precision": self.total_relative_error,
            "module_relative_errors_4bit_vs_full_precision": self.module_errors,
        }


def resolve_base(source: str | os.PathLike[str]) -> Path:
    """A local transformers model folder, or a hub id downloaded when the hub is reachable."""
    path = Path(source).expanduser()
    if not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(str(source), allow_patterns=["*.json", "*.safetensors", "*.model",
                                                                        "*.txt", "*.jinja"]))
        except Exception as exc:
            raise LataError(f"{source}: no such folder, and it could not be fetched from the hub "
                            f"({type(exc).__name__}; offline?)") from None
    if not (path / "config.json").is_file():
        raise LataError(f"{path}: not a transformers model folder (no config.json)")
    if not _weight_files(path):
        pickles = sorted(p.name for p in path.glob("*.bin"))
        hint = f" (found pickled {pickles[0]}; convert it to safetensors)" if pickles else ""
        raise LataError(f"{path}: no model*.safetensors weights{hint}")
    return path


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if WEIGHT_FILES.match(p.name))


def _read_config(base: Path) -> dict[str, Any]:
    try:
        return json.loads((base / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LataError(f"{base / 'config.json'}: unreadable ({exc})") from None


def _base_quantization(config: dict[str, Any], base: Path) -> dict[str, Any] | None:
    quantization = config.get("quantization_config")
    if not quantization:
        return None
    method = quantization.get("quant_method")
    if method == "bitsandbytes" and quantization.get("load_in_4bit"):
        return quantization
    raise LataError(
        f"{base / 'config.json'}: the base is quantised with {method!r}"
        f"{' 8-bit' if quantization.get('load_in_8bit') else ''}; only full-precision or bitsandbytes 4-bit "
        "bases can be folded into"
    )


class _TensorFile:
    """One safetensors file, opened per read so no mapping of it outlives one tensor.

    Keeping a ``safe_open`` handle for a whole multi-GB shard leaves every page read so far
    mapped into the process (resident, though reclaimable), which doubled peak RSS.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with safe_open(path, framework="pt") as handle:
                self.keys = set(handle.keys())
        except (SafetensorError, OSError) as exc:
            raise LataError(f"{path}: corrupt or truncated safetensors file ({exc})") from None

    def get_tensor(self, key: str) -> torch.Tensor:
        with safe_open(self.path, framework="pt") as handle:
            return handle.get_tensor(key).clone()


def _iter_tensors(files: list[_TensorFile]) -> Iterator[tuple[str, _TensorFile]]:
    """``(key, file)`` for every tensor of the base, file by file, in sorted key order."""
    for tensor_file in files:
        for key in sorted(tensor_file.keys):
            yield key, tensor_file


def _release_memory() -> None:
    """Give freed heap back to the OS (glibc keeps large freed blocks otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def quantizable_modules(config: dict[str, Any], skip: list[str] | None) -> set[str]:
    """Names of the modules transformers turns into ``Linear4bit`` when loading this config in 4-bit."""
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations.bitsandbytes import should_convert_module
    from transformers.quantizers.base import get_keys_to_not_convert

    clean = {k: v for k, v in config.items() if k != "quantization_config"}
    model_config = AutoConfig.for_model(**clean)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    not_convert = list(get_keys_to_not_convert(model)) + list(skip or [])
    return {name for name, module in model.named_modules()
            if type(module) is nn.Linear and should_convert_module(name, not_convert)}


class _ShardWriter:
    """Accumulates tensors and writes ``model-XXXXX.safetensors`` shards plus the index."""

    def __init__(self, folder: Path, metadata: dict[str, str]) -> None:
        self.folder, self.metadata = folder, metadata
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.bytes_written = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            save_file(self.pending, self.folder / f"shard-{len(self.shards):05d}.tmp", metadata=self.metadata)
            self.shards.append(list(self.pending))
            self.bytes_written += self.pending_bytes
            self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        if len(self.shards) == 1:
            os.replace(self.folder / "shard-00000.tmp", self.folder / "model.safetensors")
            return
        weight_map = {}
        for index, keys in enumerate(self.shards):
            name = f"model-{index + 1:05d}-of-{len(self.shards):05d}.safetensors"
            os.replace(self.folder / f"shard-{index:05d}.tmp", self.folder / name)
            weight_map.update(dict.fromkeys(keys, name))
        index_file = {"metadata": {"total_size": self.bytes_written}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2))


def _copy_side_files(base: Path, folder: Path) -> None:
    """Tokenizer, generation config, chat template...: every small non-weight file of the base."""
    for path in base.iterdir():
        if path.is_file() and not WEIGHT_FILES.match(path.name) and path.name != "model.safetensors.index.json" \
                and path.suffix not in (".bin", ".pt", ".pth", ".gguf") and not path.name.startswith("."):
            shutil.copy2(path, folder / path.name)


def _delta(module: LoraModule, weight_shape: torch.Size) -> torch.Tensor:
    dense = module.delta.dense()  # fp32, weight space
    return dense.reshape(weight_shape)


def _same_format(state: Any, packed: torch.Tensor, blocksize: int, double_quant: bool, storage: str) -> bool:
    """True if a packed base weight is already NF4 with the block size, double quantisation and
    storage being written (then requantising it could only add error)."""
    return (state.quant_type == "nf4" and state.blocksize == blocksize and bool(state.nested) == bool(double_quant)
            and packed.dtype == getattr(torch, storage))


def check_disk_space(base: Path, out: Path, four_bit: bool) -> None:
    """Refuse before writing when the output folder's disk cannot hold the estimated output."""
    needed = sum(p.stat().st_size for p in _weight_files(base))
    if four_bit:
        needed = needed // 3  # 4-bit weights plus unquantised embeddings, a generous estimate
    free = shutil.disk_usage(out.parent if out.parent.exists() else Path.cwd()).free
    if needed > free:
        raise LataError(f"{out}: needs about {needed / 1e9:.2f} GB but only {free / 1e9:.2f} GB are free there")


def fold_modules(
    modules: dict[str, LoraModule],
    base: Path,
    folder: Path,
    four_bit: bool = False,
    quant: QuantOptions = QuantOptions(),
    progress: Any = None,
) -> FoldResult:
    """Write the base with ``modules`` folded in into ``folder`` (an empty staging folder)."""
    import bitsandbytes.functional as bnbf  # only here: bitsandbytes is imported lazily
    from transformers import BitsAndBytesConfig

    config = _read_config(base)
    base_quant = _base_quantization(config, base)
    four_bit = four_bit or base_quant is not None
    settings = {**(base_quant or {})}
    blocksize = quant.blocksize or 64
    compute = quant.compute_dtype or settings.get("bnb_4bit_compute_dtype") or config.get("torch_dtype") \
        or config.get("dtype") or "float32"
    compute_dtype = DTYPES.get(str(compute), torch.float32)
    double_quant = quant.double_quant if quant.double_quant is not None else settings.get(
        "bnb_4bit_use_double_quant", True)
    storage = quant.quant_storage or settings.get("bnb_4bit_quant_storage", "uint8")
    targets = {f"{name}.weight": module for name, module in modules.items()}
    quantize = quantizable_modules(config, settings.get("llm_int8_skip_modules")) if four_bit else set()
    if four_bit and any(m.kind == "linear_t" for m in modules.values()):
        raise LataError(f"{base}: 4-bit folding of fan_in_fan_out (Conv1D) modules is not supported")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    writer = _ShardWriter(folder, {"format": "pt", "producer": "lata-peft fold"})
    result = FoldResult(folder, four_bit, 0, 0)
    errors_num, errors_den = 0.0, 0.0
    seen: set[str] = set()
    files = [_TensorFile(path) for path in _weight_files(base)]
    if progress is not None:
        progress.start(sum(len(f.keys) for f in files), "folding" + (" into 4-bit" if four_bit else ""))
    for key, handle in _iter_tensors(files):
        file_keys = handle.keys
        if progress is not None:
            progress.advance()
        if any(key.endswith(f".weight.{part}") for part in QUANT_STATE_PARTS):
            continue  # read together with its packed weight below
        tensor = handle.get_tensor(key)
        if key.endswith(".weight") and f"{key}{QUANT_STATE_SUFFIX}" in file_keys:
            state = {part: handle.get_tensor(f"{key}.{part}") for part in QUANT_STATE_PARTS
                     if f"{key}.{part}" in file_keys}
            quant_state = bnbf.QuantState.from_dict(dict(state), device=torch.device(device))  # it edits the dict
            if (key not in targets and key.removesuffix(".weight") in quantize
                    and _same_format(quant_state, tensor, blocksize, double_quant, storage)):
                # untouched and already in the requested format: copied bit for bit, never requantised
                writer.add(key, tensor)
                for part, value in state.items():
                    writer.add(f"{key}.{part}", value)
                result.quantized += 1
                result.copied += 1
                continue
            weight = bnbf.dequantize_4bit(tensor.to(device), quant_state).float()  # dequantised once
            base_dtype = compute_dtype
        else:
            weight, base_dtype = tensor, tensor.dtype
        module = key.removesuffix(".weight")
        if key in targets:
            seen.add(key)
            delta = targets[key].delta
            if weight.shape[0] != delta.shape[0] or weight.numel() != delta.shape[0] * delta.shape[1]:
                raise LataError(f"{base}: {key} has shape {tuple(weight.shape)} but the adapter's delta is "
                                f"{delta.shape}: the adapter is not for this base model")
            exact = weight.to(device, torch.float32) + _delta(targets[key], weight.shape).to(device)
            result.folded += 1
        else:
            exact = None
        if module in quantize:
            source = exact if exact is not None else weight.to(device, torch.float32)
            packed, state = bnbf.quantize_4bit(
                source.to(compute_dtype), blocksize=blocksize,
                compress_statistics=double_quant, quant_type="nf4", quant_storage=getattr(torch, storage),
            )
            if exact is not None:
                restored = bnbf.dequantize_4bit(packed, state).float()
                error = float((restored - exact).norm())
                reference = float(exact.norm())
                result.module_errors[module] = error / reference if reference else 0.0
                errors_num, errors_den = errors_num + error**2, errors_den + reference**2
            writer.add(key, packed.cpu())
            for part, value in state.as_dict(packed=True).items():
                writer.add(f"{key}.{part}", value.cpu())
            result.quantized += 1
            del source, packed, state, exact, weight, tensor
            _release_memory()
        else:
            writer.add(key, (exact if exact is not None else weight).to(base_dtype).cpu())
    missing = sorted(set(targets) - seen)
    if missing:
        raise LataError(f"{base}: has no weight {missing[0]} that the adapter targets "
                        f"({len(missing)} missing): the adapter is not for this base model")
    writer.finish()
    _copy_side_files(base, folder)
    if four_bit:
        config["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=storage,
            llm_int8_skip_modules=settings.get("llm_int8_skip_modules"),
        ).to_dict()
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
    result.bytes_written = writer.bytes_written
    if four_bit and errors_den:
        result.total_relative_error = (errors_num / errors_den) ** 0.5
    return result
