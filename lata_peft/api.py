"""The Python API: one function per verb, each taking its spec (or the keyword arguments that
build one). The CLI and YAML recipes call these and nothing else.

>>> from lata_peft import CombineSpec, combine                             # doctest: +SKIP
>>> combine(CombineSpec(adapters=("a", "b"), forget=("c",), out="out"))   # doctest: +SKIP
>>> combine(["a", "b"], "out", forget=["c"], method="lata", instruction="i")  # the same, by keywords
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from . import pipeline
from .adapter import load_adapter
from .combine import Combination
from .devices import resolve_device
from .dtypes import parse_dtype
from .emit import emit_adapter, emit_folded
from .fold import QuantOptions
from .full_weights import BaseWeights, combine_full
from .methods import METHODS
from .models import read_model_config, resolve_model
from .outputs import prepare_output
from .progress import Progress
from .report import adapter_entry, combine_report, header
from .scoring import module_norm
from .serving import serve
from .spec import Spec
from .specs import CombineSpec, CompareSpec, EvalSpec, ExportSpec, FoldSpec, InspectSpec

__all__ = ["CombineResult", "InspectResult", "combine", "compare", "evaluate", "export", "fold", "inspect"]

S = TypeVar("S", bound=Spec)
PathLike = str | os.PathLike[str]


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


def _spec(kind: type[S], positional: dict[str, Any], options: dict[str, Any]) -> S:
    """The spec passed first, or one built from the positional and keyword arguments."""
    first, *rest = positional.values()
    if isinstance(first, kind):
        if options or any(value is not None for value in rest):
            raise TypeError(f"pass a {kind.__name__} or keyword arguments, not both")
        return first
    return kind(**{name: value for name, value in positional.items() if value is not None}, **options)


def combine(spec: CombineSpec | Sequence[PathLike] | None = None, out: PathLike | None = None, *,
            progress: Progress | None = None, **options: Any) -> CombineResult:
    """Combine LoRA adapters into one PEFT adapter (or a model, with ``fold_into``).

    ``delta_m = lambda * (sum_t w_t * l_{t,m} * dW_{t,m} - sum_j f_j * l_{j,m} * dW_{j,m})``
    where ``l`` is 1, or LATA's layer weight of the block of module ``m`` (``method="lata"``
    or ``lata=True`` with a baseline; needs an instruction vector). Every option is a field
    of :class:`~lata_peft.specs.CombineSpec`.
    """
    started = time.perf_counter()
    spec = _spec(CombineSpec, {"adapters": spec, "out": out}, options)
    inputs = pipeline.load(spec)
    pipeline.check(inputs, strict=spec.strict)
    weights = pipeline.weight(pipeline.score(inputs, spec.granularity, spec.device), spec) if spec.uses_lata else None
    combination = pipeline.merge(inputs, weights, spec, progress)
    written, serving = serve(spec.target, combination.modules, combination.full.tensors, _layer_count(spec, inputs))
    combination = replace(combination, modules=written)
    dtype = parse_dtype(spec.dtype) if spec.dtype is not None else inputs.dtype
    report = combine_report(spec, inputs, weights, combination, serving, dtype, time.perf_counter() - started)
    if inputs.target is not None and inputs.base is not None:
        inputs.release()  # their factors are summed into ``combination``: not held through the fold's stream
        emit_folded(spec, combination.modules, inputs.base, inputs.target, spec.four_bit, report, spec.overwrite,
                    progress=progress, started=started, dense=combination.full.deltas,
                    device=resolve_device(spec.device))
    elif inputs.target is not None:
        emit_adapter(spec, inputs, combination, dtype, report, spec.overwrite)
    table = weights.table() if weights is not None else {}
    return CombineResult(inputs.target, combination, table, report, time.perf_counter() - started)


def _layer_count(spec: CombineSpec, inputs: pipeline.Inputs) -> int | None:
    """The model's transformer layers, for ``--target tgi`` (TGI drops a layer type some layer lacks): the
    base's ``num_hidden_layers`` with ``--base``, else one past the last block any input adapts."""
    if spec.target != "tgi":
        return None
    if spec.base is not None:
        config = read_model_config(resolve_model(spec.base))
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
        if isinstance(text.get("num_hidden_layers"), int):
            return text["num_hidden_layers"]
    blocks = [block for block in inputs.blocks.values() if block is not None]
    if any(task.config.get("layers_to_transform") is not None for task in inputs.tasks):
        warnings.warn("--target tgi: an input adapts only some layers (layers_to_transform), so the model's layer "
                      "count is not known from the inputs; pass --base BASE, or TGI may drop a layer type that "
                      "the last layers lack", stacklevel=2)
    return max(blocks) + 1 if blocks else None


def fold(spec: FoldSpec | PathLike | None = None, base: PathLike | None = None, out: PathLike | None = None, *,
         progress: Progress | None = None, **options: Any) -> dict[str, Any]:
    """Fold one adapter into ``base`` and write the model to ``out`` (full precision or NF4).

    ``W <- W + s * B @ A`` per adapted weight, streamed tensor by tensor; with ``four_bit``
    each weight is quantised once (and a 4-bit base dequantised once). Returns the report,
    including the 4-bit fold's relative weight error against the full-precision fold.
    Every option is a field of :class:`~lata_peft.specs.FoldSpec`.
    """
    started = time.perf_counter()
    spec = _spec(FoldSpec, {"adapter": spec, "base": base, "out": out}, options)
    base_path = resolve_model(spec.base)
    protected = [p for p in (Path(spec.adapter), base_path) if p.exists()]
    target = prepare_output(Path(spec.out), protected, spec.overwrite)
    adapter = load_adapter(spec.adapter, allow_pickle=spec.allow_pickle)
    report = {**header(spec), "method": "fold", "inputs": [adapter_entry(adapter, adapter.name, "adapter", None)]}
    quant = QuantOptions(spec.blocksize, spec.compute_dtype, spec.double_quant, spec.quant_storage)
    dense = combine_full([(adapter.path, adapter.full)], lambda index, module: 1.0, METHODS["ta"],
                         BaseWeights(base_path)).deltas if adapter.full else {}
    emit_folded(spec, adapter.modules, base_path, target, spec.four_bit, report, spec.overwrite, quant, progress,
                started, dense=dense, device=resolve_device(spec.device))
    return report


def export(spec: ExportSpec | PathLike | None = None, out: PathLike | None = None, **options: Any) -> dict[str, Any]:
    """Write one adapter as a llama.cpp LoRA GGUF at ``out`` (``--gguf``): the tensors and metadata of
    llama.cpp's ``convert_lora_to_gguf.py``, with each module's scale folded into ``lora_b`` where the
    converter's one ``lora_alpha`` would be wrong (mixed ranks), so llama.cpp computes PEFT's delta.
    Returns the export's summary. Every option is a field of :class:`~lata_peft.specs.ExportSpec`."""
    from .gguf_export import export_gguf

    spec = _spec(ExportSpec, {"adapter": spec, "out": out}, options)
    return {"verb": "export", "format": "gguf", **export_gguf(spec.adapter, spec.out, spec.base,
                                                              overwrite=spec.overwrite)}


def inspect(spec: InspectSpec | Sequence[PathLike] | None = None, **options: Any) -> InspectResult:
    """Per adapter and layer: norm, and with an instruction vector the cosine and each scheme's weight.

    Per module: rank, scale and Frobenius norm (computed factored). ``plot`` writes a PNG.
    Every option is a field of :class:`~lata_peft.specs.InspectSpec`.
    """
    spec = _spec(InspectSpec, {"adapters": spec}, options)
    tasks, instruction = pipeline.load_inputs(spec.adapters, spec, spec.allow_pickle)
    ones = [1.0] * len(tasks)
    base_model = resolve_model(spec.base) if spec.base is not None else None
    inputs = pipeline.assemble(tasks, instruction, ones, ones, spec.layer_regex, base_model=base_model)
    pipeline.check(inputs)
    table = pipeline.weight(pipeline.score(inputs, spec.granularity, spec.device), spec).table() if instruction else {}
    result = InspectResult()
    for label, task in zip(inputs.labels, tasks, strict=True):
        rows = [{"module": name, "layer": inputs.blocks[name], "rank": m.delta.rank, "scale": m.delta.scale,
                 "norm": module_norm(task, name, inputs.base_weights)} for name, m in task.modules.items()]
        result.adapters[label] = {"path": str(task.path), "base_model": task.base_model,
                                  "layers": table.get(label) or _layer_norms(rows), "modules": rows,
                                  "full_weights": _full_rows(task, inputs.base_weights)}
    if spec.plot is not None:
        from .plot import plot_layers

        plot_layers(result.adapters, Path(spec.plot), scheme=spec.scheme)
    return result


def _full_rows(task: Any, base: BaseWeights | None) -> list[dict[str, Any]]:
    """Full trained parameters (modules_to_save, biases): size, norm, and with the base the norm of
    ``saved - base`` (``None`` where the base lacks the parameter or its shape differs)."""
    rows = []
    for name, (_, tensor) in sorted(task.full.items()):
        reference = base.get(name) if base is not None else None
        same = reference is not None and reference.shape == tensor.shape
        rows.append({"parameter": name, "shape": list(tensor.shape), "parameters": tensor.numel(),
                     "norm": float(tensor.double().norm()),
                     "delta_norm": float((tensor.double() - reference.double()).norm()) if same else None})
    return rows


def _layer_norms(modules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per block: the Frobenius norm of its modules' deltas together (no instruction vector given)."""
    per_layer: dict[int, float] = {}
    for row in modules:
        if row["layer"] is not None:
            per_layer[row["layer"]] = per_layer.get(row["layer"], 0.0) + row["norm"] ** 2
    return [{"layer": layer, "module": None, "norm": total ** 0.5, "instruction_norm": None, "cosine": None,
             "weight": None, "weights": {}} for layer, total in sorted(per_layer.items())]


def compare(spec: CompareSpec | PathLike | None = None, *, progress: Progress | None = None,
            **options: Any) -> dict[str, Any]:
    """Run an experiment plan (every setting, method and lambda on your adapters, resumable) and
    write its report and plots. Every option is a field of :class:`~lata_peft.specs.CompareSpec`."""
    from .experiment import run_compare  # evaluation needs transformers: imported only for this verb

    spec = _spec(CompareSpec, {"plan": spec}, options)
    return run_compare(spec, progress=progress)


def evaluate(spec: EvalSpec | PathLike | None = None, *, progress: Progress | None = None,
             **options: Any) -> list[dict[str, Any]]:
    """Evaluate a model on each task, with ``adapter`` applied or with the exact sum of the ``fold``
    adapters merged into its weights in memory; one result per task (see
    :func:`lata_peft.evaluate.evaluate`). Every option is a field of :class:`~lata_peft.specs.EvalSpec`."""
    from .evaluate import evaluate as evaluate_task  # transformers: imported only for this verb

    spec = _spec(EvalSpec, {"model": spec}, options)
    model: Any = _summed_in_memory(spec.model, spec.fold) if spec.fold else spec.model
    return [evaluate_task(model, task, adapter=spec.adapter, tokenizer=spec.model if spec.fold else None,
                          limit=spec.limit, batch_size=spec.batch_size, max_new_tokens=spec.max_new_tokens,
                          four_bit=spec.four_bit, shots=spec.shots, num_samples=spec.num_samples,
                          temperature=spec.temperature, data=spec.data, progress=progress,
                          unsafe_exec=spec.unsafe_exec)
            for task in spec.tasks]


def _summed_in_memory(model: str, adapters: Sequence[str]) -> Any:
    """The model with the exact sum of ``adapters`` merged into its weights (PEFT's merge of our output)."""
    import tempfile

    from .evaluate.loading import load_model, with_adapter

    with tempfile.TemporaryDirectory() as scratch:
        combine(list(adapters), Path(scratch) / "sum", base=model)
        with with_adapter(load_model(model), Path(scratch) / "sum", restore=False, merge=True) as merged:
            return merged.eval()
