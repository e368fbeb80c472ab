"""Per-layer alignment of a task adapter with the instruction adapter (LATA's score).

``cos_l = <tau_l, iota_l> / (|tau_l| |iota_l|)`` where ``tau_l`` / ``iota_l`` are the
task / instruction deltas of every parameter of block ``l`` flattened together
(Chen et al. 2025, arXiv 2502.20186, sec. 3), so ``<tau_l, iota_l> = sum_p <tau_p, iota_p>``
over the parameters ``p`` both sides change, and a parameter changed on one side only adds
to that side's norm and nothing to the inner product.

* LoRA modules (parameter ``<module>.weight``): inner products on the factors
  (:func:`lata_peft.lowrank.inner`), never forming ``B @ A``.
* With the base model's weights (``--base``), also the dense task vectors: DoRA modules
  (``m (W + sBA) / ||W + sBA|| - W``, :mod:`lata_peft.dora`) and full trained parameters
  (``modules_to_save``, trained biases: ``saved - base``) of the block; a dense delta meets a
  factored one through ``<s B A, D> = s sum((B^T D) * A)`` and another dense one element-wise.
  Each is formed one parameter at a time. Without the base, full parameters are not scored and a
  DoRA module can't be (refused).

Modules outside the blocks (embeddings, heads) are not scored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch

from .adapter import Adapter, LoraModule
from .errors import LataError
from .full_weights import BaseWeights, parameter_module
from .instruction import DenseInstruction, inner_dense
from .layers import group_by_block, safe_block
from .lowrank import LowRank, cosine_from, inner, serial

__all__ = ["LayerScore", "module_norm", "score_layers"]

Delta = LowRank | torch.Tensor
"""One parameter's task vector: factored, or dense (weight space for a module, the tensor's shape else)."""
Unit = tuple[int, str | None]
"""A scored unit: ``(block, None)``, or ``(block, module)`` at module granularity."""
Deltas = dict[str, Callable[[], Delta]]
"""A unit's parameters, by model parameter name, each formed when asked for."""


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


def _inner(x: Delta, y: Delta) -> float:
    """Frobenius inner product of two task vectors of one parameter, factored where possible."""
    if isinstance(x, LowRank) and isinstance(y, LowRank):
        return inner(x, y)
    if isinstance(x, LowRank):
        return inner_dense(x, y.reshape(x.shape))
    if isinstance(y, LowRank):
        return inner_dense(y, x.reshape(y.shape))
    return float(torch.sum(x.double() * y.double().reshape(x.shape)))


def _squared(x: Delta) -> float:
    """``|x|_F^2``."""
    return inner(x, x) if isinstance(x, LowRank) else float(x.double().square().sum())


def _module_delta(adapter: Adapter, module: LoraModule, base: BaseWeights | None) -> Callable[[], Delta]:
    """The module's task vector: its factors, or (DoRA) the dense one from the base weight."""
    if not module.needs_base:
        return lambda: module.delta
    if base is None:
        raise LataError(f"{adapter.path}: DoRA module {module.name} can't be scored without the base model's "
                        "weights; pass --base BASE")

    def dense() -> torch.Tensor:
        weight = base.module_weight(module.name, module.delta.shape)
        try:
            return module.task_vector(weight)
        except LataError as exc:
            raise LataError(f"{adapter.path}: {exc}") from None

    return dense


def _full_delta(adapter: Adapter, name: str, saved: torch.Tensor, base: BaseWeights) -> Callable[[], Delta]:
    """``saved - base`` of a full trained parameter (as ``full_weights.combine_full`` takes it)."""

    def dense() -> torch.Tensor:
        reference = base.get(name)
        if reference is None or reference.shape != saved.shape:
            found = "not in" if reference is None else f"{tuple(reference.shape)} in"
            raise LataError(f"{adapter.path}: its trained {name} {tuple(saved.shape)} is {found} the base "
                            f"{base.folder}, so it has no task vector to score")
        return saved.double() - reference.double()

    return dense


def _units(adapter: Adapter, granularity: str, layer_regex: str | None, blocks: Mapping[str, int | None] | None,
           base: BaseWeights | None) -> dict[Unit, Deltas]:
    """Every scored unit of ``adapter`` and its parameters: LoRA / DoRA modules in the adapter's order,
    then (with ``base``) full trained parameters; units in block order."""
    units: dict[Unit, Deltas] = {}

    def add(block: int | None, module: str, key: str, delta: Callable[[], Delta]) -> None:
        if block is not None:
            units.setdefault((block, module if granularity == "module" else None), {})[key] = delta

    for block, names in group_by_block(adapter.modules, layer_regex, blocks).items():
        for name in names:
            if block is not None:
                add(block, name, f"{name}.weight", _module_delta(adapter, adapter.modules[name], base))
    if base is not None:
        for name, (_, saved) in adapter.full.items():
            module = parameter_module(name)
            block = blocks[module] if blocks is not None and module in blocks else safe_block(module)
            add(block, module, name, _full_delta(adapter, name, saved, base))
    return dict(sorted(units.items(), key=lambda item: item[0][0]))  # stable: adapter order within a block


def _cosine(task: Deltas, instruction: Deltas, instruction_squares: dict[str, float] | None = None,
            device: torch.device | str = "cpu") -> tuple[float, float, float]:
    """``(|tau|, |iota|, cos)`` of one unit, computed on ``device``; each dense delta is formed once.
    ``instruction_squares``: the instruction's ``|iota_p|^2`` by parameter, filled here and reused for the
    next task adapter."""
    dot = task_sq = instruction_sq = 0.0
    squares = {} if instruction_squares is None else instruction_squares
    for key, task_delta in task.items():
        x = task_delta().to(device)
        task_sq += _squared(x)
        if key in instruction:
            y = instruction[key]().to(device)
            dot += _inner(x, y)
            if key not in squares:
                squares[key] = _squared(y)
    for key, instruction_delta in instruction.items():
        if key not in squares:
            squares[key] = _squared(instruction_delta().to(device))
        instruction_sq += squares[key]
    task_norm, instruction_norm = task_sq**0.5, instruction_sq**0.5
    return task_norm, instruction_norm, cosine_from(dot, task_norm, instruction_norm)


class _DenseSide:
    """The instruction vector of two full models, read for the parameters a task unit holds."""

    def __init__(self, task: Adapter, instruction: DenseInstruction) -> None:
        self.task, self.instruction = task, instruction
        self._models: tuple[BaseWeights, BaseWeights] | None = None

    def deltas(self, unit: Deltas) -> Deltas:
        return {key: self._delta(key) for key in unit}

    def _delta(self, key: str) -> Callable[[], Delta]:
        module = self.task.modules.get(key.removesuffix(".weight"))
        if key.endswith(".weight") and module is not None:
            return lambda: self.instruction.delta(module.name, module.delta.shape)
        return lambda: self._parameter(key)

    def _parameter(self, name: str) -> torch.Tensor:
        """``instruct - base`` of a full parameter (a head, a bias, a norm weight)."""
        if self._models is None:
            self._models = (BaseWeights(self.instruction.instruct), BaseWeights(self.instruction.base))
        instruct, base = (model.get(name) for model in self._models)
        if instruct is None or base is None:
            folder = self.instruction.instruct if instruct is None else self.instruction.base
            raise LataError(f"{folder}: has no weight {name} that the task adapter trains")
        return instruct.double() - base.double()


def score_layers(
    task: Adapter,
    instruction: Adapter | DenseInstruction,
    granularity: str = "block",
    layer_regex: str | None = None,
    blocks: Mapping[str, int | None] | None = None,
    base: BaseWeights | None = None,
    instruction_squares: dict[str, float] | None = None,
    device: torch.device | str = "cpu",
) -> list[LayerScore]:
    """Cosine of ``task`` with ``instruction`` per block (or per module), in block order.

    ``instruction`` is an adapter, or a :class:`DenseInstruction` (instruct minus base
    model), of which only the parameters the task adapter trains are read. Modules outside
    the blocks (embeddings, heads) are not scored. ``blocks`` (module -> block) replaces
    ``layer_regex`` when the caller has computed it. ``base`` (the base model's weights) adds
    DoRA modules and full trained parameters to their blocks (module docstring). Pass the same
    ``instruction_squares`` dict for every task adapter scored against one instruction: its norms are
    then computed once. ``device``: where the products are computed (the deltas are formed on the CPU).
    """
    task_units = _units(task, granularity, layer_regex, blocks, base)
    dense = isinstance(instruction, DenseInstruction) or (base is not None and any(
        module.needs_base for adapter in (task, instruction) for module in adapter.modules.values()))
    # factored products are (r x r): one thread; dense (out x in) work keeps torch's threads
    with nullcontext() if dense else serial():
        if isinstance(instruction, DenseInstruction):
            side = _DenseSide(task, instruction)
            pairs = [(unit, deltas, side.deltas(deltas)) for unit, deltas in task_units.items()]
        else:
            instruction_units = _units(instruction, granularity, layer_regex, blocks, base)
            pairs = [(unit, deltas, instruction_units.get(unit, {})) for unit, deltas in task_units.items()]
        return [LayerScore(unit[0], unit[1], *_cosine(deltas, other, instruction_squares, device))
                for unit, deltas, other in pairs]


def module_norm(adapter: Adapter, name: str, base: BaseWeights | None = None) -> float:
    """``|dW|_F`` of one module's task vector: on the factors, or dense (DoRA, with ``base``)."""
    return max(_squared(_module_delta(adapter, adapter.modules[name], base)()), 0.0) ** 0.5
