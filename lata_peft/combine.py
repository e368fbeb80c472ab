"""Coefficients x deltas -> one factored adapter, under a rank policy, with an error report.

Per module ``m``: ``dW_m = sum_t c_{t,m} dW_{t,m}`` where the API computes the
coefficients (``lambda * w_t``, negated for forgotten adapters, times LATA's layer weight).
Task arithmetic stays factored (exact concatenation, optionally truncated with its
exact error); element-wise methods form the dense deltas of this module only, merge,
and factor back (truncated SVD) with the error reported. A module that any input adapts
with DoRA takes the dense path whatever the method: its task vector
``m (W + sBA) / ||W + sBA|| - W`` (:mod:`lata_peft.dora`) needs the base weight ``W`` and is not
low rank; plain LoRA inputs of that module add their dense ``s B A``. The written module is plain
LoRA (the factor-back error reported); the exact merge stays on it for a fold
(:attr:`~lata_peft.adapter.LoraModule.exact`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .adapter import Adapter, LoraModule
from .errors import LataError
from .full_weights import BaseWeights, FullCombination
from .layers import block_index
from .lowrank import LowRank, factorize, serial, truncate, weighted_sum
from .methods import Method, merge_terms, module_generator, vector_method

__all__ = ["Combination", "ModuleReport", "RankPolicy", "combine"]


@dataclass(frozen=True)
class RankPolicy:
    """``exact`` (no loss: rank = sum of input ranks), ``K`` (at most K), ``energy:F`` (keep F of sum S^2).

    For element-wise methods ``exact`` keeps rank ``sum r_t`` and reports the error of that truncation.
    """

    mode: str = "exact"
    rank: int | None = None
    energy: float | None = None

    @classmethod
    def parse(cls, text: str | int) -> RankPolicy:
        text = str(text).strip().lower()
        if text == "exact":
            return cls()
        if text.isdigit() and int(text) > 0:
            return cls("fixed", rank=int(text))
        match = re.fullmatch(r"energy:(0?\.\d+|1(?:\.0*)?)", text)
        if match and 0.0 < float(match[1]) <= 1.0:
            return cls("energy", energy=float(match[1]))
        raise LataError(f"--rank {text!r}: expected 'exact', a positive integer, or 'energy:F' with 0 < F <= 1")

    def __str__(self) -> str:
        return {"exact": "exact", "fixed": str(self.rank), "energy": f"energy:{self.energy}"}[self.mode]


@dataclass(frozen=True)
class ModuleReport:
    """What happened to one module: ranks in and out, and the exact truncation error."""

    module: str
    block: int | None
    input_ranks: list[int]
    coefficients: list[float]
    rank: int
    error: float
    relative_error: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Combination:
    """The combined LoRA modules, their reports, and the combined full trained parameters."""

    modules: dict[str, LoraModule]
    reports: list[ModuleReport]
    full: FullCombination = field(default_factory=FullCombination)

    @property
    def max_relative_error(self) -> float:
        return max((r.relative_error for r in self.reports), default=0.0)

    @property
    def parameters(self) -> int:
        """Factor entries written: ``sum_m (out_m + in_m) * r_m``."""
        return sum(sum(m.delta.shape) * m.delta.rank for m in self.modules.values())


def _combine_factored(terms: list[tuple[float, LowRank]], policy: RankPolicy) -> tuple[LowRank, float, float]:
    exact = weighted_sum(terms)
    if policy.mode == "exact":
        return exact, 0.0, 0.0
    result = truncate(exact, rank=policy.rank, energy=policy.energy)
    total = float(result.singular_values.double().square().sum().sqrt())
    return result.delta, result.error, result.error / total if total else 0.0


def _factor_back(merged: torch.Tensor, ranks: list[int], policy: RankPolicy) -> tuple[LowRank, float, float]:
    """A dense merged delta as LoRA factors: rank ``sum r_t`` for ``exact``, else the policy's; exact error."""
    rank = sum(ranks) if policy.mode == "exact" else policy.rank
    result = factorize(merged, rank=rank, energy=policy.energy)
    total = float(merged.double().norm())
    return result.delta, result.error, result.error / total if total else 0.0


def _combine_dense(
    terms: list[tuple[float, LowRank]], method: Method, policy: RankPolicy, density: float, seed: int, name: str,
    sign_method: str, space: str = "full",
) -> tuple[LowRank, float, float]:
    """An element-wise method on one module: on its core matrices (``space="core"``, exact, Panariello et al.
    2025, :mod:`lata_peft.core_space`) or on its dense deltas, factored back (``"full"``, as PEFT and mergekit)."""
    if space == "core":
        from .core_space import merge_in_core

        return merge_in_core(terms, method, policy, density, seed, name, sign_method)
    dense = [(c, delta.dense()) for c, delta in terms]  # (out, in) each
    merged = merge_terms(dense, method, density, module_generator(seed, name), sign_method)
    del dense
    return _factor_back(merged, [delta.rank for _, delta in terms], policy)


def dense_merge(live: list[tuple[float, LoraModule]], method: Method, density: float, seed: int, name: str,
                sign_method: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``W -> merge(c_t, tau_t(W))``: the exact merged delta of one module from its base weight ``W``,
    each ``tau_t`` the input's :meth:`~lata_peft.adapter.LoraModule.task_vector` (DoRA's, or ``s B A``)."""

    def merged(weight: torch.Tensor) -> torch.Tensor:
        terms = [(c, module.task_vector(weight)) for c, module in live]  # (out, in) each, fp32
        return merge_terms(terms, method, density, module_generator(seed, name), sign_method).float()

    return merged


def _combine_with_base(
    live: list[tuple[float, LoraModule]], holders: list[Path], weight: torch.Tensor | None, method: Method,
    policy: RankPolicy, options: tuple[float, int, str], name: str,
) -> tuple[LowRank, float, float, Callable[[torch.Tensor], torch.Tensor]]:
    """A module some input adapts with DoRA: its exact dense merge from the base ``weight``, factored back."""
    if weight is None:
        raise LataError(f"{holders[0]}: DoRA module {name} needs the base model's weights: pass --base BASE")
    density, seed, sign_method = options
    exact = dense_merge(live, method, density, seed, name, sign_method)
    try:
        merged = exact(weight)
    except LataError as exc:  # e.g. a zero DoRA norm: name the adapter
        raise LataError(f"{holders[0]}: {exc}") from None
    delta, error, relative = _factor_back(merged, [module.delta.rank for _, module in live], policy)
    return delta, error, relative, exact


def _combine_biases(live: list[tuple[float, LoraModule]], method: Method, density: float, seed: int, name: str,
                    sign_method: str) -> torch.Tensor | None:
    """The ``lora_bias`` deltas merged like the weights (inputs without one contribute zeros)."""
    biases = [module.bias for _, module in live if module.bias is not None]
    if not biases:
        return None
    terms = [(c, module.bias if module.bias is not None else torch.zeros_like(biases[0])) for c, module in live]
    return merge_terms(terms, method, density, module_generator(seed, f"{name}.bias"), sign_method)


def combine(
    adapters: Sequence[Adapter],
    coefficient: Callable[[int, str], float],
    method: Method,
    policy: RankPolicy = RankPolicy(),
    density: float = 0.5,
    seed: int = 0,
    sign_method: str = "total",
    blocks: Mapping[str, int | None] | None = None,
    on_module: Callable[[str], None] | None = None,
    base: BaseWeights | None = None,
    keep_exact: bool = False,
    space: str = "full",
    device: torch.device | str = "cpu",
) -> Combination:
    """Combine every module adapted by any input into one factored module.

    ``coefficient(t, module)`` is the signed weight of adapter ``t`` on ``module``; terms
    with weight 0 are skipped, and a module whose terms are all 0 is not written.
    ``blocks`` maps each module to its block (for the report). ``base`` reads the base weight of
    the modules whose task vector needs it (DoRA); ``keep_exact`` keeps their exact merge on the
    written module for a fold. ``space``: where element-wise methods merge (``core`` or ``full``).
    ``device``: where each module's maths runs (its factors moved there and the result back to the CPU;
    modules that need the base weight, DoRA's, are merged on the CPU).
    """
    grouped = _by_module(adapters)
    with_base = {name for name, inputs in grouped.items() if any(m.needs_base for _, m in inputs)}
    modules: dict[str, LoraModule] = {}
    reports: list[ModuleReport] = []
    with serial() if method.factored and not with_base else nullcontext():
        for name, inputs in grouped.items():
            live = [(c, module) for index, module in inputs if (c := coefficient(index, name)) != 0.0]
            terms = [(c, module.delta.to(device)) for c, module in live]
            if terms:
                exact = None
                if name in with_base:
                    holders = [adapters[index].path for index, module in inputs if module.needs_base]
                    weight = base.module_weight(name, inputs[0][1].delta.shape) if base is not None else None
                    delta, error, relative, exact = _combine_with_base(
                        live, holders, weight, method, policy, (density, seed, sign_method), name)
                elif method.factored:
                    with serial() if with_base else nullcontext():  # the run as a whole could not be serial
                        delta, error, relative = _combine_factored(terms, policy)
                else:
                    delta, error, relative = _combine_dense(terms, method, policy, density, seed, name, sign_method,
                                                            space)
                delta = delta.to("cpu")
                template = inputs[0][1]
                bias = _combine_biases(live, vector_method(method), density, seed, name, sign_method)
                modules[name] = LoraModule(name, delta, template.kind, template.a_shape, template.b_shape, bias,
                                           exact=exact if keep_exact else None)
                block = blocks.get(name) if blocks is not None else block_index(name)
                reports.append(ModuleReport(name, block, [d.rank for _, d in terms], [c for c, _ in terms],
                                            delta.rank, error, relative))
            if on_module is not None:
                on_module(name)
    if not modules:
        raise LataError("every coefficient is zero: nothing to write")
    return Combination(modules, reports)


def _by_module(adapters: Sequence[Adapter]) -> dict[str, list[tuple[int, LoraModule]]]:
    """``{module: [(input index, its LoraModule), ...]}`` in module-name order, built in one pass."""
    grouped: dict[str, list[tuple[int, LoraModule]]] = {}
    for index, adapter in enumerate(adapters):
        for name, module in adapter.modules.items():
            grouped.setdefault(name, []).append((index, module))
    return dict(sorted(grouped.items()))
