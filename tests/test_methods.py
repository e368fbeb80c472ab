"""TIES / DARE / magnitude agree with ``peft.utils.merge_utils`` on the same tensors."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import peft_delta_weights
from peft import PeftModel
from peft.utils import merge_utils

import lata_peft
from lata_peft.methods import METHODS, module_generator


@pytest.fixture
def stacked():
    g = torch.Generator().manual_seed(3)
    deltas = torch.randn(3, 20, 16, generator=g)
    weights = torch.tensor([0.5, 1.0, 0.7])
    return deltas, weights


@pytest.mark.parametrize("sign_method", ["total", "frequency"])
def test_ties_matches_peft(stacked, sign_method):
    deltas, weights = stacked
    ours = METHODS["ties"].dense(deltas, weights, 0.4, torch.Generator(), sign_method)
    theirs = merge_utils.ties(list(deltas), weights, 0.4, sign_method)
    torch.testing.assert_close(ours, theirs)


def test_magnitude_matches_peft(stacked):
    deltas, weights = stacked
    ours = METHODS["magnitude"].dense(deltas, weights, 0.3, torch.Generator(), "total")
    torch.testing.assert_close(ours, merge_utils.magnitude_prune(list(deltas), weights, 0.3))


@pytest.mark.parametrize(("name", "reference"), [("dare", "dare_linear"), ("dare_ties", "dare_ties")])
def test_dare_matches_peft_with_the_same_seed(stacked, name, reference):
    deltas, weights = stacked
    ours = METHODS[name].dense(deltas, weights, 0.6, torch.Generator().manual_seed(11), "total")
    torch.manual_seed(11)
    theirs = getattr(merge_utils, reference)(list(deltas), weights, 0.6)
    torch.testing.assert_close(ours, theirs)
    again = METHODS[name].dense(deltas, weights, 0.6, torch.Generator().manual_seed(11), "total")
    torch.testing.assert_close(ours, again)
    other = METHODS[name].dense(deltas, weights, 0.6, torch.Generator().manual_seed(12), "total")
    assert not torch.equal(ours, other)


def test_module_generators_are_deterministic_and_distinct():
    a = torch.rand(5, generator=module_generator(0, "model.layers.0.q_proj"))
    b = torch.rand(5, generator=module_generator(0, "model.layers.0.q_proj"))
    c = torch.rand(5, generator=module_generator(0, "model.layers.1.q_proj"))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("method", ["ties", "dare", "dare_ties", "magnitude"])
def test_dense_methods_end_to_end(tmp_path, base, adapters, method):
    """Written adapter (full rank, so no truncation) == PEFT's merge function on PEFT's own deltas."""
    out = tmp_path / "out"
    result = lata_peft.combine([adapters["plain"], adapters["rank8"]], out, forget=[adapters["instruct"]],
                               method=method, weights=[1.0, 0.5], density=0.5, seed=5, rank=64, space="full")
    assert result.report["summary"]["max_error"] < 1e-5
    per_adapter = [peft_delta_weights(base, adapters[n]) for n in ("plain", "rank8", "instruct")]
    coefficients = torch.tensor([1.0, 0.5, 1.0])
    signs = [1.0, 1.0, -1.0]
    merged = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).merge_and_unload()
    written = dict(merged.named_parameters())
    original = dict(base.named_parameters())
    reference = {"ties": merge_utils.ties, "dare": merge_utils.dare_linear, "dare_ties": merge_utils.dare_ties,
                 "magnitude": merge_utils.magnitude_prune}[method]
    for name in per_adapter[0]:
        module = name.removesuffix(".weight")
        torch.manual_seed(5 * 1_000_003 + __import__("zlib").crc32(module.encode()))
        tensors = [sign * d[name].float() for sign, d in zip(signs, per_adapter, strict=True)]
        expected = reference(tensors, coefficients, 0.5)
        got = (written[name] - original[name]).detach()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
