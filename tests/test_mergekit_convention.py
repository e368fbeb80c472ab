"""``--method ties --param convention=mergekit`` against mergekit 0.1.5 itself on the same tensors: weights
1, 3 and 0.5, a negative weight, both sign elections; and end to end in full space, where PEFT's merge of
our output equals mergekit's ``ties`` on PEFT's own dense deltas. The default (PEFT) convention differs
from mergekit's once the weights are unequal: both are kept, and the difference is asserted."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import peft_delta_weights
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import TensorGroup
from mergekit.merge_methods.generalized_task_arithmetic import ConsensusMethod, GeneralizedTaskArithmeticMerge
from mergekit.sparsify import SparsificationMethod
from peft import PeftModel

import lata_peft
from lata_peft.methods import METHODS, merge_terms, module_generator, parse_params

MERGEKIT_COUNT_TIES = GeneralizedTaskArithmeticMerge(
    consensus_method=ConsensusMethod.count, sparsification_method=SparsificationMethod.magnitude,
    default_normalize=True, default_rescale=False, method_name="ties_count", method_pretty_name="TIES (count)",
    method_reference_url="https://arxiv.org/abs/2306.01708")


def mergekit_ties(taus: list[torch.Tensor], weights: list[float], density: float, sign_method: str) -> torch.Tensor:
    """mergekit's own TIES on task vectors ``taus`` (a zero base, so each model is its task vector)."""
    method = registry.get("ties") if sign_method == "total" else MERGEKIT_COUNT_TIES
    group = TensorGroup.from_tensors([torch.zeros_like(taus[0]), *taus], base_index=0)
    ids = [entry.id for entry in group.non_base]
    return method.merge_group(group, density=dict.fromkeys(ids, density), weight=dict(zip(ids, weights, strict=True)),
                              normalize=True, rescale=False, int8_mask=False, **{"lambda": 1.0})


@pytest.mark.parametrize("sign_method", ["total", "frequency"])
@pytest.mark.parametrize("weights", [[1.0, 3.0, 0.5], [1.0, -0.7, 0.5], [1.0, 1.0, 1.0]])
def test_mergekit_convention_is_mergekit(weights: list[float], sign_method: str) -> None:
    generator = torch.Generator().manual_seed(3)
    taus = [torch.randn(24, 17, generator=generator, dtype=torch.float64) for _ in range(3)]
    ties = METHODS["ties"]
    ours = merge_terms(list(zip(weights, taus, strict=True)), ties.bind(parse_params(ties, ["convention=mergekit"])),
                       0.4, module_generator(0, "m"), sign_method)
    expected = mergekit_ties(taus, weights, 0.4, sign_method)
    assert torch.allclose(ours, expected, rtol=1e-12, atol=1e-12)
    peft_convention = merge_terms(list(zip(weights, taus, strict=True)), ties, 0.4, module_generator(0, "m"),
                                  sign_method)
    if len(set(weights)) > 1:  # unequal weights: the two conventions are different merges
        assert float((peft_convention - expected).norm()) > 0.05 * float(expected.norm())


def test_full_space_output_is_mergekit_ties_on_peft_deltas(tmp_path, base, adapters) -> None:
    names, weights = ("plain", "rank8", "patterns"), [1.0, 3.0, 0.5]
    lata_peft.combine([adapters[n] for n in names], tmp_path / "out", method="ties", space="full", weights=weights,
                      density=0.5, rank=64, params=["convention=mergekit"])
    merged = dict(PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "out")).merge_and_unload()
                  .named_parameters())
    original = dict(base.named_parameters())
    deltas = [peft_delta_weights(base, adapters[n]) for n in names]
    for key in deltas[0]:
        expected = mergekit_ties([d[key] for d in deltas], weights, 0.5, "total")
        got = (merged[key] - original[key]).double()
        assert float((got - expected).norm()) <= 1e-5 * float(expected.norm()), key
