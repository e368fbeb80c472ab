"""TSV-Merge, Iso-C, Iso-CTS in core space against dense references written here from the papers.

References (``paper_*``) follow Gargiulo et al. 2025 (TSV, arXiv 2412.00081) and Marczak et al.
2025 (Iso-C / Iso-CTS, arXiv 2502.04959, and their ``src/utils/iso.py``) on dense float64 task
matrices ``c_t s_t B_t A_t``. Whether a rule commutes with the orthonormal core embedding
(``U_B M V_A^T``) is asserted where it holds, and where it does not the difference is asserted too.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lata_peft.core_space import merge_in_core
from lata_peft.lowrank import LowRank
from lata_peft.subspace_methods import iso_c, iso_cts, orthogonalize, subspace_method, tsv_merge


def random_terms(seed: int, out: int, inp: int, ranks: list[int], coefficients: list[float]):
    g = torch.Generator().manual_seed(seed)
    return [(c, LowRank(torch.randn(out, r, generator=g, dtype=torch.float64),
                        torch.randn(r, inp, generator=g, dtype=torch.float64), 0.5 + i))
            for i, (r, c) in enumerate(zip(ranks, coefficients, strict=True))]


def task_matrices(terms) -> list[torch.Tensor]:
    """The weighted dense task matrices ``X_t = c_t s_t B_t A_t`` (float64)."""
    return [c * d.scale * (d.B.double() @ d.A.double()) for c, d in terms]


def top(X: torch.Tensor, k: int):
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    return U[:, :k], S[:k], Vh[:k].T  # V as columns


def polar(X: torch.Tensor) -> torch.Tensor:
    P, _, Qh = torch.linalg.svd(X, full_matrices=False)
    return P @ Qh


def paper_tsv(tasks: list[torch.Tensor], counts: list[int]) -> torch.Tensor:
    """TSV-Merge: per-task top-k SVD, concatenate U, S, V, orthogonalise U and V (Procrustes), rebuild."""
    parts = [top(X, k) for X, k in zip(tasks, counts, strict=True)]
    U = torch.cat([p[0] for p in parts], dim=1)
    S = torch.diag(torch.cat([p[1] for p in parts]))
    V = torch.cat([p[2] for p in parts], dim=1)
    return polar(U) @ S @ polar(V).T


def paper_iso_c(tasks: list[torch.Tensor], rank: int, alpha: float = 1.0) -> torch.Tensor:
    """Iso-C on the ``rank`` non-zero directions of the sum: ``alpha * mean(S) * U V^T``."""
    U, S, V = top(sum(tasks), rank)
    return alpha * S.mean() * U @ V.T


def paper_iso_cts(tasks: list[torch.Tensor], d: int, fraction: float = 0.8, alpha: float = 1.0) -> torch.Tensor:
    """Iso-CTS with ``d`` dims: common = top of the sum, task-specific = top of each task minus its common part."""
    T = len(tasks)
    common = int(d * fraction)
    common = d - round((d - common) / T) * T
    per_task = (d - common) // T
    U_c, S_c, V_c = top(sum(tasks), common)
    projector = torch.eye(U_c.shape[0], dtype=U_c.dtype) - U_c @ U_c.T
    parts = [top(projector @ X, per_task) for X in tasks]
    U = torch.cat([*(p[0] for p in parts), U_c], dim=1)
    S = torch.cat([*(p[1] for p in parts), S_c])
    V = torch.cat([*(p[2] for p in parts), V_c], dim=1)
    return alpha * S.mean() * polar(U) @ polar(V).T


def core(terms, name: str, **params) -> torch.Tensor:
    delta, error, _ = merge_in_core(terms, subspace_method(name, **params))
    assert error <= 1e-9 * float(delta.dense().norm()) + 1e-12  # exact: no truncation asked
    return delta.dense().double()


def close(x: torch.Tensor, y: torch.Tensor, rtol: float = 2e-6) -> None:
    assert float((x - y).norm()) <= rtol * float(y.norm()), float((x - y).norm() / y.norm())


def full_space(rule, terms, **params) -> torch.Tensor:
    """The library rule run on the dense (T, out, in) stack (full space), for commutation checks."""
    return rule(torch.stack(task_matrices(terms)), torch.ones(len(terms), dtype=torch.float64), **params)


TERMS = random_terms(4, 40, 30, [4, 3, 5], [1.0, -0.7, 1.3])  # mixed ranks, a forgotten task, R = 12 < 30


def test_tsv_core_matches_the_paper_with_core_counts():
    """Core TSV == dense TSV with k_t = min(R // T, r_t) = [4, 3, 4] (Panariello et al.'s core counts)."""
    close(core(TERMS, "tsv"), paper_tsv(task_matrices(TERMS), [4, 3, 4]))
    close(core(TERMS, "tsv", fraction=0.25), paper_tsv(task_matrices(TERMS), [3, 3, 3]))


def test_tsv_counts_decide_whether_core_equals_full_space():
    """Full space counts from d = min(out, in) = 30 (k_t = 10, capped at r_t = [4, 3, 5]); core from d = R = 12.

    Mixed ranks: the counts differ and so do the results. Equal ranks: k_t = r_t in both, and they agree.
    """
    full = full_space(tsv_merge, TERMS)
    close(full, paper_tsv(task_matrices(TERMS), [4, 3, 5]))
    assert float((core(TERMS, "tsv") - full).norm() / full.norm()) > 1e-3
    equal = random_terms(5, 40, 30, [4, 4, 4], [1.0, 0.5, -0.8])
    close(core(equal, "tsv"), full_space(tsv_merge, equal))
    close(core(equal, "tsv"), paper_tsv(task_matrices(equal), [4, 4, 4]))


def test_tsv_of_orthogonal_tasks_is_task_arithmetic():
    """Tasks in mutually orthogonal row and column spaces: U and V are already orthonormal, TSV == sum."""
    g = torch.Generator().manual_seed(1)
    Q_out = torch.linalg.qr(torch.randn(30, 9, generator=g, dtype=torch.float64))[0]
    Q_in = torch.linalg.qr(torch.randn(20, 9, generator=g, dtype=torch.float64))[0]
    terms = [(1.0, LowRank(Q_out[:, 3 * t: 3 * t + 3] * (t + 1), Q_in[:, 3 * t: 3 * t + 3].T)) for t in range(3)]
    close(core(terms, "tsv"), sum(task_matrices(terms)))


def test_iso_c_core_matches_the_paper_and_full_space():
    """Iso-C commutes with the embedding: core == paper formula on the R = 12 non-zero directions == full space."""
    expected = paper_iso_c(task_matrices(TERMS), 12)
    close(core(TERMS, "iso_c"), expected)
    close(full_space(iso_c, TERMS), expected)
    close(core(TERMS, "iso_c", alpha=1.7), 1.7 * expected)
    S = torch.linalg.svdvals(core(TERMS, "iso_c"))
    mean = torch.linalg.svdvals(sum(task_matrices(TERMS)))[:12].mean()
    torch.testing.assert_close(S[:12], torch.full((12,), float(mean), dtype=torch.float64))
    assert float(S[12]) < 1e-6 * float(mean)


def test_literal_full_space_iso_c_does_not_apply_to_low_rank_sums():
    """The paper's mean over all min(out, in) = 30 singular values (22 of them zero) gives every one of the 30
    directions, 18 of them arbitrary null-space vectors, weight mean(S): full rank, and not the core result."""
    U, S, Vh = torch.linalg.svd(sum(task_matrices(TERMS)), full_matrices=False)
    literal = S.mean() * U @ Vh
    assert int(torch.linalg.matrix_rank(literal)) == 30
    assert float((core(TERMS, "iso_c") - literal).norm() / literal.norm()) > 0.5


@settings(max_examples=25, deadline=None)
@given(out=st.integers(8, 24), inp=st.integers(8, 24), r=st.integers(1, 2), tasks=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_law_tsv_and_iso_c_commute_with_the_core_embedding(out, inp, r, tasks, seed):
    """Equal ranks, R = T r < min(out, in): core TSV / Iso-C == the same rule on the dense task matrices."""
    terms = random_terms(seed, out, inp, [r] * tasks, [1.0, -0.5, 0.8][:tasks])
    close(core(terms, "tsv"), full_space(tsv_merge, terms), rtol=1e-5)
    close(core(terms, "iso_c"), full_space(iso_c, terms), rtol=1e-5)


def test_iso_cts_core_matches_the_paper_with_d_equal_to_r():
    """Core Iso-CTS == the paper's Iso-CTS on the dense task matrices with d = R = 12 (9 common + 1 per task)."""
    close(core(TERMS, "iso_cts"), paper_iso_cts(task_matrices(TERMS), 12))
    close(core(TERMS, "iso_cts", common_fraction=0.5, alpha=2.0),
          paper_iso_cts(task_matrices(TERMS), 12, fraction=0.5, alpha=2.0))
    S = torch.linalg.svdvals(core(TERMS, "iso_cts"))
    assert float(S[:12].max() - S[:12].min()) < 1e-6 * float(S[0]) and float(S[12]) < 1e-6 * float(S[0])


def test_iso_cts_in_full_space_degenerates_to_iso_c():
    """Full space counts from d = 30: the common space (0.8 d = 24 > R = 12) takes every direction of the sum, no
    task-specific direction is left, and Iso-CTS == Iso-C. In core space (d = R) it does not: no commutation."""
    full = full_space(iso_cts, TERMS)
    close(full, paper_iso_c(task_matrices(TERMS), 12))
    assert float((core(TERMS, "iso_cts") - full).norm() / full.norm()) > 1e-2


def test_orthogonalize_is_the_nearest_orthonormal_matrix():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(12, 5, generator=g, dtype=torch.float64)
    Q = orthogonalize(X)
    torch.testing.assert_close(Q.T @ Q, torch.eye(5, dtype=torch.float64))
    for _ in range(5):  # no other orthonormal matrix is closer (orthogonal Procrustes)
        other = torch.linalg.qr(torch.randn(12, 5, generator=g, dtype=torch.float64))[0]
        assert float((X - Q).norm()) <= float((X - other).norm())


def test_subspace_method_checks_its_fractions():
    with pytest.raises(ValueError, match="fraction"):
        subspace_method("tsv", fraction=1.5)
    with pytest.raises(TypeError):
        subspace_method("iso_c", fraction=0.5).dense(torch.zeros(1, 2, 2), torch.ones(1), 0.5, None, "total")


def test_subspace_methods_take_the_dense_merge_signature():
    """``Method.dense(deltas, weights, density, generator, sign_method)``: negated delta + |c| == c tau."""
    stack = torch.stack([d.dense().double() for _, d in TERMS])  # tau_t = s_t B_t A_t
    signs = torch.tensor([1.0 if c >= 0 else -1.0 for c, _ in TERMS], dtype=torch.float64)
    weights = torch.tensor([abs(c) for c, _ in TERMS], dtype=torch.float64)
    for name, rule in (("tsv", tsv_merge), ("iso_c", iso_c), ("iso_cts", iso_cts)):
        got = subspace_method(name).dense(stack * signs.view(-1, 1, 1), weights, 0.5, torch.Generator(), "total")
        close(got, rule(torch.stack(task_matrices(TERMS)), torch.ones(3, dtype=torch.float64)))
