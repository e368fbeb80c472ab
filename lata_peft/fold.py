"""Fold factored deltas into a base model's weights, full precision or 4-bit NF4, streamed.

The base's safetensors are read one tensor at a time and written in output shards, so
peak memory is one base weight in its own dtype, its output, and fp32 blocks of
``ROW_BLOCK_ELEMENTS`` entries of ``W + dW`` (never the whole full-precision model, nor a big weight
whole in fp32). For each adapted weight ``W <- W + dW`` (``dW`` formed from its
factors for that one module, in fp32; a DoRA module's exact ``m (W + sBA) / ||W + sBA|| - W`` from
the very ``W`` folded into, as PEFT's ``merge_and_unload``). With ``four_bit`` every weight that transformers
would quantise is quantised once with bitsandbytes NF4 (``quantize_4bit``) and stored
in transformers' pre-quantised layout (``weight``, ``weight.absmax``, ``weight.quant_map``,
``weight.quant_state.bitsandbytes__nf4``, ...; a GPT-2 ``Conv1D`` weight transposed to ``(out, in)``, as
transformers quantises it), with ``quantization_config`` in
``config.json``, so ``AutoModelForCausalLM.from_pretrained(OUT)`` reloads ``Linear4bit``
modules. In a 4-bit base, a weight an adapter changes is dequantised once, changed and
quantised once; the others are copied bit for bit when they are already in the NF4 format
being written (block size, double quantisation, storage), else requantised once. This is
the only module that uses bitsandbytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .adapter import LoraModule
from .dtypes import DTYPES
from .errors import LataError
from .full_weights import holds_delta
from .models import read_model_config, weight_files
from .outputs import check_free_space
from .shards import SHARD_BYTES, ShardWriter, TensorFile, copy_side_files, iter_tensors, release_memory

__all__ = ["NF4", "FoldResult", "QuantOptions", "check_disk_space", "fold_modules", "fold_weight"]

QUANT_STATE_SUFFIX = ".quant_state.bitsandbytes__nf4"
QUANT_STATE_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4",
                     "quant_state.bitsandbytes__fp4")


ROW_BLOCK_ELEMENTS = 1 << 22
"""A big 2-D weight is folded (and quantised) this many entries at a time: its fp32 ``W + dW`` is never whole
(bitsandbytes' quantiser alone needs ~5x its input)."""


def block_rows(shape: torch.Size | tuple[int, ...], multiple_of: int = 1) -> int | None:
    """Rows per block for a weight of ``shape``: ``ROW_BLOCK_ELEMENTS`` worth, or ``None`` for the whole tensor
    at once (not 2-D, rows not a whole number of ``multiple_of``-entry blocks, or small)."""
    if len(shape) != 2 or shape[1] % multiple_of:
        return None
    rows = max(1, ROW_BLOCK_ELEMENTS // max(1, shape[1]))
    return rows if shape[0] > rows else None


@dataclass(frozen=True)
class QuantOptions:
    """NF4 settings; ``None`` fields come from the base's ``quantization_config`` or defaults."""

    blocksize: int | None = None
    compute_dtype: str | None = None
    double_quant: bool | None = None
    quant_storage: str | None = None


@dataclass(frozen=True)
class NF4:
    """Resolved NF4 settings of one fold, and the modules transformers quantises."""

    blocksize: int
    compute_dtype: torch.dtype
    double_quant: bool
    storage: str
    skip: list[str] | None
    modules: set[str]
    transposed: set[str] = field(default_factory=set)
    """Of ``modules``: GPT-2 ``Conv1D`` layers, whose ``(in, out)`` weight transformers quantises as its
    transpose (``integrations/bitsandbytes.py``: ``if issubclass(module.source_cls, Conv1D): value = value.T``)."""

    @classmethod
    def resolve(cls, config: dict[str, Any], quant: QuantOptions, base_quant: dict[str, Any] | None) -> NF4:
        """Explicit options, else the base's ``quantization_config``, else 64 / the base dtype / true / uint8."""
        settings = {**(base_quant or {})}
        compute = quant.compute_dtype or settings.get("bnb_4bit_compute_dtype") or config.get("torch_dtype") \
            or config.get("dtype") or "float32"
        double_quant = quant.double_quant if quant.double_quant is not None else settings.get(
            "bnb_4bit_use_double_quant", True)
        skip = settings.get("llm_int8_skip_modules")
        modules, transposed = quantizable_modules(config, skip)
        return cls(quant.blocksize or 64, DTYPES.get(str(compute), torch.float32), double_quant,
                   quant.quant_storage or settings.get("bnb_4bit_quant_storage", "uint8"), skip, modules, transposed)

    def block_rows(self, shape: torch.Size | tuple[int, ...]) -> int | None:
        """Rows per quantisation call (:func:`block_rows`; rows of whole NF4 blocks), ``None``: one call."""
        return block_rows(shape, self.blocksize)

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """``weight`` (fp32) quantised once: ``(packed, quant_state)``, the bytes of bitsandbytes'
        ``quantize_4bit`` on the whole tensor (in row blocks when :meth:`block_rows` says so)."""
        import bitsandbytes.functional as bnbf  # only here: bitsandbytes is imported lazily

        rows = self.block_rows(weight.shape)
        if rows is None:
            return bnbf.quantize_4bit(weight.to(self.compute_dtype), blocksize=self.blocksize,
                                      compress_statistics=self.double_quant, quant_type="nf4",
                                      quant_storage=getattr(torch, self.storage))
        return self.quantize_blocks((weight[start:start + rows] for start in range(0, weight.shape[0], rows)),
                                    weight.shape, weight.device)

    def quantize_blocks(self, blocks: Iterable[torch.Tensor], shape: torch.Size, device: torch.device
                        ) -> tuple[torch.Tensor, Any]:
        """A weight of ``shape`` given as consecutive fp32 row ``blocks`` of whole NF4 blocks, quantised to
        the bytes of one ``quantize_4bit`` call on the whole tensor.

        bitsandbytes' CPU kernel needs ~5x its input while it runs (+581 MiB for an 8B MLP module,
        ``benchmarks/bench_quantize_memory.py``), and the caller need never hold the whole fp32 weight. NF4
        blocks never straddle rows, so the codes and ``absmax`` are the same; the double quantisation is done
        once on all of ``absmax``, as ``quantize_4bit(compress_statistics=True)`` does it:
        ``offset = mean(absmax)``, then ``quantize_blockwise(absmax - offset, blocksize=256)``.
        """
        import bitsandbytes.functional as bnbf

        storage = getattr(torch, self.storage)
        packed, absmax = [], []
        for block in blocks:
            codes, scales = torch.ops.bitsandbytes.quantize_4bit.default(
                block.to(self.compute_dtype), self.blocksize, "nf4", storage)
            packed.append(codes)
            absmax.append(scales)
        codes, scales = torch.cat(packed), torch.cat(absmax)
        del packed, absmax
        common = {"shape": torch.Size(shape), "dtype": self.compute_dtype, "blocksize": self.blocksize,
                  "code": bnbf.get_4bit_type("nf4", device=device), "quant_type": "nf4"}
        if not self.double_quant:
            return codes, bnbf.QuantState(absmax=scales, **common)
        offset = scales.mean()
        nested, nested_state = bnbf.quantize_blockwise(scales - offset, blocksize=256)
        return codes, bnbf.QuantState(absmax=nested, offset=offset, state2=nested_state, **common)

    @staticmethod
    def dequantize_rows(packed: torch.Tensor, state: Any, absmax: torch.Tensor, start: int, stop: int
                        ) -> torch.Tensor:
        """Rows ``start:stop`` of ``dequantize_4bit(packed, state)`` (a 2-D weight of whole NF4 blocks per
        row), from ``absmax``, the state's restored float32 scales (:meth:`restored_absmax`)."""
        width = state.shape[1]
        per_row = packed.numel() // state.shape[0]  # packed entries per row (rows are whole NF4 blocks)
        codes = packed.view(-1)[start * per_row:stop * per_row]
        scales = absmax[start * width // state.blocksize:stop * width // state.blocksize]
        return torch.ops.bitsandbytes.dequantize_4bit.default(
            codes.view(-1, 1), scales, state.blocksize, state.quant_type, [stop - start, width], state.dtype)

    @staticmethod
    def restored_absmax(state: Any) -> torch.Tensor:
        """The float32 block scales ``dequantize_4bit`` uses: the nested ones restored, plus the offset."""
        import bitsandbytes.functional as bnbf

        if not state.nested:
            return state.absmax.float()
        return (bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()

    def config(self) -> dict[str, Any]:
        """The ``quantization_config`` transformers reloads this format with."""
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=self.compute_dtype, bnb_4bit_quant_storage=self.storage,
            llm_int8_skip_modules=self.skip,
        ).to_dict()


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
    squared_error: float = 0.0
    squared_norm: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out), "four_bit": self.four_bit, "folded_modules": self.folded,
            "quantized_modules": self.quantized, "copied_4bit_modules": self.copied,
            "bytes_written": self.bytes_written,
            "total_relative_error_4bit_vs_full_precision": self.total_relative_error,
            "module_relative_errors_4bit_vs_full_precision": self.module_errors,
        }


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


def quantizable_modules(config: dict[str, Any], skip: list[str] | None) -> tuple[set[str], set[str]]:
    """Names of the modules transformers turns into ``Linear4bit`` when loading this config in 4-bit
    (``nn.Linear`` and GPT-2's ``Conv1D``, as ``replace_with_bnb_linear``), and which of them are ``Conv1D``."""
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations.bitsandbytes import should_convert_module
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import get_keys_to_not_convert

    clean = {k: v for k, v in config.items() if k != "quantization_config"}
    model_config = AutoConfig.for_model(**clean)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    not_convert = list(get_keys_to_not_convert(model)) + list(skip or [])
    converted = {name: isinstance(module, Conv1D) for name, module in model.named_modules()
                 if (isinstance(module, Conv1D) or type(module) is nn.Linear)
                 and should_convert_module(name, not_convert)}
    return set(converted), {name for name, conv1d in converted.items() if conv1d}


def _same_format(state: Any, packed: torch.Tensor, blocksize: int, double_quant: bool, storage: str) -> bool:
    """True if a packed base weight is already NF4 with the block size, double quantisation and
    storage being written (then requantising it could only add error)."""
    return (state.quant_type == "nf4" and state.blocksize == blocksize and bool(state.nested) == bool(double_quant)
            and packed.dtype == getattr(torch, storage))


def check_disk_space(base: Path, out: Path, four_bit: bool) -> None:
    """Refuse before writing when the output folder's disk cannot hold the estimated output."""
    needed = sum(p.stat().st_size for p in weight_files(base))
    if four_bit:
        needed = needed // 3  # 4-bit weights plus unquantised embeddings, a generous estimate
    check_free_space(out, needed)


def fold_weight(weight: torch.Tensor, module: LoraModule, key: str, base: Path, *,
                in_place: bool = False) -> torch.Tensor:
    """``W + dW`` in fp32 on ``weight``'s device: one fp32 copy of ``W`` updated in place (``weight`` is
    not changed), or ``weight`` itself with ``in_place`` (an fp32 tensor the caller owns).

    ``dW`` is ``s B A``, added by one ``addmm`` so no dense ``dW`` is ever formed, or, for a module whose
    task vector needs the base weight, its exact :meth:`~lata_peft.adapter.LoraModule.task_vector` from
    this ``W`` (DoRA's ``m (W + sBA) / ||W + sBA|| - W``, or a combination's exact dense merge), computed
    on the CPU.
    """
    delta = module.delta
    if not holds_delta(weight.shape, delta.shape):
        raise LataError(f"{base}: {key} has shape {tuple(weight.shape)} but the adapter's delta is "
                        f"{delta.shape}: the adapter is not for this base model")
    if in_place and weight.dtype != torch.float32:
        raise ValueError(f"in-place folding needs an fp32 weight, got {weight.dtype}")
    folded = weight if in_place else weight.to(weight.device, torch.float32, copy=True)
    if module.needs_base:
        try:
            change = module.task_vector(folded.detach().to("cpu").reshape(delta.shape))
        except LataError as exc:  # e.g. a zero DoRA norm: say which base weight
            raise LataError(f"{base}: {key}: {exc}") from None
        return folded.add_(change.reshape(weight.shape).to(folded.device))
    scaled_b, a = delta.balanced()
    folded.view(delta.shape).addmm_(scaled_b.to(folded.device, torch.float32), a.to(folded.device, torch.float32))
    return folded


def fold_modules(
    modules: dict[str, LoraModule],
    base: Path,
    folder: Path,
    four_bit: bool = False,
    quant: QuantOptions = QuantOptions(),
    progress: Any = None,
    dense: dict[str, torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
) -> FoldResult:
    """Write the base with ``modules`` folded in into ``folder`` (an empty staging folder);
    ``dense``: dense deltas added by base tensor name (full trained parameters, ``lora_bias``);
    ``device``: where each tensor is folded and quantised (read and written from the CPU)."""
    config = read_model_config(base)
    base_quant = _base_quantization(config, base)
    four_bit = four_bit or base_quant is not None
    nf4 = NF4.resolve(config, quant, base_quant) if four_bit else None
    targets = {f"{name}.weight": module for name, module in modules.items()}
    dense = {**(dense or {}), **{f"{name}.bias": m.bias for name, m in modules.items() if m.bias is not None}}
    if nf4 is not None and nf4.transposed:  # a 4-bit Conv1D weight is W^T: add dW^T
        targets = {key: _transposed(module) if _conv1d(key, nf4) and module.kind == "linear_t" else module
                   for key, module in targets.items()}
        dense = {key: delta.T if _conv1d(key, nf4) and delta.ndim == 2 else delta for key, delta in dense.items()}
    writer = ShardWriter(folder, {"format": "pt"})  # one key: see writing.save_adapter_files
    result = FoldResult(folder, four_bit, 0, 0)
    files = [TensorFile(path) for path in weight_files(base)]
    if progress is not None:
        total = sum(sum(f.nbytes.values()) for f in files)
        progress.start(total, "folding" + (" into 4-bit" if four_bit else ""), unit="bytes")
    seen: set[str] = set()
    device = torch.device(device)
    for key, handle in iter_tensors(files):
        if progress is not None:
            progress.advance(handle.nbytes[key])
        if any(key.endswith(f".weight.{part}") for part in QUANT_STATE_PARTS):
            continue  # read together with its packed weight
        quantized = nf4 is not None and (key.removesuffix(".weight") in nf4.modules
                                         or f"{key}{QUANT_STATE_SUFFIX}" in handle.keys)
        if key not in targets and key not in dense and not quantized and handle.nbytes[key] >= SHARD_BYTES:
            writer.copy(key, handle)  # e.g. an 8B model's 1 GB embedding: never in memory
        else:
            _fold_tensor(key, handle, targets, dense, nf4, writer, result, base, device)
        seen.add(key)
    missing = sorted((set(targets) | set(dense)) - seen)
    if missing:
        raise LataError(f"{base}: has no weight {missing[0]} that the adapter targets "
                        f"({len(missing)} missing): the adapter is not for this base model")
    writer.finish()
    copy_side_files(base, folder)
    if nf4 is not None:
        config["quantization_config"] = nf4.config()
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
    result.bytes_written = writer.bytes_written
    if four_bit and result.squared_norm:
        result.total_relative_error = (result.squared_error / result.squared_norm) ** 0.5
    return result


def _fold_tensor(key: str, handle: TensorFile, targets: dict[str, LoraModule], dense: dict[str, torch.Tensor],
                 nf4: NF4 | None, writer: ShardWriter, result: FoldResult, base: Path, device: torch.device) -> None:
    """Read one base tensor (dequantising a 4-bit one), fold its delta in, write it (quantised): a big 2-D
    weight a block of rows at a time (:func:`_folded_rows`), anything else whole (:func:`_fold_whole`)."""
    read = _read_weight(key, handle, targets, dense, nf4, writer, result, device)
    if read is None:
        return
    weight, base_dtype, owned = read
    quantized = nf4 is not None and key.removesuffix(".weight") in nf4.modules
    folded = key in targets or key in dense
    rows = None
    if not owned and (quantized or folded):
        rows = nf4.block_rows(weight.shape) if quantized else block_rows(weight.shape)
    if rows is not None and _blockwise(key, weight, targets, dense):
        blocks = _folded_rows(weight, targets.get(key), dense.get(key), rows, device)
        if quantized:
            _write_quantized_rows(key, blocks, weight.shape, folded, nf4, writer, result, device)
        else:  # W + dW back in the base's dtype, a block of rows at a time
            out = torch.empty(weight.shape, dtype=base_dtype)
            for start, block in blocks():
                out[start:start + block.shape[0]] = block.to(base_dtype).cpu()
            writer.add(key, out)
        result.folded += folded
    else:
        _fold_whole(key, weight, base_dtype, owned, quantized, targets, dense, nf4, writer, result, base, device)


def _read_weight(key: str, handle: TensorFile, targets: dict[str, LoraModule], dense: dict[str, torch.Tensor],
                 nf4: NF4 | None, writer: ShardWriter, result: FoldResult, device: torch.device
                 ) -> tuple[torch.Tensor, torch.dtype, bool] | None:
    """``(weight, its output dtype, owned)``: the stored tensor as it is (not owned), or a 4-bit base weight
    dequantised once into an fp32 tensor of our own; ``None`` when an untouched 4-bit weight already in the
    requested format was copied bit for bit (never requantised)."""
    tensor = handle.get_tensor(key)
    if nf4 is None or not key.endswith(".weight") or f"{key}{QUANT_STATE_SUFFIX}" not in handle.keys:
        if _conv1d(key, nf4) and tensor.ndim == 2:  # a full-precision Conv1D weight about to be quantised
            tensor = tensor.T.contiguous()
        return tensor, tensor.dtype, False
    import bitsandbytes.functional as bnbf

    state = {part: handle.get_tensor(f"{key}.{part}") for part in QUANT_STATE_PARTS if f"{key}.{part}" in handle.keys}
    quant_state = bnbf.QuantState.from_dict(dict(state), device=device)  # it edits the dict
    if key not in targets and key not in dense and key.removesuffix(".weight") in nf4.modules and _same_format(
            quant_state, tensor, nf4.blocksize, nf4.double_quant, nf4.storage):
        writer.add(key, tensor)
        for part, value in state.items():
            writer.add(f"{key}.{part}", value)
        result.quantized += 1
        result.copied += 1
        return None
    return bnbf.dequantize_4bit(tensor.to(device), quant_state).float(), nf4.compute_dtype, True


def _conv1d(key: str, nf4: NF4 | None) -> bool:
    """True for the weight of a ``Conv1D`` layer that is written in 4-bit, hence transposed (``NF4.transposed``)."""
    return nf4 is not None and key.endswith(".weight") and key.removesuffix(".weight") in nf4.transposed


def _transposed(module: LoraModule) -> LoraModule:
    """A ``linear_t`` (Conv1D) module as the ``linear`` module of the transposed weight ``W^T`` (out, in):
    factors ``(s B A)^T``; an exact merge evaluated on ``W`` and transposed back; DoRA's norm per output feature
    is the same norm (columns of ``W``, rows of ``W^T``)."""
    exact = module.exact
    return replace(module, delta=module.delta.transposed(), kind="linear",
                   exact=None if exact is None else lambda weight: exact(weight.T).T)


def _fold_whole(key: str, weight: torch.Tensor, base_dtype: torch.dtype, owned: bool, quantized: bool,
                targets: dict[str, LoraModule], dense: dict[str, torch.Tensor], nf4: NF4 | None, writer: ShardWriter,
                result: FoldResult, base: Path, device: torch.device) -> None:
    """``W + dW`` (and a dense delta) on the whole weight in fp32, written quantised or in ``base_dtype``."""
    exact = None
    if key in targets:
        exact = fold_weight(weight.to(device), targets[key], key, base, in_place=owned)
        result.folded += 1
    if key in dense:
        if dense[key].shape != weight.shape:
            raise LataError(f"{base}: {key} has shape {tuple(weight.shape)} but the adapter's delta is "
                            f"{tuple(dense[key].shape)}: the adapter is not for this base model")
        if exact is None:
            exact = weight if owned else weight.to(device, torch.float32, copy=True)
        exact.add_(dense[key].to(device, torch.float32))
        result.folded += key not in targets
    if quantized:
        assert nf4 is not None
        _write_quantized(key, exact if exact is not None else weight.to(device, torch.float32), exact is not None,
                         nf4, writer, result)
    else:
        writer.add(key, (exact if exact is not None else weight).to(base_dtype).cpu())


def _blockwise(key: str, weight: torch.Tensor, targets: dict[str, LoraModule], dense: dict[str, torch.Tensor]) -> bool:
    """True when ``W + dW`` can be formed a block of rows at a time: a plain factored delta (no DoRA, no
    exact dense merge) and dense deltas of ``W``'s own shape (other cases take :func:`fold_weight`'s checks)."""
    module = targets.get(key)
    if module is not None and (module.needs_base or tuple(module.delta.shape) != tuple(weight.shape)):
        return False
    return key not in dense or dense[key].shape == weight.shape


def _folded_rows(weight: torch.Tensor, module: LoraModule | None, extra: torch.Tensor | None, rows: int,
                 device: torch.device) -> Callable[[], Iterator[tuple[int, torch.Tensor]]]:
    """``W + s B A (+ extra)`` in fp32, ``rows`` rows at a time: a function that yields ``(start, block)``, each
    block a fresh tensor on ``device`` (the same bytes each call), so the whole fp32 ``W'`` is never held.
    The rows of :func:`fold_weight`'s result up to fp32 rounding: BLAS may sum a few rows' product in another
    order (bit for bit at an 8B model's shapes here: ``benchmarks/check_row_block_bits.py``)."""
    factors = None
    if module is not None:
        scaled_b, a = module.delta.balanced()
        factors = scaled_b.to(device, torch.float32), a.to(device, torch.float32)

    def blocks() -> Iterator[tuple[int, torch.Tensor]]:
        for start in range(0, weight.shape[0], rows):
            block = weight[start:start + rows].to(device, torch.float32, copy=True)
            if factors is not None:
                block.addmm_(factors[0][start:start + rows], factors[1])
            if extra is not None:
                block.add_(extra[start:start + rows].to(device, torch.float32))
            yield start, block

    return blocks


def _write_quantized_rows(key: str, blocks: Callable[[], Iterator[tuple[int, torch.Tensor]]], shape: torch.Size,
                          folded: bool, nf4: NF4, writer: ShardWriter, result: FoldResult, device: torch.device
                          ) -> None:
    """:func:`_write_quantized` for a weight given as row ``blocks``: quantised in one pass; for a folded
    weight, the error measured in a second pass that forms each block again (an ``addmm`` is cheap beside
    holding a second fp32 copy of an 8B model's MLP weight)."""
    packed, state = nf4.quantize_blocks((block for _, block in blocks()), shape, device)
    if folded:
        absmax = nf4.restored_absmax(state)
        squared_error = squared_norm = 0.0
        for start, block in blocks():
            error, norm = _squares(nf4.dequantize_rows(packed, state, absmax, start, start + block.shape[0]), block)
            squared_error, squared_norm = squared_error + error, squared_norm + norm
        _record_error(key, squared_error, squared_norm, result)
    _store_quantized(key, packed, state, writer, result)


def _write_quantized(key: str, weight: torch.Tensor, folded: bool, nf4: NF4, writer: ShardWriter,
                     result: FoldResult) -> None:
    """Quantise ``weight`` once and write it in transformers' pre-quantised layout; for a folded
    weight, record ``|dequant(Q(W')) - W'| / |W'|``, what 4-bit costs against the full-precision fold."""
    import bitsandbytes.functional as bnbf

    packed, state = nf4.quantize(weight)
    if folded:
        _record_error(key, *_squares(bnbf.dequantize_4bit(packed, state), weight), result)
    del weight
    _store_quantized(key, packed, state, writer, result)


def _record_error(key: str, squared_error: float, squared_norm: float, result: FoldResult) -> None:
    result.module_errors[key.removesuffix(".weight")] = (squared_error / squared_norm) ** 0.5 if squared_norm else 0.0
    result.squared_error += squared_error
    result.squared_norm += squared_norm


def _store_quantized(key: str, packed: torch.Tensor, state: Any, writer: ShardWriter, result: FoldResult) -> None:
    """The packed weight and its quant state, in transformers' pre-quantised layout."""
    writer.add(key, packed.cpu())
    for part, value in state.as_dict(packed=True).items():
        writer.add(f"{key}.{part}", value.cpu())
    result.quantized += 1
    del packed, state
    release_memory()


def _squares(restored: torch.Tensor, weight: torch.Tensor, rows: int = 256) -> tuple[float, float]:
    """``(|restored - weight|^2, |weight|^2)`` summed in float64 a block of rows at a time: no full-size
    difference is formed, and no float32 accumulation error (5e-5 relative at 1.5M entries) enters."""
    error = norm = 0.0
    for start in range(0, weight.shape[0], rows):
        block = weight[start:start + rows].double()
        norm += float(block.square().sum())
        error += float(block.sub_(restored[start:start + rows].double()).square_().sum())
    return error, norm
