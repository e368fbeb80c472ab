"""The Python API: one function per verb. The CLI and YAML recipes call these and nothing else.

``combine`` is the orchestrator: load -> validate -> (score vs instruction -> layer
weights) -> combine factored or per module -> write atomically with a report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from . import __version__
from .adapter import REPORT_NAME, Adapter, load_adapter
from .combine import Combination, RankPolicy
from .combine import combine as combine_modules
from .dtypes import parse_dtype
from .errors import LataError
from .fold import FoldResult, QuantOptions, check_disk_space, fold_modules, resolve_base
from .instruction import DenseInstruction
from .layers import block_index
from .lowrank import norm
from .methods import METHODS
from .report import build_report, layer_table, now
from .scoring import unit_of
from .validate import check_compatible, check_output
from .weighting import LayerWeighting
from .writing import output_config, save_adapter_files, shared_base_layers, write_atomically

__all__ = ["CombineResult", "FoldResult", "InspectResult", "combine", "fold", "inspect"]

METHOD_NAMES = ("lata", *METHODS)


class Progress(Protocol):
    """What the API reports progress to (the CLI passes a rich progress bar)."""

    def start(self, total: int, description: str) -> None: ...

    def advance(self) -> None: ...


@dataclass
class CombineResult:
    """What ``combine`` did: the modules, the per-layer LATA weights, and the report written."""

    out: Path | None
    combination: Combination
    layer_weights: dict[str, list[dict[str, Any]]]
    report: dict[str, Any]
    seconds: float


@dataclass
class InspectResult:
    """Per adapter: its modules (rank, norm) and its layers (norm, cosine, weights)."""

    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return self.adapters


def _labels(adapters: Sequence[Adapter]) -> list[str]:
    labels: list[str] = []
    for adapter in adapters:
        label = adapter.name
        while label in labels:
            label = f"{label}#{len(labels)}"
        labels.append(label)
    return labels


def _per_input(values: Sequence[float] | None, count: int, flag: str) -> list[float]:
    if values is None or len(values) == 0:
        return [1.0] * count
    if len(values) == 1 and count > 1:
        return [float(values[0])] * count
    if len(values) != count:
        raise LataError(f"{flag}: got {len(values)} values for {count} adapters")
    return [float(v) for v in values]


def _load_all(sources: Sequence[str | Path], allow_pickle: bool) -> list[Adapter]:
    return [load_adapter(source, allow_pickle=allow_pickle) for source in sources]


def combine(
    adapters: Sequence[str | Path],
    out: str | Path | None = None,
    *,
    forget: Sequence[str | Path] = (),
    method: str = "ta",
    weights: Sequence[float] | None = None,
    forget_weights: Sequence[float] | None = None,
    lam: float = 1.0,
    rank: str | int = "exact",
    instruction: str | Path | None = None,
    instruction_from: Sequence[str | Path] | None = None,
    lata: bool = False,
    scheme: str = "linear",
    threshold: float = 0.95,
    keep: float | None = None,
    low: float = 0.0,
    high: float = 1.0,
    normalize: bool = False,
    granularity: str = "block",
    density: float = 0.5,
    seed: int = 0,
    sign_method: str = "total",
    dtype: str | None = None,
    layer_regex: str | None = None,
    strict: bool = False,
    allow_pickle: bool = False,
    overwrite: bool = False,
    dry_run: bool = False,
    fold_into: str | Path | None = None,
    four_bit: bool = False,
    progress: Progress | None = None,
) -> CombineResult:
    """Combine LoRA adapters into one PEFT adapter written to ``out``.

    ``delta_m = lam * (sum_t w_t * l_{t,m} * dW_{t,m} - sum_j f_j * l_{j,m} * dW_{j,m})``
    where ``l`` is 1, or LATA's layer weight of the block of module ``m`` (``method="lata"``
    or ``lata=True`` with a baseline; needs ``instruction``).

    Args:
        adapters: task adapters (folders or hub ids) to add.
        out: output adapter folder (``None`` only with ``dry_run``).
        forget: adapters to subtract (task forgetting).
        method: ``lata``, ``ta``, ``ties``, ``dare``, ``dare_ties`` or ``magnitude``.
        weights / forget_weights: one per adapter (or one for all); default 1.0.
        lam: global scale lambda.
        rank: ``exact``, a rank K, or ``energy:F``.
        instruction: the instruction adapter LATA scores layers against.
        instruction_from: ``[BASE, INSTRUCT]`` model folders: the instruction vector is their
            difference, read module by module (for task adapters trained on an instruct model).
        lata: apply LATA layer weights with a baseline method.
        scheme / threshold / keep / low / high / normalize: LATA weighting (see ``weighting``);
            ``keep`` makes Drop-with-Threshold keep that fraction of the least aligned blocks.
        granularity: score per ``block`` or per ``module``.
        density / seed / sign_method: TIES / DARE / magnitude options.
        dtype: output dtype (default: the inputs').
        layer_regex: regex with one group giving the block index, for unknown architectures.
        strict: refuse adapters whose ``base_model_name_or_path`` differ.
        allow_pickle: read ``adapter_model.bin`` with ``weights_only=True``.
        overwrite: replace an existing ``out``.
        dry_run: compute and report, write nothing.
        fold_into: a base model folder (or hub id): write the base with the combination folded in
            instead of an adapter.
        four_bit: with ``fold_into``, quantise the folded model to bitsandbytes NF4 once.
    """
    started = time.perf_counter()
    if method not in METHOD_NAMES:
        raise LataError(f"--method {method!r}: expected one of {', '.join(METHOD_NAMES)}")
    use_lata = method == "lata" or lata
    merge = METHODS["ta" if method == "lata" else method]
    weighting = LayerWeighting(scheme, low, high, threshold, normalize, keep)
    policy = RankPolicy.parse(rank)
    if granularity not in ("block", "module"):
        raise LataError(f"--granularity {granularity!r}: expected 'block' or 'module'")
    if not 0.0 < density <= 1.0:
        raise LataError(f"--density {density}: expected 0 < density <= 1")
    requested_dtype = parse_dtype(dtype) if dtype is not None else None
    if use_lata and instruction is None and not instruction_from:
        raise LataError("LATA needs an instruction vector: pass --instruction I or --instruction-from BASE INSTRUCT")
    if instruction is not None and instruction_from:
        raise LataError("give --instruction or --instruction-from, not both")
    if out is None and not dry_run:
        raise LataError("no output folder: pass -o OUT (or --dry-run)")
    if not adapters and not forget:
        raise LataError("no adapters given")
    if four_bit and fold_into is None:
        raise LataError("--4bit needs --fold-into BASE (a 4-bit adapter is not a thing: the base is quantised)")
    sources = [*adapters, *forget]
    base_path = resolve_base(fold_into) if fold_into is not None else None
    local_inputs = [Path(s) for s in [*sources, *([instruction] if instruction else [])] if Path(s).exists()]
    local_inputs += [base_path] if base_path is not None else []
    target = check_output(Path(out), local_inputs, overwrite or dry_run) if out is not None else None
    if base_path is not None and target is not None:
        check_disk_space(base_path, target, four_bit)

    tasks = _load_all(sources, allow_pickle)
    instruction_adapter = load_adapter(instruction, allow_pickle=allow_pickle) if instruction else None
    check_compatible([*tasks, *([instruction_adapter] if instruction_adapter else [])], strict=strict)
    instruction_vector = instruction_adapter or (_dense_instruction(instruction_from) if instruction_from else None)
    signs = [1.0] * len(adapters) + [-1.0] * len(forget)
    scales = _per_input(weights, len(adapters), "--weight") + _per_input(forget_weights, len(forget), "--forget-weight")
    labels = _labels(tasks)

    tables: dict[str, list[dict[str, Any]]] = {}
    unit_weights: list[dict[tuple[int | None, str | None], float]] = []
    for label, task in zip(labels, tasks, strict=True):
        if use_lata and instruction_vector is not None:
            table = layer_table(task, instruction_vector, weighting, granularity, layer_regex)
            tables[label] = table
            unit_weights.append({(row["layer"], row["module"]): row["weight"] for row in table})
        else:
            unit_weights.append({})

    def coefficient(index: int, module: str) -> float:
        layer_weight = 1.0
        if use_lata:
            layer_weight = unit_weights[index].get(unit_of(module, granularity, layer_regex), 1.0)
        return lam * signs[index] * scales[index] * layer_weight

    names = {name for task in tasks for name in task.modules}
    if progress is not None:
        progress.start(len(names), f"combining ({method})")
    combination = combine_modules(
        tasks, coefficient, merge, policy, density=density, seed=seed, sign_method=sign_method,
        layer_regex=layer_regex, on_module=(lambda _: progress.advance()) if progress is not None else None,
    )
    out_dtype = requested_dtype or _common_dtype(tasks)
    seconds = time.perf_counter() - started
    report = build_report(
        tasks, labels, signs, scales, instruction_vector, combination, tables, seconds,
        options={
            "method": method, "lata": use_lata, "lambda": lam, "rank": str(policy),
            "scheme": scheme if use_lata else None, "threshold": threshold, "keep": keep, "low": low, "high": high,
            "normalize": normalize, "granularity": granularity, "density": density, "seed": seed,
            "sign_method": sign_method, "dtype": str(out_dtype).removeprefix("torch."),
        },
    )
    if target is not None and not dry_run and base_path is not None:
        _fold_into(combination.modules, base_path, target, four_bit, QuantOptions(), report, overwrite, progress,
                   started)
    elif target is not None and not dry_run:
        config = output_config(tasks, combination.modules)
        base_layers = shared_base_layers(tasks)
        write_atomically(
            target,
            lambda folder: save_adapter_files(folder, combination.modules, config, out_dtype, report, base_layers),
            overwrite=overwrite,
        )
    return CombineResult(None if dry_run else target, combination, tables, report, seconds)


def _fold_into(modules, base: Path, target: Path, four_bit: bool, quant: QuantOptions, report: dict[str, Any],
               overwrite: bool, progress: Progress | None, started: float) -> None:
    """Fold into ``base`` and write it atomically at ``target``, with ``report["fold"]`` in its report."""

    def fill(folder: Path) -> None:
        result = fold_modules(modules, base, folder, four_bit=four_bit, quant=quant, progress=progress)
        report["fold"] = {**result.to_dict(), "out": str(target), "base": str(base),
                          "seconds": round(time.perf_counter() - started, 3)}
        (folder / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")

    write_atomically(target, fill, overwrite=overwrite)


def fold(
    adapter: str | Path,
    base: str | Path,
    out: str | Path,
    *,
    four_bit: bool = False,
    blocksize: int | None = None,
    compute_dtype: str | None = None,
    double_quant: bool | None = None,
    quant_storage: str | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Fold one adapter into ``base`` and write the model to ``out`` (full precision or NF4).

    ``W <- W + s * B @ A`` per adapted weight, streamed tensor by tensor; with ``four_bit``
    each weight is quantised once (and a 4-bit base dequantised once). Returns the report,
    including the 4-bit fold's relative weight error against the full-precision fold.

    Args:
        adapter: PEFT LoRA adapter folder or hub id.
        base: transformers model folder (safetensors, sharded or not) or hub id.
        out: output model folder.
        four_bit: quantise to bitsandbytes NF4 (automatic when the base is 4-bit).
        blocksize / compute_dtype / double_quant / quant_storage: NF4 settings; default to
            the base's ``quantization_config``, else 64 / the base dtype / true / uint8.
        allow_pickle: read a pickled adapter with ``weights_only=True``.
        overwrite: replace an existing ``out``.
    """
    started = time.perf_counter()
    base_path = resolve_base(base)
    adapter_path = Path(adapter)
    target = check_output(Path(out), [p for p in (adapter_path, base_path) if p.exists()], overwrite)
    check_disk_space(base_path, target, four_bit)
    loaded = load_adapter(adapter, allow_pickle=allow_pickle)
    report: dict[str, Any] = {
        "lata_peft_version": __version__,
        "created": now(),
        "method": "fold",
        "inputs": [{"label": loaded.name, "path": str(loaded.path.resolve()), "role": "adapter",
                    "base_model": loaded.base_model, "sha256": loaded.sha256}],
    }
    quant = QuantOptions(blocksize, compute_dtype, double_quant, quant_storage)
    _fold_into(loaded.modules, base_path, target, four_bit, quant, report, overwrite, progress, started)
    return report


def _dense_instruction(paths: Sequence[str | Path]) -> DenseInstruction:
    if len(paths) != 2:
        raise LataError(f"--instruction-from takes two model folders (BASE INSTRUCT), got {len(paths)}")
    return DenseInstruction(paths[0], paths[1])


def _common_dtype(adapters: Sequence[Adapter]) -> torch.dtype:
    dtypes = {a.dtype for a in adapters}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def inspect(
    adapters: Sequence[str | Path],
    *,
    instruction: str | Path | None = None,
    instruction_from: Sequence[str | Path] | None = None,
    scheme: str = "linear",
    threshold: float = 0.95,
    keep: float | None = None,
    low: float = 0.0,
    high: float = 1.0,
    normalize: bool = False,
    granularity: str = "block",
    layer_regex: str | None = None,
    allow_pickle: bool = False,
    plot: str | Path | None = None,
) -> InspectResult:
    """Per adapter and layer: norm, and with ``instruction`` the cosine and each scheme's weight.

    Per module: rank, scale and Frobenius norm (computed factored). ``plot`` writes a PNG.
    """
    weighting = LayerWeighting(scheme, low, high, threshold, normalize, keep)
    tasks = _load_all(adapters, allow_pickle)
    instruction_adapter = load_adapter(instruction, allow_pickle=allow_pickle) if instruction else None
    check_compatible([*tasks, *([instruction_adapter] if instruction_adapter else [])])
    instruction_vector = instruction_adapter or (_dense_instruction(instruction_from) if instruction_from else None)
    result = InspectResult()
    for label, task in zip(_labels(tasks), tasks, strict=True):
        modules = [
            {"module": name, "layer": block_index(name, layer_regex), "rank": m.delta.rank,
             "scale": m.delta.scale, "norm": norm(m.delta)}
            for name, m in task.modules.items()
        ]
        if instruction_vector is not None:
            layers = layer_table(task, instruction_vector, weighting, granularity, layer_regex)
        else:
            per_layer: dict[int | None, float] = {}
            for row in modules:
                per_layer[row["layer"]] = per_layer.get(row["layer"], 0.0) + row["norm"] ** 2
            layers = [
                {"layer": layer, "module": None, "norm": total ** 0.5, "instruction_norm": None,
                 "cosine": None, "weight": None, "weights": {}}
                for layer, total in sorted(per_layer.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))
                if layer is not None
            ]
        result.adapters[label] = {"path": str(task.path), "base_model": task.base_model, "layers": layers,
                                  "modules": modules}
    if plot is not None:
        from .plot import plot_layers

        plot_layers(result, Path(plot), scheme=scheme)
    return result
