"""Factored linear algebra on low-rank deltas ``dW = scale * B @ A``.

Everything here is exact and costs O((out + in) r^2), never O(out * in * r):
the dense ``B @ A`` is only formed by :meth:`LowRank.dense`, which tests and the
element-wise methods (TIES, DARE, magnitude) use one module at a time.
Maths: README ("What it does") and the docstrings below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = [
    "LowRank",
    "Truncation",
    "cosine",
    "cosine_from",
    "factorize",
    "inner",
    "norm",
    "rank_for_energy",
    "serial",
    "truncate",
    "weighted_sum",
]


@contextmanager
def serial() -> Iterator[None]:
    """Run torch on one thread: factored products are (r x r) matrices, where thread start-up
    costs more than the work (10x slower on 2 busy cores), then restore the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class LowRank:
    """A delta ``scale * B @ A`` kept factored. ``B``: (out, r), ``A``: (r, in)."""

    B: torch.Tensor
    A: torch.Tensor
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.B.ndim != 2 or self.A.ndim != 2 or self.B.shape[1] != self.A.shape[0]:
            raise ValueError(f"bad factor shapes B{tuple(self.B.shape)} A{tuple(self.A.shape)}")

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[0], self.A.shape[1])

    def float(self) -> LowRank:
        """Same delta with fp32 factors (fp64 stays fp64)."""
        dtype = torch.float64 if self.B.dtype == torch.float64 else torch.float32
        return LowRank(self.B.to(dtype), self.A.to(dtype), self.scale)

    def to(self, device: torch.device | str) -> LowRank:
        """Same delta with its factors on ``device``."""
        return LowRank(self.B.to(device), self.A.to(device), self.scale)

    def transposed(self) -> LowRank:
        """The delta's transpose, still factored: ``(s B A)^T = s A^T B^T``."""
        return LowRank(self.A.T, self.B.T, self.scale)

    def scaled(self, coefficient: float) -> LowRank:
        return LowRank(self.B, self.A, self.scale * coefficient)

    def balanced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors with the scale folded in: ``(scale * B, A)`` in fp32 (the factors themselves, not copies,
        where they are fp32 and the scale is 1: read them, never write them)."""
        f = self.float()
        return (f.B if f.scale == 1.0 else f.B * f.scale), f.A

    def dense(self) -> torch.Tensor:
        """The dense (out, in) matrix. Only for one module at a time."""
        f = self.float()
        return f.scale * (f.B @ f.A)


def inner(x: LowRank, y: LowRank) -> float:
    """Frobenius inner product ``<sx Bx Ax, sy By Ay> = sx sy trace((By^T Bx)(Ax Ay^T))``.

    Both products are (r_y, r_x) / (r_x, r_y) matrices, so the cost is O((out + in) r_x r_y).
    """
    x64, y64 = _f64(x), _f64(y)
    left = y64.B.T @ x64.B  # (r_y, r_x)
    right = x64.A @ y64.A.T  # (r_x, r_y)
    return float(x.scale * y.scale * torch.sum(left * right.T))


def norm(x: LowRank) -> float:
    """Frobenius norm ``|sBA|_F = sqrt(<sBA, sBA>)``, computed on the factors."""
    return max(inner(x, x), 0.0) ** 0.5


def cosine(x: LowRank | Sequence[LowRank], y: LowRank | Sequence[LowRank]) -> float:
    """Cosine ``<x, y> / (|x| |y|)``; sequences are modules of one layer flattened together.

    With sequences, ``<x, y> = sum_m <x_m, y_m>`` over paired modules of one layer.
    Returns 0.0 when either side is zero.
    """
    xs = [x] if isinstance(x, LowRank) else list(x)
    ys = [y] if isinstance(y, LowRank) else list(y)
    dot = sum(inner(a, b) for a, b in zip(xs, ys, strict=True))
    return cosine_from(dot, sum(inner(a, a) for a in xs) ** 0.5, sum(inner(b, b) for b in ys) ** 0.5)


def cosine_from(dot: float, norm_x: float, norm_y: float) -> float:
    """``dot / (norm_x norm_y)``, 0.0 when either side is zero."""
    return 0.0 if norm_x == 0.0 or norm_y == 0.0 else dot / (norm_x * norm_y)


def weighted_sum(terms: Sequence[tuple[float, LowRank]]) -> LowRank:
    """Exact ``sum_i c_i s_i B_i A_i = [c_1 s_1 B_1 | ... | c_k s_k B_k] @ [A_1; ...; A_k]``.

    The rank is ``sum_i r_i``; mixed ranks are fine (PEFT's ``cat`` without its limits).
    """
    if not terms:
        raise ValueError("weighted_sum of no terms")
    shapes = {t.shape for _, t in terms}
    if len(shapes) != 1:
        raise ValueError(f"weighted_sum of deltas with different shapes: {sorted(shapes)}")
    (rows, columns), ranks = terms[0][1].shape, [term.rank for _, term in terms]
    dtype = torch.float64 if any(term.B.dtype == torch.float64 for _, term in terms) else torch.float32
    device = terms[0][1].B.device
    B = torch.empty(rows, sum(ranks), dtype=dtype, device=device)
    A = torch.empty(sum(ranks), columns, dtype=dtype, device=device)
    start = 0
    for (coefficient, term), rank in zip(terms, ranks, strict=True):
        # written in place, with the rounding of (B_i s_i) c_i in fp32: no per-term copies, no cat
        block = B[:, start:start + rank]
        torch.mul(term.B.to(dtype), term.scale, out=block)
        block.mul_(coefficient)
        A[start:start + rank].copy_(term.A)
        start += rank
    return LowRank(B, A, 1.0)


@dataclass(frozen=True)
class Truncation:
    """Result of :func:`truncate`: the rank-k delta, its exact error and all singular values."""

    delta: LowRank
    error: float
    singular_values: torch.Tensor


def _f64(x: LowRank) -> LowRank:
    return LowRank(x.B.to(torch.float64), x.A.to(torch.float64), x.scale)


GRAM_MIN_RCOND = 1e-10
"""Smallest ``lambda_min / lambda_max`` of a Gram matrix ``M^T M`` for which its Cholesky factor is used as
the ``R`` of ``M = Q R`` (cond(M) < 1e5: Cholesky-QR loses about ``eps * cond(M)^2``, under 1e-6 in fp64)."""


def _thin_qr(M: torch.Tensor, M32: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``M = Q R`` for a narrow fp64 ``M`` (n, r): ``R`` and the map ``X -> Q X`` (``Q`` is not formed).

    Cholesky-QR (Fukaya et al. 2014): ``R = chol(M^T M)^T`` and ``Q X = M (R^-1 X)``, matrix-matrix
    products instead of Householder's column-by-column sweep; the last, big product is taken in float32
    with ``M32`` (``M`` in float32), as the factors are written. Householder QR (``Q`` formed) when ``M`` is
    wide (n < r), ill-conditioned (cond > 1e5, see :data:`GRAM_MIN_RCOND`) or rank deficient.
    """
    if M.shape[0] >= M.shape[1]:
        gram = M.T @ M
        eigenvalues = torch.linalg.eigvalsh(gram)
        if eigenvalues[0] > GRAM_MIN_RCOND * eigenvalues[-1] > 0:
            L, info = torch.linalg.cholesky_ex(gram)
            if int(info) == 0:
                R = L.T
                return R, lambda X: M32 @ torch.linalg.solve_triangular(R, X, upper=True).to(M32.dtype)
    Q, R = torch.linalg.qr(M)
    return R, lambda X: Q @ X


def _core_svd(x: LowRank) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor],
                                   torch.Tensor, torch.Tensor, torch.Tensor]:
    """``B = Q_b R_b``, ``A^T = Q_a R_a``, ``R_b R_a^T = U S V^T`` (all fp64): the maps ``X -> Q_b X`` and
    ``X -> Q_a X``, and ``U``, ``S``, ``V^T``."""
    B32, A32 = x.balanced()
    B, A = B32.to(torch.float64), A32.to(torch.float64)
    (R_b, Q_b), (R_a, Q_a) = _thin_qr(B, B32), _thin_qr(A.T, A32.T)
    U, S, Vh = torch.linalg.svd(R_b @ R_a.T, full_matrices=False)
    return Q_b, Q_a, U, S, Vh


def rank_for_energy(singular_values: torch.Tensor, fraction: float) -> int:
    """Smallest k with ``sum_{j<=k} S_j^2 >= fraction * sum_j S_j^2`` (at least 1)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"energy fraction must be in (0, 1], got {fraction}")
    energy = singular_values.to(torch.float64) ** 2
    total = float(energy.sum())
    if total == 0.0:
        return 1
    cumulative = torch.cumsum(energy, 0) / total
    return int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=torch.float64) - 1e-12)) + 1


def _chosen_rank(S: torch.Tensor, rank: int | None, energy: float | None, rtol: float) -> int:
    """Fixed ``rank`` (clipped), an ``energy`` fraction, or the numerical rank (``S_j > rtol S_0``)."""
    if rank is not None:
        return max(1, min(rank, S.numel()))
    if energy is not None:
        return rank_for_energy(S, energy)
    return max(1, int((S > S[0] * rtol).sum())) if S.numel() and S[0] > 0 else 1


def truncate(x: LowRank, rank: int | None = None, energy: float | None = None) -> Truncation:
    """Best rank-k approximation of ``x`` (Eckart-Young), computed on the factors.

    ``B' = Q_b U_k S_k^(1/2)``, ``A' = S_k^(1/2) V_k^T Q_a^T``; the error is exactly
    ``|x - B'A'|_F = sqrt(sum_{j>k} S_j^2)``. Give ``rank`` (clipped to the input rank)
    or ``energy`` (see :func:`rank_for_energy`); neither keeps every non-zero direction.
    """
    Q_b, Q_a, U, S, Vh = _core_svd(x)
    k = _chosen_rank(S, rank, energy, rtol=1e-12)
    root = S[:k].sqrt()
    B = Q_b(U[:, :k] * root)  # (out, k)
    A = Q_a(Vh[:k].T * root).T  # (k, in)
    error = float(torch.sqrt(torch.sum(S[k:] ** 2)))
    return Truncation(LowRank(B.float(), A.float(), 1.0), error, S.float())


def factorize(dense: torch.Tensor, rank: int | None = None, energy: float | None = None) -> Truncation:
    """Truncated SVD of one dense (out, in) delta back to LoRA form, with its error.

    Used after element-wise methods (TIES, DARE, magnitude). ``rank=None`` and
    ``energy=None`` keep the numerical rank. A fixed ``rank`` below half the smaller
    dimension uses a randomised SVD (Halko et al. 2011, ``torch.svd_lowrank``, 4 power
    iterations), about 10x faster than the full SVD on LLM-sized modules; its error is then
    measured exactly as ``|D - B'A'|_F`` rather than read off the spectrum, and
    ``singular_values`` holds the top ``rank + 8`` estimates only.
    """
    dense = dense.to(torch.float32)
    smaller = min(dense.shape)
    if rank is not None and energy is None and rank < smaller // 2:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(0)  # deterministic sketch
        U, S, V = torch.svd_lowrank(dense, q=min(rank + 8, smaller), niter=4)
        torch.random.set_rng_state(generator_state)
        root = S[:rank].sqrt()
        delta = LowRank(U[:, :rank] * root, root[:, None] * V[:, :rank].T, 1.0)
        error = float((dense.double() - delta.B.double() @ delta.A.double()).norm())
        return Truncation(delta, error, S)
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    k = _chosen_rank(S, rank, energy, rtol=1e-6)
    root = S[:k].sqrt()
    delta = LowRank(U[:, :k] * root, root[:, None] * Vh[:k], 1.0)
    error = float(torch.sqrt(torch.sum(S[k:].double() ** 2)))
    return Truncation(delta, error, S)
