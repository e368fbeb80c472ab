"""Per-layer alignment of a task adapter with the instruction adapter (LATA's score).

``cos_l = <tau_l, iota_l> / (|tau_l| |iota_l|)`` where ``tau_l`` / ``iota_l`` are the
task / instruction deltas of every module of block ``l`` flattened together
(Chen et al. 2025, arXiv 2502.20186, sec. 3). Inner products are taken on the factors
(:func:`lata_peft.lowrank.inner`); a module adapted on one side only adds to that
side's norm and nothing to the inner product.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass

from .adapter import Adapter
from .instruction import DenseInstruction, inner_dense
from .layers import group_by_block
from .lowrank import cosine_from, inner, serial

__all__ = ["LayerScore", "score_layers"]


@dataclass(frozen=True)
class LayerScore:
    """One scored unit: a block (``layer``) or, at module granularity, one module of it."""

    layer: int | None
    module: str | None
    norm: float
    instruction_norm: float
    cosine: float

    def to_dict(self) -> dict:
        return asdict(self)


def _score(task: Adapter, instruction: Adapter, names: list[str], instruction_names: list[str]) -> tuple[float, ...]:
    dot = sum(
        inner(task.modules[n].delta, instruction.modules[n].delta) for n in names if n in instruction.modules
    )
    task_norm = sum(inner(task.modules[n].delta, task.modules[n].delta) for n in names) ** 0.5
    instruction_norm = sum(
        inner(instruction.modules[n].delta, instruction.modules[n].delta) for n in instruction_names
    ) ** 0.5
    return task_norm, instruction_norm, cosine_from(dot, task_norm, instruction_norm)


def _score_dense(task: Adapter, instruction: DenseInstruction, names: list[str]) -> tuple[float, ...]:
    """As :func:`_score`, the instruction side dense (two full models), read one module at a time."""
    dot = task_sq = instruction_sq = 0.0
    for name in names:
        delta = task.modules[name].delta
        dense = instruction.delta(name, delta.shape)
        dot += inner_dense(delta, dense)
        task_sq += inner(delta, delta)
        instruction_sq += float(dense.square().sum())
    task_norm, instruction_norm = task_sq**0.5, instruction_sq**0.5
    return task_norm, instruction_norm, cosine_from(dot, task_norm, instruction_norm)


def score_layers(
    task: Adapter,
    instruction: Adapter | DenseInstruction,
    granularity: str = "block",
    layer_regex: str | None = None,
    blocks: Mapping[str, int | None] | None = None,
) -> list[LayerScore]:
    """Cosine of ``task`` with ``instruction`` per block (or per module), in block order.

    ``instruction`` is an adapter, or a :class:`DenseInstruction` (instruct minus base
    model), of which only the modules the task adapter targets are read. Modules outside
    the blocks (embeddings, heads) are not scored. ``blocks`` (module -> block) replaces
    ``layer_regex`` when the caller has computed it.
    """
    # factored products are (r x r): one thread; the dense (out x in) path keeps torch's threads
    with serial() if isinstance(instruction, Adapter) else nullcontext():
        return _score_all(task, instruction, granularity, layer_regex, blocks)


def _score_all(
    task: Adapter, instruction: Adapter | DenseInstruction, granularity: str, layer_regex: str | None,
    blocks: Mapping[str, int | None] | None,
) -> list[LayerScore]:
    task_blocks = group_by_block(task.modules, layer_regex, blocks)
    if isinstance(instruction, DenseInstruction):
        scores = []
        for layer, names in task_blocks.items():
            if layer is None:
                continue
            units = [[name] for name in names] if granularity == "module" else [names]
            for unit in units:
                task_norm, instruction_norm, cosine = _score_dense(task, instruction, unit)
                module = unit[0] if granularity == "module" else None
                scores.append(LayerScore(layer, module, task_norm, instruction_norm, cosine))
        return scores
    instruction_blocks = group_by_block(instruction.modules, layer_regex, blocks)
    scores: list[LayerScore] = []
    for layer, names in task_blocks.items():
        if layer is None:
            continue
        if granularity == "module":
            for name in names:
                task_norm, instruction_norm, cosine = _score(task, instruction, [name], [name])
                scores.append(LayerScore(layer, name, task_norm, instruction_norm, cosine))
        else:
            task_norm, instruction_norm, cosine = _score(task, instruction, names, instruction_blocks.get(layer, []))
            scores.append(LayerScore(layer, None, task_norm, instruction_norm, cosine))
    return scores

