"""Core-space merging (Panariello et al. 2025) against independent dense computations.

The references here build everything themselves from ``torch.linalg.svd`` of the stacked factors and
the dense task vectors, and merge with ``peft.utils.merge_utils``; nothing is taken from
``lata_peft.core_space`` but the result under test.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.utils import merge_utils

from lata_peft.combine import RankPolicy
from lata_peft.core_space import core_basis, merge_in_core
from lata_peft.lowrank import LowRank
from lata_peft.methods import METHODS


def random_terms(seed: int, out: int, inp: int, ranks: list[int], coefficients: list[float],
                 dtype: torch.dtype = torch.float32) -> list[tuple[float, LowRank]]:
    g = torch.Generator().manual_seed(seed)
    terms = []
    for index, (r, c) in enumerate(zip(ranks, coefficients, strict=True)):
        B = torch.randn(out, r, generator=g, dtype=torch.float64)
        A = torch.randn(r, inp, generator=g, dtype=torch.float64)
        terms.append((c, LowRank(B.to(dtype), A.to(dtype), 0.5 + index)))
    return terms


def tau(delta: LowRank) -> torch.Tensor:
    """The dense task vector ``s B A`` in float64."""
    return delta.scale * (delta.B.double() @ delta.A.double())


def reference_basis(terms: list[tuple[float, LowRank]]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """``U_B``, ``V_A`` from torch.linalg.svd of the stacked factors; cores ``U_B^T tau_i V_A`` from dense taus."""
    B = torch.cat([d.B.to(torch.float64) * d.scale for _, d in terms], dim=1)
    A = torch.cat([d.A.to(torch.float64) for _, d in terms], dim=0)
    U_B = torch.linalg.svd(B, full_matrices=False)[0]
    V_A = torch.linalg.svd(A, full_matrices=False)[2].T
    return U_B, V_A, [U_B.T @ tau(d) @ V_A for _, d in terms]


def close(x: torch.Tensor, y: torch.Tensor, rtol: float = 2e-6) -> None:
    """``|x - y|_F <= rtol |y|_F`` (float32 factors: relative error ~1e-7)."""
    x, y = x.double(), y.double()
    assert float((x - y).norm()) <= rtol * max(float(y.norm()), 1e-30), float((x - y).norm() / y.norm())


shapes = st.tuples(st.integers(1, 24), st.integers(1, 24))
ranks = st.lists(st.integers(1, 5), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, ranks=ranks, seed=st.integers(0, 2**16),
       coefficients=st.lists(st.floats(-2, 2).filter(lambda c: abs(c) > 1e-3), min_size=4, max_size=4))
def test_core_ta_equals_the_dense_sum(shape, ranks, seed, coefficients):
    """Law: core-space TA == sum_i c_i s_i B_i A_i (dense, float64), any shapes and ranks; rank <= sum r_i."""
    terms = random_terms(seed, *shape, ranks, coefficients[: len(ranks)])
    delta, error, relative = merge_in_core(terms, METHODS["ta"])
    expected = sum(c * tau(d) for c, d in terms)
    close(delta.dense(), expected)
    assert delta.rank <= min(sum(ranks), *shape)
    assert error <= 1e-10 * float(expected.norm()) and relative <= 1e-10


@settings(max_examples=30, deadline=None)
@given(shape=shapes, ranks=ranks, seed=st.integers(0, 2**16))
def test_cores_are_lossless_and_bases_orthonormal(shape, ranks, seed):
    terms = random_terms(seed, *shape, ranks, [1.0] * len(ranks))
    basis = core_basis([d for _, d in terms])
    eye_b, eye_a = torch.eye(basis.shape[0], dtype=torch.float64), torch.eye(basis.shape[1], dtype=torch.float64)
    torch.testing.assert_close(basis.U_B.T @ basis.U_B, eye_b, atol=1e-10, rtol=0)
    torch.testing.assert_close(basis.V_A.T @ basis.V_A, eye_a, atol=1e-10, rtol=0)
    assert basis.shape == (min(shape[0], sum(ranks)), min(shape[1], sum(ranks)))
    for core, (_, d) in zip(basis.cores, terms, strict=True):
        close(basis.U_B @ core @ basis.V_A.T, tau(d), rtol=1e-12)


PEFT_RULES = {"ties": merge_utils.ties, "dare": merge_utils.dare_linear, "dare_ties": merge_utils.dare_ties,
              "magnitude": merge_utils.magnitude_prune}


@pytest.mark.parametrize(("method", "sign_method"), [("ties", "total"), ("ties", "frequency"), ("dare", "total"),
                                                    ("dare_ties", "total"), ("dare_ties", "frequency"),
                                                    ("magnitude", "total")])
def test_core_elementwise_rules_match_peft_on_cores(method, sign_method):
    """PEFT's merge function on the test's own cores, mapped back by ``U_B M V_A^T``, == merge_in_core.

    A forgotten adapter (negative coefficient) enters negated with weight |c| (methods.merge_terms).
    """
    terms = random_terms(7, 37, 29, [4, 3, 5], [1.0, -0.6, 0.8])
    seed, name, density = 3, "model.layers.0.self_attn.q_proj", 0.4
    delta, error, _ = merge_in_core(terms, METHODS[method], RankPolicy(), density, seed, name, sign_method)
    U_B, V_A, cores = reference_basis(terms)
    tensors = [core if c >= 0 else -core for (c, _), core in zip(terms, cores, strict=True)]
    weights = torch.tensor([abs(c) for c, _ in terms], dtype=torch.float64)
    torch.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))  # methods.module_generator's seed
    options = {"majority_sign_method": sign_method} if "ties" in method else {}
    merged = PEFT_RULES[method](tensors, weights, density, **options)
    close(delta.dense(), U_B @ merged @ V_A.T)
    assert delta.rank <= 12 and error <= 1e-10 * float(merged.norm())


def test_core_ties_is_a_different_merge_from_full_space_ties():
    """DESIGN.md section 7: trimming and sign election in the core basis != in the standard basis."""
    terms = random_terms(1, 40, 30, [4, 4, 4], [1.0, 1.0, 1.0])
    core, _, _ = merge_in_core(terms, METHODS["ties"], density=0.3)
    full = merge_utils.ties([tau(d) for _, d in terms], torch.ones(3, dtype=torch.float64), 0.3)
    assert float((core.dense().double() - full).norm() / full.norm()) > 1e-2
    assert torch.linalg.matrix_rank(full) > core.rank  # full-space TIES is full rank, core-space rank <= 12


def untruncated_reference(terms, method: str, density: float, seed: int, name: str) -> torch.Tensor:
    """The exact merge, built here: the dense sum for TA, else PEFT's rule on the test's cores, mapped back."""
    if method == "ta":
        return sum(c * tau(d) for c, d in terms)
    U_B, V_A, cores = reference_basis(terms)
    tensors = [core if c >= 0 else -core for (c, _), core in zip(terms, cores, strict=True)]
    torch.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    merged = PEFT_RULES[method](tensors, torch.tensor([abs(c) for c, _ in terms], dtype=torch.float64), density)
    return U_B @ merged @ V_A.T


@pytest.mark.parametrize("method", ["ta", "ties", "dare"])
@pytest.mark.parametrize("policy", ["3", "7", "energy:0.9", "exact"])
def test_reported_error_is_the_measured_truncation_error(method, policy):
    """``error == |dense(result) - untruncated|_F``, ``relative == error / |untruncated|_F``, rank <= K (or R)."""
    terms = random_terms(11, 33, 27, [4, 2, 5], [0.9, -0.4, 1.2])
    rule = RankPolicy.parse(policy)
    delta, error, relative = merge_in_core(terms, METHODS[method], rule, 0.5, 2, "m")
    full = untruncated_reference(terms, method, 0.5, 2, "m")
    measured = float((delta.dense().double() - full).norm())
    assert error == pytest.approx(measured, rel=1e-4, abs=1e-5 * float(full.norm()))
    assert relative == pytest.approx(error / float(full.norm()), rel=1e-4)
    assert delta.rank <= (rule.rank or 11)
    if rule.mode == "energy":  # kept energy >= 0.9 of the total
        assert float(delta.dense().double().square().sum()) >= 0.9 * float(full.square().sum()) * (1 - 1e-6)


def test_rank_never_exceeds_the_sum_of_input_ranks_nor_the_shape():
    for out, inp, rs in [(50, 40, [2, 3]), (6, 40, [4, 4, 4]), (40, 5, [3, 3]), (9, 9, [9, 9, 9])]:
        terms = random_terms(5, out, inp, rs, [1.0] * len(rs))
        for method in ("ta", "ties", "dare_ties", "magnitude"):
            delta = merge_in_core(terms, METHODS[method], density=0.5)[0]
            assert delta.rank <= min(sum(rs), out, inp)
            assert delta.shape == (out, inp)


def test_bf16_inputs_float32_outputs():
    terms = random_terms(2, 32, 24, [4, 4], [1.0, 0.5], dtype=torch.bfloat16)
    delta, _, _ = merge_in_core(terms, METHODS["ta"])
    assert delta.B.dtype == delta.A.dtype == torch.float32
    close(delta.dense(), sum(c * tau(d) for c, d in terms))


def test_never_dense_on_a_huge_module():
    """A 300k x 300k module (720 GB dense in fp64) merges in core space: nothing out x in is formed."""
    g = torch.Generator().manual_seed(0)
    big = 300_000
    terms = [(1.0, LowRank(torch.randn(big, 2, generator=g), torch.randn(2, big, generator=g))) for _ in range(2)]
    delta, error, _ = merge_in_core(terms, METHODS["ties"], RankPolicy.parse("3"), density=0.5)
    assert delta.shape == (big, big) and delta.rank == 3 and error >= 0.0
