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
with an explicit ``torch.Generator`` so DARE is deterministic. ``ties``, ``dare`` and ``dare_ties``
also take ``convention=mergekit``: mergekit 0.1.5's rule (:func:`_mergekit_rule`; signed weights, signs
elected on the weighted deltas, its ``normalize`` and ``rescale`` switches as parameters, DARE's mask
drawn from the same generator), checked against mergekit itself in ``tests/test_mergekit_convention.py``.

mergekit's other sparsifiers, under mergekit's rule only (PEFT has none of them):

* Model Breadcrumbs, Davari & Belilovsky 2024 (arXiv 2312.06795): drop the largest ``gamma`` fraction of each
  ``tau_t``'s entries by |value| (outliers) and the smallest, keeping ``int(density n)``; then a weighted sum
  (``breadcrumbs``) or TIES' sign election (``breadcrumbs_ties``).
* DELLA, Deep et al. 2024 (arXiv 2406.11617), MagPrune: keep each entry with a probability that grows with its
  magnitude rank in its row, from ``density - epsilon`` (smallest) to ``density + epsilon`` (largest), then
  TIES' sign election (``della``) or a weighted sum (``della_linear``). As mergekit 0.1.5 does it, survivors are
  rescaled by the L1-norm ratio (its ``rescale``), not the paper's ``1 / p``.

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

__all__ = ["DENSITY", "METHODS", "METHOD_NAMES", "RUN_PARAMS", "SEED", "SIGN_METHOD", "SIGN_METHODS", "SPACES",
           "Method", "MethodParam", "merge_terms",
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
    """DARE: Bernoulli(``density``) mask per entry, survivors divided by ``density``. The mask is drawn on
    the CPU from ``generator`` (a CPU generator), so a seed gives the same mask on any device."""
    if density >= 1.0:
        return deltas
    kept = torch.stack(
        [d * torch.bernoulli(torch.full(d.shape, density, dtype=d.dtype), generator=generator).to(d.device)
         for d in deltas]
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


def _magnitude_mask(rows: torch.Tensor, density: float, generator: torch.Generator, gamma: float,
                    epsilon: float) -> torch.Tensor:
    """mergekit's ``magnitude``: the ``max(1, int(density n))`` largest |entries| of each task vector.

    Each mask function takes the k task vectors as ``rows`` (k, rows, row length) (a vector is one row) and
    returns the (k, n) 0/1 mask."""
    flat = rows.flatten(1)
    mask = torch.zeros_like(flat)
    return mask.scatter_(1, flat.abs().topk(max(1, int(density * flat.shape[1])), dim=1).indices, 1.0)


def _bernoulli_mask(rows: torch.Tensor, density: float, generator: torch.Generator, gamma: float,
                    epsilon: float) -> torch.Tensor:
    """mergekit's ``bernoulli``: each entry kept with probability ``density``, drawn in float32 (as mergekit does
    on the CPU) from ``generator`` (where mergekit uses torch's global one), one draw per task vector."""
    flat = rows.flatten(1)
    return torch.stack([torch.bernoulli(torch.full(flat.shape[1:], density, dtype=torch.float32),
                                        generator=generator) for _ in flat]).to(flat)


def _outlier_mask(rows: torch.Tensor, density: float, generator: torch.Generator, gamma: float,
                  epsilon: float) -> torch.Tensor:
    """mergekit's ``magnitude_outliers`` (Breadcrumbs): sorted by |value|, the ``int(gamma n)`` largest entries go,
    then the smallest, leaving ``int(density n)`` (fewer outliers go where that many cannot be left)."""
    flat = rows.flatten(1)
    n = flat.shape[1]
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    order = torch.sort(flat.abs().float(), dim=1).indices[:, bottom:bottom + keep]
    return torch.zeros_like(flat).scatter_(1, order, 1.0)


def _della_mask(rows: torch.Tensor, density: float, generator: torch.Generator, gamma: float,
                epsilon: float) -> torch.Tensor:
    """mergekit's ``della_magprune`` (DELLA's MagPrune): in each row of each task vector, ranks ``r`` of |value|
    (1 = smallest) normalised to ``[0, 1]``, keep probability ``density - epsilon + 2 epsilon r_norm``, drawn in
    float32 from ``generator``, one draw per task vector."""
    masks = []
    for tau in rows:
        ranks = tau.abs().argsort(dim=1).argsort(dim=1).to(torch.float32) + 1
        low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
        normalised = ((ranks - low) / (high - low).clamp(min=1)).clamp(0, 1)
        masks.append(torch.bernoulli(density - epsilon + normalised * 2 * epsilon, generator=generator).reshape(-1))
    return torch.stack(masks).to(rows.dtype)


_SPARSIFIERS = {"magnitude": _magnitude_mask, "random": _bernoulli_mask, "magnitude_outliers": _outlier_mask,
                "della_magprune": _della_mask}


def _mergekit_sparsified(deltas: torch.Tensor, density: float, generator: torch.Generator, sparsifier: str,
                         rescale: bool, gamma: float = 0.01, epsilon: float = 0.15) -> torch.Tensor:
    """mergekit 0.1.5's sparsification of each ``tau_t`` (``sparsify.py``) by ``sparsifier``: ``magnitude``,
    ``random`` (its ``bernoulli``), ``magnitude_outliers`` or ``della_magprune`` (see the mask functions).
    ``rescale`` (``rescaled_masked_tensor``, ``RescaleNorm.l1``): the kept entries times ``|tau_t|_1 /
    |kept_t|_1``, left as they are when either norm is below 1e-7. Not ``1 / density``: that is PEFT's DARE."""
    if density >= 1.0:
        return deltas
    flat = deltas.reshape(deltas.shape[0], -1)  # (k, out*in)
    rows = flat.reshape(flat.shape[0], -1, deltas.shape[-1] if deltas.ndim > 1 else 1)  # a vector is one row
    mask = _SPARSIFIERS[sparsifier](rows, density, generator, gamma, epsilon)
    kept = flat * mask
    if rescale:
        before, after = flat.abs().sum(1, keepdim=True), kept.abs().sum(1, keepdim=True)  # (k, 1)
        kept = kept * torch.where((before < 1e-7) | (after < 1e-7), 1.0, before / after)
    return kept.reshape(deltas.shape)


def _mergekit_rule(deltas, weights, density, generator, sign_method, *, sparsifier: str, consensus: bool,
                   normalize: bool, rescale: bool, gamma: float = 0.01, epsilon: float = 0.15):
    """A method as mergekit 0.1.5 computes it (``merge_methods/generalized_task_arithmetic.py``,
    ``GeneralizedTaskArithmeticMerge.merge_group`` and ``get_mask``). ``X_t = w_t sparsified_t`` with the
    *signed* weights (:func:`_mergekit_sparsified`). With ``consensus`` (TIES, DARE-TIES): majority sign of
    ``sum_t X_t`` ("total", mergekit's ``sum``) or of ``sum_t sign(X_t)`` ("frequency", ``count``),
    ``mask_t = [sign X_t == majority]``, merged ``sum_t X_t mask_t``, divisor ``sum_t w_t mask_t`` (0 -> 1).
    Without (DARE, mergekit's ``dare_linear``): merged ``sum_t X_t``, divisor ``sum_t w_t`` (|.| < 1e-8 -> 1).
    ``normalize``: the result is merged / divisor, else merged."""
    X = _weighted(_mergekit_sparsified(deltas, density, generator, sparsifier, rescale, gamma, epsilon), weights)
    if consensus:
        signs = X.sign()
        votes = X.sum(0) if sign_method == "total" else signs.sum(0)
        agree = (signs == torch.where(votes >= 0, 1.0, -1.0).to(X.dtype)).to(X.dtype)  # (k, out, in)
        merged, divisor = (X * agree).sum(0), _weighted(agree, weights).sum(0)
        divisor[divisor == 0] = 1
    else:
        merged, divisor = X.sum(0), weights.sum()
        divisor = divisor if divisor.abs() >= 1e-8 else torch.ones_like(divisor)
    return merged / divisor if normalize else merged


def _by_convention(name: str, peft_rule: DenseMerge, *, sparsifier: str, consensus: bool, default_normalize: bool,
                   default_rescale: bool) -> Callable[..., DenseMerge]:
    """``make`` of a method with both conventions. ``default_normalize``, ``default_rescale``: mergekit's
    defaults for the method (``mergekit/merge_methods/registry.py``)."""

    def make(convention: str = "peft", normalize: str | None = None, rescale: str | None = None) -> DenseMerge:
        if convention == "peft":
            if normalize is not None or rescale is not None:
                from .errors import LataError

                raise LataError(f"{name}: normalize and rescale are mergekit's switches: add --param convention="
                                "mergekit (PEFT's rule has neither: its TIES always divides by the agreeing count, "
                                "its DARE always divides the kept entries by density)")
            return peft_rule
        return _mergekit_make(sparsifier, consensus=consensus, default_normalize=default_normalize,
                              default_rescale=default_rescale)(normalize, rescale)

    return make


def _mergekit_make(sparsifier: str, *, consensus: bool, default_normalize: bool, default_rescale: bool
                   ) -> Callable[..., DenseMerge]:
    """``make`` of a method under mergekit's rule (:func:`_mergekit_rule`); ``default_normalize``,
    ``default_rescale``: mergekit's defaults for it (``mergekit/merge_methods/registry.py``)."""

    def make(normalize: str | None = None, rescale: str | None = None, **sparsifier_params: float) -> DenseMerge:
        rule = functools.partial(_mergekit_rule, sparsifier=sparsifier, consensus=consensus,
                                 normalize=default_normalize if normalize is None else normalize == "true",
                                 rescale=default_rescale if rescale is None else rescale == "true",
                                 **sparsifier_params)
        rule.signed_weights = True  # type: ignore[attr-defined]
        return rule

    return make


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
    default: float | int | str | None
    help: str
    low: float = 0.0
    high: float = float("inf")
    choices: tuple[str, ...] = ()
    integer: bool = False


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
    constraint: Callable[[Mapping[str, float | str | None]], str | None] | None = None
    """What is wrong with a set of resolved parameter values, if anything (one line), or ``None``."""
    signed: bool = False
    """The dense rule takes signed weights (``tau_t``, ``c_t``) instead of (``-tau_t``, ``|c_t|``) for ``c_t < 0``."""

    @property
    def factored(self) -> bool:
        return self.dense is None

    def resolved(self, values: Mapping[str, float | str]) -> dict[str, float | str | None]:
        """Every declared parameter: the given value, else its default."""
        return {param.name: values.get(param.name, param.default) for param in self.params}

    def problem(self, values: Mapping[str, float | str]) -> str | None:
        """What is wrong with these parameter values taken together (``constraint``), or ``None``."""
        return self.constraint(self.resolved(values)) if self.constraint is not None else None

    def scaled_after(self, factor: float) -> Method:
        """This method with its dense result multiplied by ``factor`` (mergekit's ``lambda``, applied after the
        merge and its ``normalize``, where a factor in the weights would cancel)."""
        if factor == 1.0 or self.dense is None:
            return self
        rule = self.dense

        def scaled(*args: object) -> torch.Tensor:
            return factor * rule(*args)

        return replace(self, dense=scaled)

    def bind(self, values: Mapping[str, float | str]) -> Method:
        """This method with its parameters set (``make(**params)`` builds the dense rule)."""
        if self.make is None:
            return self
        dense = self.make(**{name: value for name, value in self.resolved(values).items() if name not in RUN_PARAMS})
        return replace(self, dense=dense, signed=getattr(dense, "signed_weights", False))


DENSITY = MethodParam("density", 0.5, "fraction of each task vector's entries kept (--density)", 0.0, 1.0)
SEED = MethodParam("seed", 0, "DARE's mask seed, mixed with the module name (--seed)", 0.0, 2.0 ** 63 - 1, integer=True)
SIGN_METHOD = MethodParam("sign_method", "total", "TIES sign election: total (sign of the sum) or frequency (the "
                          "most frequent sign) (--sign-method)", choices=("total", "frequency"))
RUN_PARAMS = ("density", "seed", "sign_method")
"""The parameters every element-wise rule takes at run time (``DenseMerge``'s ``density``, generator, ``sign_method``),
not when it is built; ``--density``, ``--seed`` and ``--sign-method`` set them too."""

CONVENTION = MethodParam("convention", "peft", "peft: peft.utils.merge_utils' rule, signs elected on unweighted "
                         "deltas, mean over the agreeing count, DARE rescaled by 1/density; mergekit: mergekit "
                         "0.1.5's, signed weights, signs elected on weighted deltas, then normalize and rescale",
                         choices=("peft", "mergekit"))
NORMALIZE = MethodParam("normalize", None, "mergekit's switch (ties, dare, dare_ties: with convention=mergekit only): "
                        "divide by the sum of the agreeing weights (all weights without sign election); default "
                        "mergekit's: true for ties and della, false for the others", choices=("true", "false"))
RESCALE = MethodParam("rescale", None, "mergekit's switch (ties, dare, dare_ties: with convention=mergekit only): "
                      "scale each sparsified task vector back to its L1 norm; default mergekit's: true for dare, "
                      "dare_ties, della, della_linear, false for ties and breadcrumbs", choices=("true", "false"))
GAMMA = MethodParam("gamma", 0.01, "Breadcrumbs: fraction of each task vector's largest entries dropped as outliers",
                    0.0, 1.0)
EPSILON = MethodParam("epsilon", 0.15, "DELLA: keep probabilities run from density - epsilon (smallest entries) to "
                      "density + epsilon (largest), both strictly between 0 and 1", 0.0, 0.5)


def _epsilon_fits(values: Mapping[str, float | str | None]) -> str | None:
    """DELLA's probabilities ``density -/+ epsilon`` must lie in (0, 1) (mergekit refuses them otherwise)."""
    density, epsilon = float(values["density"] or DENSITY.default), float(values["epsilon"] or 0.0)
    if density < 1.0 and not (0.0 < density - epsilon and density + epsilon < 1.0):
        return (f"epsilon={epsilon:g} with density={density:g}: keep probabilities density -/+ epsilon must lie "
                "strictly between 0 and 1")
    return None


METHODS: dict[str, Method] = {
    "ta": Method("ta", None, "task arithmetic: exact factored weighted sum"),
    "magnitude": Method("magnitude", _magnitude, "magnitude pruning of each task vector, then weighted sum",
                        (DENSITY,)),
    "ties": Method("ties", _ties, "TIES: trim, elect sign, disjoint mean",
                   (DENSITY, SIGN_METHOD, CONVENTION, NORMALIZE, RESCALE),
                   make=_by_convention("ties", _ties, sparsifier="magnitude", consensus=True, default_normalize=True,
                                       default_rescale=False)),
    "dare": Method("dare", _dare, "DARE: random drop and rescale, then weighted sum",
                   (DENSITY, SEED, CONVENTION, NORMALIZE, RESCALE),
                   make=_by_convention("dare", _dare, sparsifier="random", consensus=False, default_normalize=False,
                                       default_rescale=True)),
    "dare_ties": Method("dare_ties", _dare_ties, "DARE drop and rescale, then TIES sign election",
                        (DENSITY, SEED, SIGN_METHOD, CONVENTION, NORMALIZE, RESCALE),
                        make=_by_convention("dare_ties", _dare_ties, sparsifier="random", consensus=True,
                                            default_normalize=False, default_rescale=True)),
    # mergekit's rule only; bound at mergekit's defaults so the entry has its dense rule, as the subspace methods
    "breadcrumbs": Method("breadcrumbs", None, "Model Breadcrumbs: drop outliers and small entries, then weighted sum "
                          "(mergekit's rule)", (DENSITY, GAMMA, NORMALIZE, RESCALE),
                          make=_mergekit_make("magnitude_outliers", consensus=False, default_normalize=False,
                                              default_rescale=False)).bind({}),
    "breadcrumbs_ties": Method("breadcrumbs_ties", None, "Model Breadcrumbs, then TIES sign election (mergekit's rule)",
                               (DENSITY, GAMMA, SIGN_METHOD, NORMALIZE, RESCALE),
                               make=_mergekit_make("magnitude_outliers", consensus=True, default_normalize=False,
                                                   default_rescale=False)).bind({}),
    "della": Method("della", None, "DELLA: magnitude-ranked random drop, then TIES sign election (mergekit's rule)",
                    (DENSITY, EPSILON, SEED, SIGN_METHOD, NORMALIZE, RESCALE),
                    make=_mergekit_make("della_magprune", consensus=True, default_normalize=True, default_rescale=True),
                    constraint=_epsilon_fits).bind({}),
    "della_linear": Method("della_linear", None, "DELLA's magnitude-ranked random drop, then weighted sum "
                           "(mergekit's rule)", (DENSITY, EPSILON, SEED, NORMALIZE, RESCALE),
                           make=_mergekit_make("della_magprune", consensus=False, default_normalize=False,
                                               default_rescale=True), constraint=_epsilon_fits).bind({}),
}


SIGN_METHODS = SIGN_METHOD.choices
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


def parse_params(method: Method, items: Sequence[str]) -> dict[str, float | int | str]:
    """``["alpha=1.5", ...]`` -> ``{"alpha": 1.5}``, checked against what ``method`` declares."""
    from .errors import LataError

    declared = {param.name: param for param in method.params}
    values: dict[str, float | int | str] = {}
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
        if param.integer and not value.is_integer():
            raise LataError(f"--param {name}={text}: expected a whole number")
        values[name] = int(value) if param.integer else value
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
