"""SVD-based merge rules: TSV-Merge, Iso-C and Iso-CTS, on a stack of task matrices.

Every rule takes ``deltas`` (k, m, n) and ``weights`` (k,) in the convention of
:func:`lata_peft.methods.merge_terms` (a forgotten task enters negated with a positive weight) and
works on the weighted task matrices ``X_t = w_t delta_t`` (``= c_t tau_t``; for equal weights this is
the papers' global scale ``alpha`` times their task matrices). ``d = min(m, n)`` is the papers'
"full rank" of the layer, from which their counts are taken.

Meant for core space (:mod:`lata_peft.core_space`: ``m = R_B``, ``n = R_A``, so only SVDs of
R x R cores are needed, as Panariello et al. 2025 run TSV and Iso on cores). The same functions
run on dense (k, out, in) stacks, where they are the papers' full-space rules.

Numerical rank. The papers' task matrices are full rank (full fine-tunes); LoRA task matrices are
not. A singular direction with singular value ~0 is an arbitrary vector (LAPACK's completion of
the basis), and putting weight on it (Iso's mean value, or TSV's orthogonalisation mixing it in)
would make the merge depend on round-off. We therefore keep only directions with
``S_j > scale max(m, n) eps`` (``torch.linalg.matrix_rank``'s tolerance; ``scale`` is the matrix's own
``S_0``, or for a sum or a residual the largest spectral norm of the task matrices). On generic
cores (independent adapters) nothing is dropped and the rules are exactly the papers'.

Commuting with the core embedding (core result ``U_B M V_A^T`` == the rule on the dense task
matrices; ``U_B`` / ``V_A`` carry singular vectors and polar factors over unchanged), as the tests assert:
Iso-C always; TSV when both spaces keep the same per-task counts (its default ``d // T`` gives ``r`` in
both for equal ranks ``r``; with mixed ranks core space keeps ``R // T`` of a larger task, full space all
of it); Iso-CTS not: its counts come from ``d`` = R in core space but min(out, in) in full space, where
the common part (``0.8 d >= R``) takes every direction and Iso-CTS degenerates to Iso-C.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # methods may register these rules: no import of methods at module level
    from .methods import DenseMerge, Method

__all__ = ["RULES", "dense_merge", "iso_c", "iso_cts", "orthogonalize", "subspace_method", "tsv_merge"]


def _weighted(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return deltas * weights.to(deltas.dtype).view(-1, 1, 1)  # (k, m, n)


def _rank(S: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, scale: float | None = None) -> int:
    """Numerical rank: ``#{S_j > scale max(m, n) eps}``, ``scale = S_0`` by default (``torch.linalg.matrix_rank``'s
    tolerance). A residual (Iso-CTS) passes the scale of the matrices it came from: round-off is not a direction."""
    reference = float(S[0]) if S.numel() else 0.0
    reference = max(reference, scale or 0.0)
    if reference == 0.0:
        return 0
    return int((S > reference * max(shape[-2:]) * torch.finfo(dtype).eps).sum())


def _svd(X: torch.Tensor, limit: int | None = None,
         scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``X`` cut to its numerical rank (and to ``limit``): ``U`` (m, q), ``S`` (q,), ``Vh`` (q, n)."""
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    q = _rank(S, tuple(X.shape), X.dtype, scale)
    if limit is not None:
        q = min(q, max(limit, 0))
    return U[:, :q], S[:q], Vh[:q]


def _scale(X: torch.Tensor) -> float:
    """The largest spectral norm in the stack: the scale below which a direction of a sum or residual is round-off."""
    return float(torch.linalg.matrix_norm(X, ord=2).max()) if X.numel() else 0.0


def orthogonalize(X: torch.Tensor) -> torch.Tensor:
    """Nearest matrix with orthonormal columns (orthogonal Procrustes / polar factor): ``X = P D Q^T -> P Q^T``.

    TSV-Merge's decorrelation step (Gargiulo et al. 2025: "whitening" / orthogonal Procrustes; their code
    ``u_u @ v_u``), reused by Iso-CTS. For a wide ``X`` (orthonormal rows wanted) pass ``X.T`` and transpose.
    """
    P, _, Qh = torch.linalg.svd(X, full_matrices=False)
    return P @ Qh


def tsv_merge(deltas: torch.Tensor, weights: torch.Tensor, fraction: float | None = None) -> torch.Tensor:
    """TSV-Merge, Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025.

    arXiv 2412.00081; code ``compute_and_sum_svd_mem_reduction`` (also in Panariello et al.'s core space,
    ``get_tsv_delta_w``). Per task ``X_t = U_t S_t V_t^T``, keep the top ``k_t = int(fraction d)``
    components (``fraction`` defaults to 1/T, the paper's choice; ``k_t`` is capped at rank(X_t));
    ``U = [U_1k | ... | U_Tk]``, ``V = [V_1k | ... | V_Tk]``, ``S = diag(S_1k, ..., S_Tk)``;
    decorrelate ``U_perp = orthogonalize(U)``, ``V_perp = orthogonalize(V)``;
    result ``U_perp S V_perp^T``. In core space with equal ranks (d = R = T r) the default keeps every
    component; with mixed ranks ``R // T`` cuts the larger tasks (ranks 4, 8, 4: k = 4, 5, 4, as Panariello et
    al.'s code does), while ``fraction=1`` keeps all of each (k_t = r_t, sum_t k_t = R = d).
    """
    X = _weighted(deltas, weights)
    d = min(X.shape[-2:])
    count = d // X.shape[0] if fraction is None else int(d * fraction)
    parts = [_svd(x, count) for x in X]
    U = torch.cat([u for u, _, _ in parts], dim=1)  # (m, K)
    S = torch.cat([s for _, s, _ in parts])  # (K,)
    Vh = torch.cat([vh for _, _, vh in parts], dim=0)  # (K, n)
    if S.numel() == 0:
        return torch.zeros_like(X[0])
    return (orthogonalize(U) * S) @ orthogonalize(Vh.T).T


def _isotropic(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * mean(S) * U V^T``: the spectrum flattened to its mean (Marczak et al. 2025, Iso-C)."""
    if S.numel() == 0:
        return torch.zeros(U.shape[0], Vh.shape[1], dtype=U.dtype)
    return (alpha * S.mean()) * (U @ Vh)


def iso_c(deltas: torch.Tensor, weights: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Iso-C, Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces".

    ICML 2025, arXiv 2502.04959, code ``src/utils/iso.py: iso_c``. ``sum_t X_t = U S V^T`` (task arithmetic),
    ``Iso-C = alpha * mean(S) * U V^T``: every direction of the sum gets the same singular value.
    The mean is over the numerical rank of the sum (all R values of a generic core; the paper's
    full-rank task matrices make that min(m, n)). ``alpha`` (default 1) multiplies the coefficients.
    """
    X = _weighted(deltas, weights)
    U, S, Vh = _svd(X.sum(0), scale=_scale(X))
    return _isotropic(U, S, Vh, alpha)


def _common_count(d: int, tasks: int, common_fraction: float) -> tuple[int, int]:
    """Their split of ``d`` dims: ``common = d - T round((d - int(d f)) / T)``, per task ``(d - common) / T``."""
    common = int(d * common_fraction)
    specific_total = round((d - common) / tasks) * tasks
    common = d - specific_total
    return common, specific_total // tasks


def iso_cts(deltas: torch.Tensor, weights: torch.Tensor, alpha: float = 1.0,
            common_fraction: float = 0.8) -> torch.Tensor:
    """Iso-CTS (Marczak et al., ICML 2025, arXiv 2502.04959; code ``src/utils/iso.py: iso_cts``).

    Common subspace: the top ``c`` singular triplets of ``sum_t X_t`` (``c`` from ``common_fraction`` of d,
    adjusted so the rest splits evenly over the T tasks: ``s = (d - c) / T`` each). Task-specific: per
    task, ``X_t - U_c U_c^T X_t`` (the common left subspace projected out), its top ``s`` triplets.
    Concatenate ``U = [U_1s | ... | U_Ts | U_c]`` (and ``S``, ``V`` alike), orthogonalise U and V
    (:func:`orthogonalize`), and flatten the spectrum: ``alpha * mean(S) * U_perp V_perp^T``.
    Counts are capped at each matrix's numerical rank. Defaults: ``common_fraction = 0.8`` (their config).
    """
    X = _weighted(deltas, weights)
    common, per_task = _common_count(min(X.shape[-2:]), X.shape[0], common_fraction)
    scale = _scale(X)
    U_c, S_c, Vh_c = _svd(X.sum(0), common, scale)
    parts = [_svd(x - U_c @ (U_c.T @ x), per_task, scale) for x in X]
    U = torch.cat([*(u for u, _, _ in parts), U_c], dim=1)
    S = torch.cat([*(s for _, s, _ in parts), S_c])
    Vh = torch.cat([*(vh for _, _, vh in parts), Vh_c], dim=0)
    if S.numel() == 0:
        return torch.zeros_like(X[0])
    return _isotropic(orthogonalize(U), S, orthogonalize(Vh.T).T, alpha)


Rule = Callable[..., torch.Tensor]
RULES: dict[str, tuple[Rule, str]] = {
    "tsv": (tsv_merge, "TSV-Merge: per-task top singular vectors, decorrelated (Gargiulo et al. 2025)"),
    "iso_c": (iso_c, "Iso-C: task arithmetic with a flat (isotropic) spectrum (Marczak et al. 2025)"),
    "iso_cts": (iso_cts, "Iso-CTS: common + task-specific subspaces, isotropic (Marczak et al. 2025)"),
}


def _as_dense_merge(rule: Rule, deltas: torch.Tensor, weights: torch.Tensor, density: float,
                    generator: torch.Generator, sign_method: str, **params: float | None) -> torch.Tensor:
    """``methods.DenseMerge`` signature; ``density``, ``generator`` and ``sign_method`` do not apply."""
    return rule(deltas, weights, **params)


def dense_merge(name: str, **params: float | None) -> DenseMerge:
    """Rule ``name`` with ``params`` (``fraction``; ``alpha``; ``alpha``, ``common_fraction``) as a
    ``methods.DenseMerge`` ``(deltas, weights, density, generator, sign_method) -> merged``."""
    rule, _ = RULES[name]
    for key in ("fraction", "common_fraction"):
        value = params.get(key)
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}: {key} must be in [0, 1], got {value}")
    return functools.partial(_as_dense_merge, rule, **params)


def subspace_method(name: str, **params: float | None) -> Method:
    """A :class:`~lata_peft.methods.Method` running rule ``name`` with ``params``; ``merge_terms`` and
    ``core_space.merge_in_core`` call it like any element-wise method."""
    from .methods import Method  # at call time: methods may import this module

    return Method(name, dense_merge(name, **params), RULES[name][1])
