"""LATA layer-weighting schemes: score per layer -> weight per layer.

Chen et al. 2025 (arXiv 2502.20186) name three schemes but the public text does not give
their formulas; these are our reconstructions, with their parameters exposed. Layers
are ranked by cosine with the instruction vector, ``rho = 0`` for the most
instruction-like of ``L`` layers and ``rho = L - 1`` for the most task-specific:

* ``linear`` (Linear-Drop-by-Rank, used on Gemma-2-9B):
  ``w = low + (high - low) * rho / (L - 1)``
* ``log`` (Logarithmic-Drop-by-Rank, used on Llama-3-8B):
  ``w = low + (high - low) * ln(1 + rho) / ln(L)`` (drops sharply only for the top ranks)
* ``threshold`` (Drop-with-Threshold, used for forgetting):
  ``w = high`` if ``cos < threshold`` else ``low`` (instruction-like layers dropped); with
  ``keep = q`` the threshold is relative instead: the ``round(q * L)`` least instruction-like
  layers get ``high``, the rest ``low`` (the paper reports keeping about 10% of layers at
  0.95; LoRA task vectors are far less aligned than full fine-tunes, so an absolute 0.95 may
  keep every layer).

With ``normalize`` the weights are rescaled to mean 1 over the scored layers, so
task-specific layers are amplified rather than only instruction-like ones attenuated.
Ties in cosine share the mean of their ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

from .errors import LataError
from .scoring import LayerScore

__all__ = ["SCHEMES", "LayerWeighting", "LayerWeights", "WeightedUnit", "layer_weights", "rank_by_alignment", "weigh"]


def rank_by_alignment(cosines: Sequence[float]) -> list[float]:
    """``rho_i``: 0 for the highest cosine, ``L - 1`` for the lowest; ties get their mean rank."""
    order = sorted(range(len(cosines)), key=lambda i: -cosines[i])
    ranks = [0.0] * len(cosines)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and cosines[order[end + 1]] == cosines[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2
        start = end + 1
    return ranks


def _linear(cosines: Sequence[float], low: float, high: float, threshold: float, keep: float | None) -> list[float]:
    count = len(cosines)
    if count == 1:
        return [high]
    return [low + (high - low) * rho / (count - 1) for rho in rank_by_alignment(cosines)]


def _log(cosines: Sequence[float], low: float, high: float, threshold: float, keep: float | None) -> list[float]:
    count = len(cosines)
    if count == 1:
        return [high]
    return [low + (high - low) * math.log1p(rho) / math.log(count) for rho in rank_by_alignment(cosines)]


def _threshold(cosines: Sequence[float], low: float, high: float, threshold: float, keep: float | None) -> list[float]:
    if keep is None:
        return [high if c < threshold else low for c in cosines]
    kept = round(keep * len(cosines))
    order = sorted(range(len(cosines)), key=lambda i: cosines[i])  # least instruction-like first
    chosen = set(order[:kept])
    return [high if i in chosen else low for i in range(len(cosines))]


Scheme = Callable[[Sequence[float], float, float, float, float | None], list[float]]
SCHEMES: dict[str, Scheme] = {"linear": _linear, "log": _log, "threshold": _threshold}
SCHEME_TITLES = {
    "linear": "Linear-Drop-by-Rank",
    "log": "Logarithmic-Drop-by-Rank",
    "threshold": "Drop-with-Threshold",
}


@dataclass(frozen=True)
class LayerWeighting:
    """A LATA scheme and its parameters (see the module docstring for the formulas)."""

    scheme: str = "linear"
    low: float = 0.0
    high: float = 1.0
    threshold: float = 0.95
    normalize: bool = False
    keep: float | None = None

    def __post_init__(self) -> None:
        if self.keep is not None and not 0.0 <= self.keep <= 1.0:
            raise LataError(f"--keep {self.keep}: expected a fraction of layers in [0, 1]")
        if self.scheme not in SCHEMES:
            raise LataError(f"--scheme {self.scheme!r}: expected one of {', '.join(SCHEMES)}")
        if self.low > self.high:
            raise LataError(f"LATA weights: low ({self.low}) must not exceed high ({self.high})")


def layer_weights(cosines: Sequence[float], weighting: LayerWeighting = LayerWeighting()) -> list[float]:
    """One weight per scored layer, in the order of ``cosines``."""
    if not cosines:
        return []
    weights = SCHEMES[weighting.scheme](cosines, weighting.low, weighting.high, weighting.threshold, weighting.keep)
    if weighting.normalize:
        mean = sum(weights) / len(weights)
        weights = [w / mean for w in weights] if mean > 0 else weights
    return weights


@dataclass(frozen=True)
class WeightedUnit:
    """One scored unit (a block, or a module of it) with the chosen scheme's weight and every scheme's."""

    score: LayerScore
    weight: float
    weights: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {**self.score.to_dict(), "weight": self.weight, "weights": self.weights}


@dataclass(frozen=True)
class LayerWeights:
    """LATA's output: per input label, the weight of each scoring unit ``(block, module or None)``.

    A module outside every scored unit (embeddings, heads, blocks the instruction vector lacks)
    keeps weight 1.
    """

    units: dict[str, list[WeightedUnit]]
    granularity: str = "block"

    def weight(self, label: str, module: str, block: int | None) -> float:
        """The LATA weight of ``module`` (in ``block``) for input ``label``; 1 where none applies."""
        unit = (block, module) if self.granularity == "module" else (block, None)
        return self._lookup.get(label, {}).get(unit, 1.0)

    @cached_property
    def _lookup(self) -> dict[str, dict[tuple[int | None, str | None], float]]:
        return {label: {(u.score.layer, u.score.module): u.weight for u in rows} for label, rows in self.units.items()}

    def table(self) -> dict[str, list[dict[str, Any]]]:
        """``{label: [row, ...]}``: what the report and the CLI's per-layer table show."""
        return {label: [u.to_dict() for u in rows] for label, rows in self.units.items()}


def weigh(scores: Mapping[str, Sequence[LayerScore]], weighting: LayerWeighting, granularity: str) -> LayerWeights:
    """Per input: the scheme's weight of each scored unit, and every scheme's weight beside it."""
    units: dict[str, list[WeightedUnit]] = {}
    for label, rows in scores.items():
        cosines = [s.cosine for s in rows]
        every = {name: layer_weights(cosines, replace(weighting, scheme=name)) for name in SCHEMES}
        units[label] = [WeightedUnit(s, every[weighting.scheme][i], {n: every[n][i] for n in SCHEMES})
                        for i, s in enumerate(rows)]
    return LayerWeights(units, granularity)
