"""Merge methods: task arithmetic (factored, exact) and the element-wise baselines.

Element-wise methods see the dense deltas of one module at a time, stacked as
``deltas`` (k, out, in) fp32, with per-adapter ``weights`` (k,). A forgotten adapter
enters with its delta negated and a positive weight, so sign election sees the
direction that is actually applied.

* TA, Ilharco et al. 2023 (arXiv 2212.04089): ``sum_t w_t tau_t``.
* magnitude: keep the top ``density`` fraction of each ``tau_t`` by |value|, then TA.
* TIES, Yadav et al. 2023 (arXiv 2306.01708): trim (magnitude, ``density``), elect the
  sign per entry (``sign(sum_t trimmed_t)``, "total"; or the most frequent sign,
  "frequency"), disjoint mean ``sum_t w_t tau_t [agree] / max(1, #agree)``.
* DARE, Yu et al. 2024 (arXiv 2311.03099): drop each entry with probability
  ``1 - density``, rescale survivors by ``1 / density``, then TA (``dare``) or
  TIES' sign election and disjoint mean (``dare_ties``). Seeded per module.

These follow ``peft.utils.merge_utils`` (the tests check agreement on the same tensors),
with an explicit ``torch.Generator`` so DARE is deterministic.

Subspace methods (:mod:`lata_peft.subspace_methods`, core space only): ``tsv`` (TSV-Merge,
Gargiulo et al. 2025), ``iso_c`` and ``iso_cts`` (Marczak et al. 2025). A method declares its own
parameters (:class:`MethodParam`): the CLI's ``--param NAME=VALUE``, the API's and the recipe's
``params`` and the report all read them from this registry.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch

__all__ = ["METHODS", "METHOD_NAMES", "SIGN_METHODS", "SPACES", "Method", "MethodParam", "merge_terms",
           "module_generator", "parse_params", "vector_method"]

DenseMerge = Callable[[torch.Tensor, torch.Tensor, float, torch.Generator, str], torch.Tensor]


def _weighted(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return deltas * weights.view(-1, *([1] * (deltas.ndim - 1)))  # (k, out, in)


def trim_by_magnitude(deltas: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` largest-|value| entries of each ``deltas[t]``."""
    if density >= 1.0:
        return deltas
    flat = deltas.reshape(deltas.shape[0], -1)  # (k, out*in)
    keep = int(density * flat.shape[1])
    mask = torch.zeros_like(flat)
    if keep > 0:
        mask.scatter_(1, flat.abs().topk(keep, dim=1).indices, 1.0)
    return (flat * mask).reshape(deltas.shape)


def drop_and_rescale(deltas: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: Bernoulli(``density``) mask per entry, survivors divided by ``density``."""
    if density >= 1.0:
        return deltas
    kept = torch.stack(
        [d * torch.bernoulli(torch.full_like(d, density), generator=generator) for d in deltas]
    )
    return kept / density


def elect_and_merge(deltas: torch.Tensor, weights: torch.Tensor, sign_method: str) -> torch.Tensor:
    """TIES: majority sign per entry from the unweighted deltas, then the disjoint mean."""
    signs = deltas.sign()
    votes = deltas.sum(0) if sign_method == "total" else signs.sum(0)
    majority = torch.where(votes >= 0, 1.0, -1.0)
    agree = signs == majority  # (k, out, in)
    total = (_weighted(deltas, weights) * agree).sum(0)
    return total / agree.sum(0).clamp(min=1)


def _ties_mergekit(deltas, weights, density, generator, sign_method):
    """TIES as mergekit 0.1.5 computes it (``merge_methods/generalized_task_arithmetic.py``, ``merge_group``;
    ``sparsify.magnitude``): keep the ``max(1, int(density n))`` largest |entries| of each ``tau_t``,
    ``X_t = w_t trimmed_t`` with the *signed* weights, majority sign of ``sum_t X_t`` ("total", mergekit's
    ``sum``) or of ``sum_t sign(X_t)`` ("frequency", ``count``), ``mask_t = [sign X_t == majority]``, result
    ``sum_t X_t mask_t / sum_t w_t mask_t`` (a zero divisor counts as 1; mergekit's ``normalize: true``)."""
    flat = deltas.reshape(deltas.shape[0], -1)
    keep = max(1, int(density * flat.shape[1])) if density < 1.0 else flat.shape[1]
    mask = torch.zeros_like(flat)
    mask.scatter_(1, flat.abs().topk(keep, dim=1).indices, 1.0)
    X = _weighted((flat * mask).reshape(deltas.shape), weights)
    signs = X.sign()
    votes = X.sum(0) if sign_method == "total" else signs.sum(0)
    majority = torch.where(votes >= 0, 1.0, -1.0).to(X.dtype)
    agree = (signs == majority).to(X.dtype)
    divisor = _weighted(agree, weights).sum(0)
    divisor[divisor == 0] = 1
    return (X * agree).sum(0) / divisor


_ties_mergekit.signed_weights = True  # type: ignore[attr-defined]


def _ties_by_convention(convention: str = "peft") -> DenseMerge:
    return _ties_mergekit if convention == "mergekit" else _ties


def _magnitude(deltas, weights, density, generator, sign_method):
    return _weighted(trim_by_magnitude(deltas, density), weights).sum(0)


def _ties(deltas, weights, density, generator, sign_method):
    return elect_and_merge(trim_by_magnitude(deltas, density), weights, sign_method)


def _dare(deltas, weights, density, generator, sign_method):
    return _weighted(drop_and_rescale(deltas, density, generator), weights).sum(0)


def _dare_ties(deltas, weights, density, generator, sign_method):
    return elect_and_merge(drop_and_rescale(deltas, density, generator), weights, sign_method)


@dataclass(frozen=True)
class MethodParam:
    """One parameter a method declares: its name, default (``None``: the method's own rule), help, and its
    range (numbers) or ``choices`` (words)."""

    name: str
    default: float | str | None
    help: str
    low: float = 0.0
    high: float = float("inf")
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Method:
    """A merge method. ``dense is None`` means exact factored task arithmetic. ``params``: the parameters
    it takes (bound by :meth:`bind`); ``core_only``: it runs in core space only."""

    name: str
    dense: DenseMerge | None
    description: str
    params: tuple[MethodParam, ...] = ()
    core_only: bool = False
    make: Callable[..., DenseMerge] | None = None
    signed: bool = False
    """The dense rule takes signed weights (``tau_t``, ``c_t``) instead of (``-tau_t``, ``|c_t|``) for ``c_t < 0``."""

    @property
    def factored(self) -> bool:
        return self.dense is None

    def resolved(self, values: Mapping[str, float | str]) -> dict[str, float | str | None]:
        """Every declared parameter: the given value, else its default."""
        return {param.name: values.get(param.name, param.default) for param in self.params}

    def bind(self, values: Mapping[str, float | str]) -> Method:
        """This method with its parameters set (``make(**params)`` builds the dense rule)."""
        if self.make is None:
            return self
        dense = self.make(**self.resolved(values))
        return replace(self, dense=dense, signed=getattr(dense, "signed_weights", False))


METHODS: dict[str, Method] = {
    "ta": Method("ta", None, "task arithmetic: exact factored weighted sum"),
    "magnitude": Method("magnitude", _magnitude, "magnitude pruning of each task vector, then weighted sum"),
    "ties": Method("ties", _ties, "TIES: trim, elect sign, disjoint mean", (
        MethodParam("convention", "peft", "peft: signs elected on unweighted deltas, mean over the agreeing "
                    "count (peft.utils.merge_utils); mergekit: on weighted deltas, divided by the agreeing weights "
                    "(mergekit 0.1.5)", choices=("peft", "mergekit")),), make=_ties_by_convention),
    "dare": Method("dare", _dare, "DARE: random drop and rescale, then weighted sum"),
    "dare_ties": Method("dare_ties", _dare_ties, "DARE drop and rescale, then TIES sign election"),
}


SIGN_METHODS = ("total", "frequency")
SPACES = ("core", "full")


def _register_subspace_methods() -> None:
    from .subspace_methods import RULES, dense_merge

    params = {
        "tsv": (MethodParam("fraction", None, "per-task share of the components kept (default 1/T)", 0.0, 1.0),),
        "iso_c": (MethodParam("alpha", 1.0, "scale of the isotropic merge"),),
        "iso_cts": (MethodParam("alpha", 1.0, "scale of the isotropic merge"),
                    MethodParam("common_fraction", 0.8, "share of the directions in the common subspace", 0.0, 1.0)),
    }
    for name, (_, description) in RULES.items():
        make = functools.partial(dense_merge, name)
        unbound = Method(name, None, description, params[name], core_only=True, make=make)
        METHODS[name] = unbound.bind({})  # at the declared defaults


_register_subspace_methods()
METHOD_NAMES = ("lata", *METHODS)  # ``lata``: task arithmetic with LATA layer weights


def vector_method(method: Method) -> Method:
    """The method for 1-D tensors (biases): subspace methods need matrices, so task arithmetic there (as
    Iso-merging averages non-matrix parameters)."""
    return METHODS["ta"] if method.core_only else method


def parse_params(method: Method, items: Sequence[str]) -> dict[str, float | str]:
    """``["alpha=1.5", ...]`` -> ``{"alpha": 1.5}``, checked against what ``method`` declares."""
    from .errors import LataError

    declared = {param.name: param for param in method.params}
    values: dict[str, float | str] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or name not in declared:
            allowed = ", ".join(declared) or "none"
            raise LataError(f"--param {item!r}: {method.name} takes NAME=VALUE with NAME one of: {allowed}")
        param = declared[name]
        if param.choices:
            if text.strip() not in param.choices:
                raise LataError(f"--param {name}={text}: expected one of {', '.join(param.choices)}")
            values[name] = text.strip()
            continue
        try:
            value = float(text)
        except ValueError:
            raise LataError(f"--param {item!r}: {text!r} is not a number") from None
        if not (param.low <= value <= param.high) or value != value:
            raise LataError(f"--param {name}={text}: expected {param.low:g} <= {name} <= {param.high:g}")
        values[name] = value
    return values


def module_generator(seed: int, module: str) -> torch.Generator:
    """A CPU generator seeded by ``seed`` and the module name: same seed, same masks, any order."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(module.encode()))


def merge_terms(terms: list[tuple[float, torch.Tensor]], method: Method, density: float,
                generator: torch.Generator, sign_method: str) -> torch.Tensor:
    """Merge dense task vectors ``[(c_t, tau_t), ...]`` of one parameter by ``method``.

    Task arithmetic: ``sum_t c_t tau_t``. Element-wise methods: a negative ``c_t`` enters as
    ``-tau_t`` with weight ``|c_t|`` (see the module docstring).
    """
    if method.factored:
        return sum(c * tau for c, tau in terms)
    if method.signed:
        deltas = torch.stack([tau for _, tau in terms])
        weights = torch.tensor([c for c, _ in terms], dtype=deltas.dtype)
    else:
        deltas = torch.stack([tau if c >= 0 else -tau for c, tau in terms])
        weights = torch.tensor([abs(c) for c, _ in terms], dtype=deltas.dtype)
    return method.dense(deltas, weights, density, generator, sign_method)
