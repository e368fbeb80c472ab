"""Core-space merging: any merge rule on small (R x R) core matrices, exact and never dense.

Panariello et al., "Accurate and Efficient Low-Rank Model Merging in Core Space", NeurIPS 2025
(arXiv 2509.17786; reference code github.com/apanariello4/core-space-merging, ``task_merger.py``,
``MatrixPerLayerMerger.get_core_matrices``). For one module with task vectors
``tau_i = s_i B_i A_i`` (``B_i``: out x r_i, ``A_i``: r_i x in, ``R = sum r_i``):

* reference bases from the SVD of the stacked factors (SVD, not QR, as their code does: the
  element-wise rules below are not invariant under a rotation of the basis, so the basis must be
  the canonical one, unique up to signs, which those rules are equivariant to):
  ``[s_1 B_1 | ... | s_k B_k] = U_B S_B W_B^T`` and ``[A_1; ...; A_k] = W_A S_A V_A^T``;
* cores ``M_i = U_B^T tau_i V_A`` (R_B x R_A, R_B = min(out, R), R_A = min(in, R)). Lossless:
  every ``tau_i`` lies in ``span(U_B) x span(V_A)``, so ``tau_i = U_B M_i V_A^T`` (the paper's
  no-information-loss result). From the SVDs, ``U_B^T [s_i B_i] = (S_B W_B^T)[:, cols_i]`` and
  ``A_i V_A = (W_A S_A)[rows_i, :]``, so each core costs O(R^3) after O((out + in) R^2) SVDs;
* a merge rule on the cores gives ``M``; the result is the LoRA ``U_B M V_A^T`` of rank <= R.
  With ``M = u S v^T``: ``B' = U_B u_k S_k^(1/2)``, ``A' = S_k^(1/2) v_k^T V_A^T``; the truncation
  error is exactly ``sqrt(sum_{j>k} S_j^2)`` (the embedding is an isometry).

Task arithmetic in core space is the exact weighted sum. TIES / DARE / magnitude on the cores
(their code flattens each core and applies the usual rule: ``_process_ties``, ``get_dare_delta_w``)
are the core-space variants, a different merge from the full-space ones (DESIGN.md section 7).
The basis is built from the task vectors ``s_i B_i A_i`` without the merge coefficients, as in
their code (coefficients weight the rule, they do not move the basis); ``merge_terms`` negates a
forgotten (negative-coefficient) core, so sign election sees the direction applied.
Everything is float64; the factors returned are float32, like :func:`lata_peft.lowrank.truncate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .lowrank import LowRank, rank_for_energy, serial
from .methods import Method, merge_terms, module_generator

if TYPE_CHECKING:  # combine will import this module: no runtime import back
    from .combine import RankPolicy

__all__ = ["CoreBasis", "core_basis", "from_core", "merge_cores", "merge_in_core"]

EXACT_RTOL = 1e-12  # ``exact``: drop only directions with S_j <= 1e-12 S_0 (fp64 round-off), error still reported


@dataclass(frozen=True)
class CoreBasis:
    """``U_B`` (out, R_B) and ``V_A`` (in, R_A), orthonormal columns; ``cores`` (k, R_B, R_A): ``U_B^T tau_i V_A``.

    All float64. ``tau_i = U_B @ cores[i] @ V_A.T`` exactly (up to round-off).
    """

    U_B: torch.Tensor
    V_A: torch.Tensor
    cores: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """The core shape ``(R_B, R_A)``."""
        return (self.U_B.shape[1], self.V_A.shape[1])


def core_basis(deltas: Sequence[LowRank]) -> CoreBasis:
    """Reference bases and cores of the task vectors ``s_i B_i A_i`` of one module (Panariello et al. 2025).

    ``[s_1 B_1 | ...] = U_B S_B W_B^T``, ``[A_1; ...] = W_A S_A V_A^T`` (thin SVDs, float64);
    ``M_i = (S_B W_B^T)[:, cols_i] @ (W_A S_A)[rows_i, :]`` ``= U_B^T s_i B_i A_i V_A``.
    Cost O((out + in) R^2 + k R^3); nothing of size out x in is formed.
    """
    if not deltas:
        raise ValueError("core_basis of no deltas")
    if len({d.shape for d in deltas}) != 1:
        raise ValueError(f"core_basis of deltas with different shapes: {sorted({d.shape for d in deltas})}")
    Bs = [d.B.to(torch.float64) * d.scale for d in deltas]
    As = [d.A.to(torch.float64) for d in deltas]
    U_B, S_B, Wh_B = torch.linalg.svd(torch.cat(Bs, dim=1), full_matrices=False)  # (out, R_B), (R_B,), (R_B, R)
    W_A, S_A, Vh_A = torch.linalg.svd(torch.cat(As, dim=0), full_matrices=False)  # (R, R_A), (R_A,), (R_A, in)
    left = S_B[:, None] * Wh_B  # (R_B, R) = U_B^T [s_1 B_1 | ...]
    right = W_A * S_A  # (R, R_A) = [A_1; ...] V_A
    cores, start = [], 0
    for d in deltas:
        stop = start + d.rank
        cores.append(left[:, start:stop] @ right[start:stop])  # (R_B, R_A)
        start = stop
    return CoreBasis(U_B, Vh_A.T, torch.stack(cores))


def _kept_rank(S: torch.Tensor, policy: RankPolicy | None) -> int:
    """Directions kept: the policy's fixed ``rank`` (clipped) or ``energy``; ``exact``: all with S_j > 1e-12 S_0."""
    if S.numel() == 0 or float(S[0]) == 0.0:
        return min(1, S.numel())
    mode = "exact" if policy is None else policy.mode
    if mode == "fixed":
        return max(1, min(int(policy.rank), S.numel()))
    if mode == "energy":
        return rank_for_energy(S, float(policy.energy))
    return max(1, int((S > S[0] * EXACT_RTOL).sum()))


def from_core(basis: CoreBasis, merged: torch.Tensor, policy: RankPolicy | None = None) -> tuple[LowRank, float, float]:
    """``U_B M V_A^T`` as LoRA factors under ``policy`` (``None``: exact), with the exact truncation error.

    ``M = u S v^T``; ``B' = U_B u_k S_k^(1/2)``, ``A' = S_k^(1/2) v_k^T V_A^T``;
    ``error = sqrt(sum_{j>k} S_j^2)``, ``relative = error / |M|_F`` (``|U_B M V_A^T|_F = |M|_F``).
    """
    u, S, vh = torch.linalg.svd(merged.to(torch.float64), full_matrices=False)
    k = _kept_rank(S, policy)
    root = S[:k].sqrt()
    B = basis.U_B @ (u[:, :k] * root)  # (out, k)
    A = (root[:, None] * vh[:k]) @ basis.V_A.T  # (k, in)
    error = float(S[k:].square().sum().sqrt())
    total = float(S.square().sum().sqrt())
    return LowRank(B.float(), A.float(), 1.0), error, error / total if total else 0.0


def merge_cores(cores: torch.Tensor, coefficients: Sequence[float], method: Method, density: float,
                generator: torch.Generator, sign_method: str) -> torch.Tensor:
    """The merged core ``M`` of ``cores`` (k, R_B, R_A) by ``method`` (:func:`lata_peft.methods.merge_terms`).

    Task arithmetic: ``sum_i c_i M_i``; element-wise rules see ``M_i`` (negated for ``c_i < 0``) with
    weights ``|c_i|``, exactly as they see dense deltas in the full space.
    """
    return merge_terms(list(zip(coefficients, cores, strict=True)), method, density, generator, sign_method)


def merge_in_core(
    terms: Sequence[tuple[float, LowRank]], method: Method, policy: RankPolicy | None = None, density: float = 0.5,
    seed: int = 0, name: str = "", sign_method: str = "total",
) -> tuple[LowRank, float, float]:
    """Merge ``[(c_i, tau_i)]`` of one module in core space: ``(delta, error, relative_error)``.

    Same contract as ``combine._combine_dense``: ``policy`` is a ``combine.RankPolicy`` (``None`` or
    ``exact``: no truncation, rank <= sum r_i); DARE's mask comes from
    ``methods.module_generator(seed, name)``. Cost O((out + in) R^2 + k R^3), R = sum r_i. Runs on one
    thread (:func:`lata_peft.lowrank.serial`): on 2 busy cores, threaded SVDs of (4096, 48) matrices were
    20-60x slower (1.7 s vs 0.03 s per module).
    """
    if not terms:
        raise ValueError("merge_in_core of no terms")
    with serial():
        basis = core_basis([delta for _, delta in terms])
        merged = merge_cores(basis.cores, [c for c, _ in terms], method, density, module_generator(seed, name),
                             sign_method)
        return from_core(basis, merged, policy)
