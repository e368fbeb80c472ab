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
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["METHODS", "METHOD_NAMES", "SIGN_METHODS", "Method", "merge_terms", "module_generator"]

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


def _magnitude(deltas, weights, density, generator, sign_method):
    return _weighted(trim_by_magnitude(deltas, density), weights).sum(0)


def _ties(deltas, weights, density, generator, sign_method):
    return elect_and_merge(trim_by_magnitude(deltas, density), weights, sign_method)


def _dare(deltas, weights, density, generator, sign_method):
    return _weighted(drop_and_rescale(deltas, density, generator), weights).sum(0)


def _dare_ties(deltas, weights, density, generator, sign_method):
    return elect_and_merge(drop_and_rescale(deltas, density, generator), weights, sign_method)


@dataclass(frozen=True)
class Method:
    """A merge method. ``dense is None`` means exact factored task arithmetic."""

    name: str
    dense: DenseMerge | None
    description: str

    @property
    def factored(self) -> bool:
        return self.dense is None


METHODS: dict[str, Method] = {
    "ta": Method("ta", None, "task arithmetic: exact factored weighted sum"),
    "magnitude": Method("magnitude", _magnitude, "magnitude pruning of each task vector, then weighted sum"),
    "ties": Method("ties", _ties, "TIES: trim, elect sign, disjoint mean"),
    "dare": Method("dare", _dare, "DARE: random drop and rescale, then weighted sum"),
    "dare_ties": Method("dare_ties", _dare_ties, "DARE drop and rescale, then TIES sign election"),
}


METHOD_NAMES = ("lata", *METHODS)  # ``lata``: task arithmetic with LATA layer weights
SIGN_METHODS = ("total", "frequency")


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
    deltas = torch.stack([tau if c >= 0 else -tau for c, tau in terms])
    weights = torch.tensor([abs(c) for c, _ in terms], dtype=deltas.dtype)
    return method.dense(deltas, weights, density, generator, sign_method)
