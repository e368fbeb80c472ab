"""Factored algebra against dense maths (hypothesis property tests)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lata_peft.lowrank import LowRank, cosine, factorize, inner, norm, rank_for_energy, truncate, weighted_sum

dims = st.integers(min_value=1, max_value=24)
ranks = st.integers(min_value=1, max_value=6)
seeds = st.integers(min_value=0, max_value=2**31 - 1)
scales = st.floats(min_value=-4.0, max_value=4.0, allow_nan=False).filter(lambda s: abs(s) > 1e-3)


def random_delta(out: int, inp: int, rank: int, seed: int, scale: float = 1.0) -> LowRank:
    g = torch.Generator().manual_seed(seed)
    return LowRank(torch.randn(out, rank, generator=g), torch.randn(rank, inp, generator=g), scale)


def dense64(x: LowRank) -> torch.Tensor:
    return x.scale * (x.B.double() @ x.A.double())


@settings(max_examples=60, deadline=None)
@given(dims, dims, ranks, ranks, seeds, scales, scales)
def test_inner_norm_cosine_match_dense(out, inp, r1, r2, seed, s1, s2):
    x, y = random_delta(out, inp, r1, seed, s1), random_delta(out, inp, r2, seed + 1, s2)
    dx, dy = dense64(x), dense64(y)
    assert inner(x, y) == pytest.approx(float((dx * dy).sum()), rel=1e-9, abs=1e-9)
    assert norm(x) == pytest.approx(float(dx.norm()), rel=1e-9)
    expected = float((dx * dy).sum() / (dx.norm() * dy.norm()))
    assert cosine(x, y) == pytest.approx(expected, abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(dims, dims, st.lists(st.tuples(ranks, scales, scales), min_size=1, max_size=4), seeds)
def test_weighted_sum_of_factors_equals_dense_sum(out, inp, terms, seed):
    deltas = [(c, random_delta(out, inp, r, seed + i, s)) for i, (r, s, c) in enumerate(terms)]
    total = weighted_sum(deltas)
    assert total.rank == sum(d.rank for _, d in deltas)
    expected = sum(c * dense64(d) for c, d in deltas)
    torch.testing.assert_close(dense64(total.float()), expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.integers(4, 30), st.integers(4, 30), st.integers(1, 8), st.integers(1, 8), seeds)
def test_truncation_error_is_the_tail_of_the_singular_values(out, inp, rank, k, seed):
    x = random_delta(out, inp, rank, seed, 0.7)
    result = truncate(x, rank=k)
    dense = dense64(x)
    S = torch.linalg.svdvals(dense)
    kept = min(k, rank, out, inp)
    assert result.delta.rank == kept
    residual = float((dense - dense64(result.delta)).norm())
    tail = float(S[kept:].square().sum().sqrt())
    assert result.error == pytest.approx(tail, rel=1e-4, abs=1e-5)
    assert residual == pytest.approx(tail, rel=1e-4, abs=1e-4)
    torch.testing.assert_close(result.singular_values.double()[: min(rank, len(S))], S[: min(rank, len(S))],
                               rtol=1e-4, atol=1e-5)


def test_exact_truncation_keeps_the_delta():
    x = weighted_sum([(1.0, random_delta(20, 12, 3, 0)), (-2.0, random_delta(20, 12, 5, 1))])
    result = truncate(x)
    assert result.delta.rank == 8
    assert result.error == 0.0
    torch.testing.assert_close(result.delta.dense(), x.dense(), rtol=1e-4, atol=1e-4)


def test_energy_rank_choice():
    S = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert rank_for_energy(S, 9 / 14) == 1
    assert rank_for_energy(S, 0.7) == 2
    assert rank_for_energy(S, 13 / 14) == 2
    assert rank_for_energy(S, 0.99) == 3
    x = random_delta(16, 16, 6, 3)
    result = truncate(x, energy=0.9)
    energy = result.singular_values.double().square()
    k = result.delta.rank
    assert energy[:k].sum() >= 0.9 * energy.sum() - 1e-6
    assert energy[: k - 1].sum() < 0.9 * energy.sum()


def test_factorize_dense_delta():
    x = random_delta(18, 10, 4, 7)
    result = factorize(x.dense(), rank=2)
    S = torch.linalg.svdvals(x.dense().double())
    assert result.error == pytest.approx(float(S[2:].square().sum().sqrt()), rel=1e-4)
    assert factorize(x.dense()).delta.rank == 4  # numerical rank


@pytest.mark.parametrize(
    "module",
    ["model.layers.1.self_attn.q_proj", "model.layers.11.self_attn.q_proj", "model.layers.1.mlp.down_proj",
     "transformer.h.0.attn.c_attn", "q_proj"],
)
def test_pattern_matching_follows_peft(module):
    from peft.utils.other import get_pattern_key as peft_rule

    from lata_peft.adapter import get_pattern_key

    patterns = ["down_proj", "layers.1.self_attn.q_proj", "model.layers.11.self_attn.q_proj", "h.0.attn.c_attn"]
    assert get_pattern_key(patterns, module) == peft_rule(patterns, module)


def test_randomised_factorize_is_near_optimal_and_reports_its_true_error():
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(120, 80, generator=g) @ torch.diag(torch.linspace(3, 0.01, 80)) @ torch.randn(80, 80,
                                                                                                       generator=g)
    result = factorize(dense, rank=10)  # 10 < 80 // 2: randomised path
    residual = float((dense.double() - result.delta.dense().double()).norm())
    assert result.error == pytest.approx(residual, rel=1e-5)
    best = float(torch.linalg.svdvals(dense.double())[10:].square().sum().sqrt())
    assert best <= residual <= 1.02 * best
    again = factorize(dense, rank=10)
    assert torch.equal(again.delta.B, result.delta.B)  # deterministic


@pytest.mark.parametrize("case", ["well_conditioned", "duplicated_terms", "wide", "ill_conditioned"])
def test_truncation_equals_dense_svd_on_every_qr_path(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cholesky-QR where the factors are well conditioned (no Householder QR called), Householder where they
    are rank deficient (the same adapter twice), wide (r > out) or ill-conditioned; the truncation always
    equals the best rank-k approximation from a dense float64 SVD, and its error is the tail."""
    generator = torch.Generator().manual_seed(7)
    B = torch.randn(40, 6, generator=generator, dtype=torch.float64)
    A = torch.randn(6, 30, generator=generator, dtype=torch.float64)
    if case == "duplicated_terms":
        x = weighted_sum([(1.0, LowRank(B, A)), (0.5, LowRank(B, A))])
    elif case == "wide":
        x = LowRank(B[:4], A)  # rank 6 on a 4 x 30 delta
    elif case == "ill_conditioned":
        x = LowRank(B * torch.logspace(0, -7, 6, dtype=torch.float64), A)
    else:
        x = LowRank(B, A, 2.0)
    calls = []
    qr = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda *a, **k: calls.append(1) or qr(*a, **k))
    k = 3
    result = truncate(x, rank=k)
    assert (not calls) == (case == "well_conditioned")
    dense = x.scale * x.B.double() @ x.A.double()
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    best = (U[:, :k] * S[:k]) @ Vh[:k]
    ours = result.delta.B.double() @ result.delta.A.double()
    assert float((ours - best).norm()) <= 1e-6 * float(best.norm())
    assert result.error == pytest.approx(float(S[k:].square().sum().sqrt()), rel=1e-6, abs=1e-9)
