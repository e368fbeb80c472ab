"""The combine pipeline, one typed hand-off per stage:

``load`` (adapters, instruction vector, output checks) -> ``check`` (same base, same shapes)
-> ``score`` (cosine per unit vs the instruction vector) -> ``weight`` (:class:`LayerWeights`)
-> ``merge`` (:class:`Combination`) -> ``emit`` (:mod:`lata_peft.emit`: adapter or folded model,
plus report and recipe, written in one place). ``api.combine`` runs the stages in this order;
``api.inspect`` runs the first four.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapter import Adapter, load_adapter
from .combine import Combination
from .combine import combine as combine_modules
from .devices import resolve_device
from .errors import LataError
from .full_weights import BaseWeights, combine_full
from .instruction import DenseInstruction
from .layers import blocks_of, safe_block
from .methods import vector_method
from .models import resolve_model
from .outputs import prepare_output
from .progress import Progress
from .scoring import LayerScore, score_layers
from .specs import CombineSpec, ScoringSpec
from .validate import check_against_base, check_compatible
from .weighting import LayerWeights, weigh

__all__ = ["Inputs", "assemble", "check", "is_dora", "labels_of", "load", "load_inputs", "merge", "score", "weight"]

Instruction = Adapter | DenseInstruction


@dataclass
class Inputs:
    """What ``load`` hands on: the adapters in order (task adapters, then forgotten ones), their
    labels and signed scales, the instruction vector, each module's block, and where to write."""

    tasks: list[Adapter]
    labels: list[str]
    signs: list[float]
    scales: list[float]
    instruction: Instruction | None
    blocks: dict[str, int | None]
    base: Path | None = None
    target: Path | None = None
    base_weights: BaseWeights | None = None
    base_model: Path | None = None

    def release(self) -> None:
        """Drop the loaded adapters and the instruction vector (their tensors are freed unless held elsewhere);
        labels, signs, scales, blocks and paths stay."""
        self.tasks, self.instruction = [], None

    @property
    def dtype(self) -> torch.dtype:
        """The inputs' common dtype (float32 when they differ)."""
        dtypes = {a.dtype for a in self.tasks}
        return dtypes.pop() if len(dtypes) == 1 else torch.float32


def labels_of(adapters: Sequence[Adapter]) -> list[str]:
    """Folder names, made unique with ``#i`` suffixes."""
    labels: list[str] = []
    for adapter in adapters:
        label = adapter.name
        while label in labels:
            label = f"{label}#{len(labels)}"
        labels.append(label)
    return labels


def load_inputs(
    sources: Sequence[str], spec: ScoringSpec, allow_pickle: bool
) -> tuple[list[Adapter], Instruction | None]:
    """The adapters of ``sources`` and the instruction vector the spec names (or ``None``)."""
    tasks = [load_adapter(source, allow_pickle=allow_pickle) for source in sources]
    instruction: Instruction | None = None
    if spec.instruction is not None:
        instruction = load_adapter(spec.instruction, allow_pickle=allow_pickle)
    elif spec.instruction_from is not None:
        instruction = DenseInstruction(*spec.instruction_from)
    for adapter in [*tasks, *([instruction] if isinstance(instruction, Adapter) else [])]:
        for note in adapter.warnings:
            warnings.warn(note, stacklevel=2)
    return tasks, instruction


def assemble(tasks: list[Adapter], instruction: Instruction | None, signs: list[float], scales: list[float],
             layer_regex: str | None, base: Path | None = None, target: Path | None = None,
             base_model: Path | None = None) -> Inputs:
    """``Inputs`` for loaded adapters: labels, the block of every module (instruction's too), once,
    and the base model's weights (``base_model``, else the fold's ``base``) for full trained parameters
    and DoRA modules; a DoRA input without either is refused."""
    base_model = base_model or base
    scored = [*tasks, *([instruction] if isinstance(instruction, Adapter) else [])]
    dora = [adapter for adapter in scored if is_dora(adapter)]
    if dora and base_model is None:
        raise LataError(f"{dora[0].path}: a DoRA adapter (use_dora): its task vector m (W + sBA) / ||W + sBA|| - W "
                        "needs the base model's weights W; pass --base BASE")
    blocks: dict[str, int | None] = {}
    for adapter in scored:
        try:
            blocks.update(blocks_of([name for name in adapter.modules if name not in blocks], layer_regex))
        except LataError as exc:  # name the adapter whose module has no block index
            raise LataError(f"{adapter.path}: {exc}") from None
    blocks = dict(sorted(blocks.items()))
    needs_base = any(adapter.full for adapter in scored) or bool(dora)
    base_weights = BaseWeights(base_model) if base_model is not None and needs_base else None
    return Inputs(tasks, labels_of(tasks), signs, scales, instruction, blocks, base, target, base_weights, base_model)


def is_dora(adapter: Adapter) -> bool:
    """True when any module of ``adapter`` is DoRA (its task vector needs the base weights)."""
    return any(module.magnitude is not None for module in adapter.modules.values())


def load(spec: CombineSpec) -> Inputs:
    """Resolve the base and the output (refused before anything is read), then load every input."""
    sources = [*spec.adapters, *spec.forget]
    base = resolve_model(spec.fold_into) if spec.fold_into is not None else None
    base_model = resolve_model(spec.base) if spec.base is not None else None
    protected = [Path(s) for s in [*sources, *([spec.instruction] if spec.instruction else []),
                                   *(spec.instruction_from or ())] if Path(s).exists()]
    protected += [path for path in (base, base_model) if path is not None]
    target = None
    if spec.out is not None and not spec.dry_run:
        target = prepare_output(Path(spec.out), protected, spec.overwrite)
    tasks, instruction = load_inputs(sources, spec, spec.allow_pickle)
    signs = [1.0] * len(spec.adapters) + [-1.0] * len(spec.forget)
    return assemble(tasks, instruction, signs, spec.input_weights(), spec.layer_regex, base, target, base_model)


def check(inputs: Inputs, strict: bool = False) -> None:
    """Same base model (``strict``: refuse, else warn) and the same shape for every shared module; with a base
    model (``--base`` or the fold's), no adapted module's base weight has another shape (and a fold's base has
    every one)."""
    instruction = [inputs.instruction] if isinstance(inputs.instruction, Adapter) else []
    adapters = [*inputs.tasks, *instruction]
    check_compatible(adapters, strict=strict)
    if inputs.base_model is not None:
        base = inputs.base_weights or BaseWeights(inputs.base_model)
        check_against_base(adapters, base, folding=inputs.base is not None)


def score(inputs: Inputs, granularity: str, device: str = "cpu") -> dict[str, list[LayerScore]]:
    """Per input label: the cosine of each unit (block or module) with the instruction vector (whose
    norms are computed once for all the labels), computed on ``device`` (``cpu``, ``cuda`` or ``auto``)."""
    assert inputs.instruction is not None, "the spec requires an instruction vector for LATA"
    instruction_squares: dict[str, float] = {}
    where = resolve_device(device)
    return {label: score_layers(task, inputs.instruction, granularity, blocks=inputs.blocks, base=inputs.base_weights,
                                instruction_squares=instruction_squares, device=where)
            for label, task in zip(inputs.labels, inputs.tasks, strict=True)}


def weight(scores: dict[str, list[LayerScore]], spec: ScoringSpec) -> LayerWeights:
    """The scheme's weight per unit (every scheme's beside it, for the report)."""
    return weigh(scores, spec.weighting, spec.granularity)


def merge(inputs: Inputs, weights: LayerWeights | None, spec: CombineSpec, progress: Progress | None) -> Combination:
    """``c_{t,m} = lambda * sign_t * w_t * l_{t,m}`` per input and module, merged by the spec's method; under
    ``convention=mergekit``, ``c_{t,m} = sign_t * w_t * l_{t,m}`` and the merge times lambda, as mergekit does."""
    density, seed, sign_method = spec.run_options
    # mergekit's convention scales by lambda after its merge (a lambda inside the weights cancels in ``normalize``)
    bound = spec.merge_method
    after = spec.lam if bound.signed and spec.lam != 0.0 else 1.0
    merge_method = bound.scaled_after(after)

    def coefficient(index: int, module: str) -> float:
        block = inputs.blocks[module] if module in inputs.blocks else safe_block(module)
        layer = weights.weight(inputs.labels[index], module, block) if weights is not None else 1.0
        return spec.lam / after * inputs.signs[index] * inputs.scales[index] * layer

    names = {name for task in inputs.tasks for name in task.modules}
    if progress is not None:
        progress.start(len(names), f"combining ({spec.method})")
    combination = combine_modules(
        inputs.tasks, coefficient, merge_method, spec.rank_policy, density=density, seed=seed,
        sign_method=sign_method, blocks=inputs.blocks,
        on_module=(lambda _: progress.advance()) if progress is not None else None,
        base=inputs.base_weights, keep_exact=inputs.base is not None, space=spec.space,
        device=resolve_device(spec.device),
    )
    combination.full = combine_full([(task.path, task.full) for task in inputs.tasks], coefficient,
                                    vector_method(merge_method), inputs.base_weights, density, seed, sign_method)
    _warn_if_lossy(spec, combination)
    return combination


def _warn_if_lossy(spec: CombineSpec, combination: Combination) -> None:
    """Say loudly what ``--rank exact`` lost when a full-space element-wise merge was factored back."""
    lost = combination.max_relative_error
    if spec.space == "full" and not spec.merge_method.factored and spec.rank_policy.mode == "exact" and lost > 1e-6:
        warnings.warn(f"--space full: the dense {spec.method} result was factored back to the sum of the input "
                      f"ranks and lost up to {lost:.1%} of a module (relative error, per module in the report); "
                      "--space core merges exactly", stacklevel=2)
