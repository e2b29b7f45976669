"""Core space (003 Sec. 4): merge ``Tr × Tr`` core matrices in shared reference bases.

Transcribed from 003 with PEFT shapes (``A_t: (r_t, in)``, ``B_t: (out, r_t)``; 003 writes
``A^{(t)} ∈ R^{r×n}``, ``B^{(t)} ∈ R^{m×r}``, the same orientation):

* Reference bases (003 Def. 1, Eq. 3): ``[B_1 … B_T] = U_B^ref Σ_B V_Bᵀ`` and
  ``[A_1; …; A_T] = U_A Σ_A V_A^refᵀ`` (float64, ``full_matrices=False``).
* Core matrices (003 Def. 2, Eq. 8): ``M_t = (U_B^refᵀ B_t)(A_t V_A^ref)``.
* Reconstruction (003 Eq. 10): ``ΔW = U_B^ref M* V_A^refᵀ``, returned as
  ``LowRank(U_B^ref M*, V_A^refᵀ)``; no dense ``out × in`` matrix is formed anywhere.

Heterogeneous ranks work because only concatenation is used (003 App. E.2).

Decision (003 App. A.4 vs Listing 1): the bases are truncated to the *numerical* rank of the
stacks (singular values above ``σ_max · rank_rtol``, default ``max(shape) · eps(float64)``).
Listing 1 keeps all ``min(Tr, dim)`` vectors; App. A.4 truncates to the intrinsic rank
``d_U = rank([B_1 … B_T])``. Both are lossless and they coincide whenever the stacks have full
rank (the generic case); truncation keeps arbitrary null-space vectors out of the core
(otherwise e.g. an isotropic merge would spread mass onto them), and makes
``T·r > min(out, in)`` and duplicated adapters well defined. The core matrix is then
``d_U × d_V`` (square ``Tr × Tr`` in the generic case).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from mergelab.linalg import numerical_rank, svd64
from mergelab.params import Interval
from mergelab.spaces.base import Context, Space, output_dtype, require_low_rank
from mergelab.taskset import LowRank, Update

__all__ = ["CoreSpace", "alignment_errors", "reference_bases"]


def reference_bases(updates: Sequence[LowRank], rank_rtol: float | None = None) -> tuple[Tensor, Tensor]:
    """``(U_B^ref (out, d_U), V_A^ref (in, d_V))`` from SVDs of the stacked factors (003 Eq. 3)."""
    B_stack = torch.cat([u.B for u in updates], dim=1).to(torch.float64)  # (out, Tr)
    A_stack = torch.cat([u.A for u in updates], dim=0).to(torch.float64)  # (Tr, in)
    U_B, s_B, _ = svd64(B_stack)
    V_A, s_A, _ = svd64(A_stack.T)  # the same right vectors; LAPACK is ~2x faster on the tall transpose
    # at least one vector, so that an all-zero module (an untrained LoRA: B = 0) still has a basis
    d_U = max(1, numerical_rank(s_B, tuple(B_stack.shape), torch.float64, rank_rtol))
    d_V = max(1, numerical_rank(s_A, tuple(A_stack.shape), torch.float64, rank_rtol))
    return U_B[:, :d_U], V_A[:, :d_V]


def alignment_errors(updates: Sequence[LowRank], U_B_ref: Tensor, V_A_ref: Tensor) -> list[tuple[float, float]]:
    """Per task ``(ε_U, ε_V)`` of 003 Eq. (13): ``r_t − ‖U_B^(t)ᵀ U_B^ref‖_F²`` and likewise for A.

    ``U_B^(t)`` / ``V_A^(t)`` are the left / right singular vectors of ``B_t`` / ``A_t`` for
    their non-zero singular values. Zero (to round-off) means the projection is lossless.
    """
    errors = []
    for u in updates:
        U_t, s_B, _ = svd64(u.B)
        _, s_A, Vh_t = svd64(u.A)
        U_t = U_t[:, : numerical_rank(s_B, tuple(u.B.shape), torch.float64)]
        V_t = Vh_t[: numerical_rank(s_A, tuple(u.A.shape), torch.float64)].T
        eps_U = U_t.shape[1] - float((U_t.T @ U_B_ref).square().sum())
        eps_V = V_t.shape[1] - float((V_t.T @ V_A_ref).square().sum())
        errors.append((eps_U, eps_V))
    return errors


@dataclass(frozen=True)
class CoreSpace(Space):
    """Core space of 003 (see the module docstring).

    Options:
        scope: ``"module"`` (003's per-layer merge, ``MatrixPerLayerMerger``) or ``"model"``
            (element-wise methods see all core matrices of the model concatenated).
        rank_rtol: relative tolerance for the reference bases' numerical rank; ``None`` is
            ``max(shape) · eps(float64)``.
    """

    name: ClassVar[str] = "core"
    option_intervals: ClassVar = {"rank_rtol": Interval(0.0, 1.0, low_open=True, high_open=True)}
    basis_options: ClassVar = ("rank_rtol",)
    scope: Literal["module", "model"] = "module"  # type: ignore[misc]
    rank_rtol: float | None = None

    def basis(self, updates: Sequence[Update]) -> tuple[Tensor, Tensor]:
        """``(U_B^ref, V_A^ref)``, the reference bases of 003 Def. 1, Eq. (3) (:func:`reference_bases`)."""
        return reference_bases(require_low_rank(updates, self.name), self.rank_rtol)

    def project(self, updates: Sequence[Update], basis: tuple[Tensor, Tensor] | None = None) -> tuple[list[Tensor], Context]:
        """Core matrices ``M_t = (U_B^refᵀ B_t)(A_t V_A^ref)`` (003 Def. 2, Eq. 8) in the given or computed bases."""
        lowrank = require_low_rank(updates, self.name)
        U_B, V_A = reference_bases(lowrank, self.rank_rtol) if basis is None else basis
        cores = [(U_B.T @ u.B.to(torch.float64)) @ (u.A.to(torch.float64) @ V_A) for u in lowrank]  # (d_U, d_V)
        ctx = Context(shape=tuple(updates[0].shape), dtype=output_dtype(updates), left=U_B, left_pinv=U_B.T, right=V_A,
                      info={"d_U": U_B.shape[1], "d_V": V_A.shape[1]})
        return cores, ctx
