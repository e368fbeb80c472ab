"""``--param convention=mergekit`` against mergekit 0.1.5 itself on the same tensors: TIES, DARE (mergekit's
``dare_linear``) and DARE-TIES with weights 1, 3 and 0.5, a negative weight, both sign elections, and every
setting of mergekit's ``normalize`` / ``rescale`` switches; and all three end to end in full space, where
PEFT's merge of our output equals mergekit's method on PEFT's own dense deltas. The default (PEFT) convention
differs from mergekit's once the weights are unequal: both are kept, and the difference is asserted.

mergekit draws DARE's mask from torch's global generator; the tests set that generator to the state of the
``torch.Generator`` our DARE is given, so both sides draw the same mask."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from conftest import peft_delta_weights
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import TensorGroup
from mergekit.merge_methods.generalized_task_arithmetic import ConsensusMethod
from peft import PeftModel

import lata_peft
from lata_peft.errors import LataError
from lata_peft.methods import METHODS, merge_terms, module_generator, parse_params


def _count_variant(name: str):
    """mergekit's ``name`` with the ``count`` consensus (mergekit registers only the ``sum`` one)."""
    return replace(registry.get(name), consensus_method=ConsensusMethod.count, method_name=f"{name}_count")


MERGEKIT = {("ties", "total"): registry.get("ties"), ("ties", "frequency"): _count_variant("ties"),
            ("dare_ties", "total"): registry.get("dare_ties"), ("dare_ties", "frequency"): _count_variant("dare_ties"),
            ("dare", "total"): registry.get("dare_linear"), ("dare", "frequency"): registry.get("dare_linear"),
            ("breadcrumbs", "total"): registry.get("breadcrumbs"),
            ("breadcrumbs_ties", "total"): registry.get("breadcrumbs_ties"),
            ("breadcrumbs_ties", "frequency"): _count_variant("breadcrumbs_ties"),
            ("della", "total"): registry.get("della"), ("della", "frequency"): _count_variant("della"),
            ("della_linear", "total"): registry.get("della_linear")}


RULE_PARAMS = {"ties": ("convention=mergekit",), "dare": ("convention=mergekit",),
               "dare_ties": ("convention=mergekit",), "breadcrumbs": (), "breadcrumbs_ties": (), "della": (),
               "della_linear": ()}
"""What puts each method under mergekit's rule (Breadcrumbs and DELLA have no other)."""
SPARSIFIER_DEFAULTS = {"breadcrumbs": {"gamma": 0.01}, "breadcrumbs_ties": {"gamma": 0.01},
                       "della": {"epsilon": 0.15}, "della_linear": {"epsilon": 0.15}}
"""mergekit's per-model defaults of the sparsifier parameters (its merge_group needs them given)."""


def mergekit_merge(name: str, taus: list[torch.Tensor], weights: list[float], density: float, sign_method: str,
                   generator: torch.Generator | None = None, lam: float = 1.0, per_model: dict | None = None,
                   **switches: bool) -> torch.Tensor:
    """mergekit's own ``name`` on task vectors ``taus`` (a zero base, so each model is its task vector), its
    ``normalize`` / ``rescale`` at mergekit's defaults unless given; torch's global generator starts from
    ``generator``'s state; ``per_model``: the sparsifier's per-model parameters (``gamma``, ``epsilon``), the same
    for all (default: mergekit's)."""
    method = MERGEKIT[name, sign_method]
    settings = {param.name: param.default for param in method.spec.parameters if param.name in ("normalize", "rescale")}
    group = TensorGroup.from_tensors([torch.zeros_like(taus[0]), *taus], base_index=0)
    ids = [entry.id for entry in group.non_base]
    with torch.random.fork_rng():
        if generator is not None:
            torch.set_rng_state(generator.get_state())
        per_model = {key: dict.fromkeys(ids, value)
                     for key, value in (SPARSIFIER_DEFAULTS.get(name, {}) if per_model is None else per_model).items()}
        return method.merge_group(group, density=dict.fromkeys(ids, density),
                                  weight=dict(zip(ids, weights, strict=True)), int8_mask=False,
                                  **{**settings, **switches, **per_model, "lambda": lam})


def mergekit_ties(taus: list[torch.Tensor], weights: list[float], density: float, sign_method: str) -> torch.Tensor:
    return mergekit_merge("ties", taus, weights, density, sign_method)


def ours(name: str, taus: list[torch.Tensor], weights: list[float], density: float, sign_method: str,
         generator: torch.Generator, params: tuple[str, ...] = ("convention=mergekit",)) -> torch.Tensor:
    method = METHODS[name]
    return merge_terms(list(zip(weights, taus, strict=True)), method.bind(parse_params(method, params)), density,
                       generator, sign_method)


def task_vectors(dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(24, 17, generator=generator, dtype=dtype) for _ in range(3)]


def assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Within 1e-6 of the largest entry: mergekit masks and rescales DARE in float32 on the CPU."""
    assert float((got - expected).abs().max()) <= 1e-6 * float(expected.abs().max())


@pytest.mark.parametrize("sign_method", ["total", "frequency"])
@pytest.mark.parametrize("weights", [[1.0, 3.0, 0.5], [1.0, -0.7, 0.5], [1.0, 1.0, 1.0]])
def test_mergekit_convention_is_mergekit(weights: list[float], sign_method: str) -> None:
    taus = task_vectors()
    ties = METHODS["ties"]
    ours = merge_terms(list(zip(weights, taus, strict=True)), ties.bind(parse_params(ties, ["convention=mergekit"])),
                       0.4, module_generator(0, "m"), sign_method)
    expected = mergekit_ties(taus, weights, 0.4, sign_method)
    assert torch.allclose(ours, expected, rtol=1e-12, atol=1e-12)
    peft_convention = merge_terms(list(zip(weights, taus, strict=True)), ties, 0.4, module_generator(0, "m"),
                                  sign_method)
    if len(set(weights)) > 1:  # unequal weights: the two conventions are different merges
        assert float((peft_convention - expected).norm()) > 0.05 * float(expected.norm())


@pytest.mark.parametrize(("name", "sign_method"), [("dare", "total"), ("dare_ties", "total"),
                                                   ("dare_ties", "frequency")])
@pytest.mark.parametrize("weights", [[1.0, 3.0, 0.5], [1.0, -0.7, 0.5]])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mergekit_dare_is_mergekit(name: str, sign_method: str, weights: list[float], dtype: torch.dtype) -> None:
    taus = task_vectors(dtype)
    got = ours(name, taus, weights, 0.4, sign_method, module_generator(7, "m"))
    expected = mergekit_merge(name, taus, weights, 0.4, sign_method, module_generator(7, "m"))
    assert_close(got, expected)
    # the shared mask is what makes them agree: another draw is a different merge
    other_mask = mergekit_merge(name, taus, weights, 0.4, sign_method, module_generator(8, "m"))
    assert float((other_mask - expected).norm()) > 0.05 * float(expected.norm())
    # PEFT's convention (on float32 it draws the same mask, and still rescales by 1/density, not the L1 ratio)
    peft_convention = ours(name, taus, weights, 0.4, sign_method, module_generator(7, "m"), ())
    assert float((peft_convention - expected).norm()) > 0.01 * float(expected.norm())


@pytest.mark.parametrize("name", ["ties", "dare", "dare_ties", "breadcrumbs", "della"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("rescale", [True, False])
def test_normalize_and_rescale_switch_as_in_mergekit(name: str, normalize: bool, rescale: bool) -> None:
    taus, weights = task_vectors(), [1.0, -0.7, 0.5]
    switches = (f"normalize={str(normalize).lower()}", f"rescale={str(rescale).lower()}")
    got = ours(name, taus, weights, 0.4, "total", module_generator(1, "m"), (*RULE_PARAMS[name], *switches))
    expected = mergekit_merge(name, taus, weights, 0.4, "total", module_generator(1, "m"), normalize=normalize,
                              rescale=rescale)
    assert_close(got, expected)
    default = mergekit_merge(name, taus, weights, 0.4, "total", module_generator(1, "m"))
    settings = {p.name: p.default for p in MERGEKIT[name, "total"].spec.parameters}
    if (normalize, rescale) != (settings["normalize"], settings["rescale"]):  # the switches do change the merge
        assert float((got - default).norm()) > 1e-3 * float(default.norm())
    else:  # and their defaults are mergekit's
        assert_close(ours(name, taus, weights, 0.4, "total", module_generator(1, "m"), RULE_PARAMS[name]), default)


@pytest.mark.parametrize("name", ["ties", "dare", "dare_ties"])
@pytest.mark.parametrize("switch", ["normalize=true", "rescale=false"])
def test_switches_are_refused_under_the_peft_convention(name: str, switch: str) -> None:
    method = METHODS[name]
    with pytest.raises(LataError, match="convention=mergekit"):
        method.bind(parse_params(method, [switch]))
    with pytest.raises(LataError, match="true, false"):
        parse_params(method, ["normalize=yes"])


@pytest.mark.parametrize(("method", "lam"), [("ties", 1.0), ("ties", 0.6), ("dare", 1.0), ("dare", 0.6),
                                            ("dare_ties", 1.0), ("dare_ties", 0.6), ("breadcrumbs_ties", 1.0),
                                            ("della", 1.0)])
def test_full_space_output_is_mergekit_on_peft_deltas(tmp_path, base, adapters, method: str, lam: float) -> None:
    """With ``--lambda``: mergekit scales after its merge and ``normalize`` (TIES' default), and so do we."""
    names, weights = ("plain", "rank8", "patterns"), [1.0, -3.0, 0.5]
    lata_peft.combine([adapters[n] for n in names], tmp_path / "out", method=method, space="full", weights=weights,
                      density=0.5, rank=64, seed=5, params=list(RULE_PARAMS[method]), lam=lam)
    merged = dict(PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "out")).merge_and_unload()
                  .named_parameters())
    original = dict(base.named_parameters())
    deltas = [peft_delta_weights(base, adapters[n]) for n in names]
    for key in deltas[0]:
        module = key.removesuffix(".weight")  # DARE's mask: the generator of this module and seed
        expected = mergekit_merge(method, [d[key] for d in deltas], weights, 0.5, "total", module_generator(5, module),
                                  lam)
        got = (merged[key] - original[key]).detach().double()
        assert float((got - expected).norm()) <= 1e-5 * float(expected.norm()), key


# ----------------------------------------------------------------- Breadcrumbs and DELLA (mergekit's rule only)

@pytest.mark.parametrize(("name", "sign_method"), [("breadcrumbs", "total"), ("breadcrumbs_ties", "total"),
                                                   ("breadcrumbs_ties", "frequency"), ("della", "total"),
                                                   ("della", "frequency"), ("della_linear", "total")])
@pytest.mark.parametrize("weights", [[1.0, 3.0, 0.5], [1.0, -0.7, 0.5]])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_breadcrumbs_and_della_are_mergekits(name: str, sign_method: str, weights: list[float],
                                             dtype: torch.dtype) -> None:
    """At mergekit's defaults (gamma 0.01, epsilon 0.15, its normalize / rescale for each method), and with other
    values: the outliers Breadcrumbs drops and the ranks DELLA draws by are the same entries."""
    taus = task_vectors(dtype)
    expected = mergekit_merge(name, taus, weights, 0.4, sign_method, module_generator(7, "m"),
                              per_model=SPARSIFIER_DEFAULTS[name])
    assert_close(ours(name, taus, weights, 0.4, sign_method, module_generator(7, "m"), ()), expected)
    other = {"gamma": 0.2} if "gamma" in SPARSIFIER_DEFAULTS[name] else {"epsilon": 0.3}
    expected_other = mergekit_merge(name, taus, weights, 0.4, sign_method, module_generator(7, "m"), per_model=other)
    (key, value), = other.items()
    assert_close(ours(name, taus, weights, 0.4, sign_method, module_generator(7, "m"), (f"{key}={value}",)),
                 expected_other)
    assert float((expected_other - expected).norm()) > 1e-3 * float(expected.norm())  # the parameter matters


def test_breadcrumbs_drops_the_largest_and_smallest_entries() -> None:
    """Breadcrumbs' mask written out from the paper's rule on one vector: of 100 entries |x| = 1..100, gamma 0.1
    and density 0.5 keep |x| = 41..90 (the 10 largest and the 40 smallest go)."""
    tau = torch.randperm(100, generator=torch.Generator().manual_seed(0)).double() + 1
    tau = tau * torch.where(torch.arange(100) % 2 == 0, 1.0, -1.0).double()
    got = ours("breadcrumbs", [tau.reshape(10, 10)], [1.0], 0.5, "total", torch.Generator(), ("gamma=0.1",))
    kept = got.reshape(-1).abs()
    assert sorted(kept[kept > 0].tolist()) == [float(v) for v in range(41, 91)]


def test_della_keep_probability_grows_with_magnitude() -> None:
    """DELLA's MagPrune: over many draws, the smallest entry of a row is kept with probability density - epsilon
    and the largest with density + epsilon (here 0.3 and 0.7)."""
    row = torch.arange(1, 65, dtype=torch.float64).reshape(1, 64)
    generator = torch.Generator().manual_seed(0)
    kept = torch.stack([ours("della_linear", [row], [1.0], 0.5, "total", generator, ("epsilon=0.2", "rescale=false"))
                        != 0 for _ in range(4000)]).double().mean(0).reshape(-1)
    assert float(kept[0]) == pytest.approx(0.3, abs=0.03) and float(kept[-1]) == pytest.approx(0.7, abs=0.03)
    assert float(kept[:16].mean()) < float(kept[-16:].mean())


@pytest.mark.parametrize("epsilon", ["0.5", "0.45"])
def test_della_refuses_probabilities_outside_zero_one(tmp_path, adapters, epsilon: str) -> None:
    with pytest.raises(LataError, match="strictly between 0 and 1"):
        lata_peft.combine([adapters["plain"], adapters["rank8"]], tmp_path / "out", method="della", density=0.6,
                          params=[f"epsilon={epsilon}"])
    assert not (tmp_path / "out").exists()
