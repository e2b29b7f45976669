"""Core space (003 Sec. 4): merge ``Tr × Tr`` core matrices in shared reference bases.

Transcribed from 003 with PEFT shapes (``A_t: (r_t, in)``, ``B_t: (out, r_t)``; 003 writes
``A^{(t)} ∈ R^{r×n}``, ``B^{(t)} ∈ R^{m×r}``, the same orientation; ``k = Σ_t r_t``):

* Reference bases (003 Def. 1, Eq. 3): ``[B_1 … B_T] = U_B^ref Σ_B V_Bᵀ`` and
  ``[A_1; …; A_T] = U_A Σ_A V_A^refᵀ``. Both are reduced SVDs of a tall stack ``S``: ``out × k``, and
  ``[A_1; …; A_T]ᵀ = V_A^ref Σ_A U_Aᵀ`` (``in × k``) (:func:`stack_svd`, float64).
* Core matrices (003 Def. 2, Eq. 8): ``M_t = (U_B^refᵀ B_t)(A_t V_A^ref)``. Eq. 3 gives
  ``U_B^refᵀ [B_1 … B_T] = Σ_B V_Bᵀ``, so ``U_B^refᵀ B_t = Σ_B V_B[t]ᵀ`` with ``V_B[t]`` the ``r_t`` rows
  of ``V_B`` that belong to task ``t``, and likewise ``A_t V_A^ref = U_A[t] Σ_A``: each core is a
  product of rank ``r_t`` taken from ``k × d`` matrices alone (:func:`core_factors`).
* Reconstruction (003 Eq. 10): ``ΔW = U_B^ref M* V_A^refᵀ``, returned as a LowRank; no dense
  ``out × in`` matrix is formed anywhere.

**Route (issue 31).** 003 takes two SVDs of the stacks. Here a stack's SVD comes from the
eigendecomposition of its ``k × k`` Gram matrix ``SᵀS = V Σ² Vᵀ``, and ``U = S V Σ⁻¹`` is never
formed: it stays a :class:`~mergelab.spaces.base.Factored` map ``S · (V Σ⁻¹)``, so the merged update
comes back as ``LowRank([B_1 … B_T] X, [A_1; …; A_T])`` with ``X = V_B Σ_B⁻¹ M* Σ_A⁻¹ U_Aᵀ`` (``k × k``):
the inputs' own stack is the right factor. The cost of a module is two Gram products and a
``k × k`` eigendecomposition per side, the ``k × k`` merge and one ``out × k × k`` product.

*Fallback.* A float64 Gram resolves a stack's singular vectors to about ``eps · cond(SᵀS)``, and
``S V Σ⁻¹`` is orthonormal to the same order. The Gram route is taken when the stack has full
column rank with ``cond(SᵀS) ≤ GRAM_COND_MAX = eps⁻¹ᐟ²`` (singular values within a factor
``eps^(-1/4) ≈ 8200`` of each other; errors ≤ ``√eps ≈ 1.5e-8``, below float32 round-off), and no
singular value falls under the rank tolerance. Otherwise — ``k`` above the stack's height
(``T·r > min(out, in)``), duplicated adapters, an untrained ``B = 0``, or singular values spread
wider than float64 can carry squared — the stack's SVD is taken as 003 does, truncated to its
numerical rank, and ``U`` is formed. Each side decides for itself.

Decision (003 App. A.4 vs Listing 1): the bases are truncated to the *numerical* rank of the
stacks (singular values above ``σ_max · rank_rtol``, default ``max(shape) · eps(float64)``).
Listing 1 keeps all ``min(Tr, dim)`` vectors; App. A.4 truncates to the intrinsic rank
``d_U = rank([B_1 … B_T])``. Both are lossless and they coincide whenever the stacks have full
rank (the generic case, and the Gram route's); truncation keeps arbitrary null-space vectors out
of the core (otherwise e.g. an isotropic merge would spread mass onto them), and makes
``T·r > min(out, in)`` and duplicated adapters well defined. The core matrix is then
``d_U × d_V`` (square ``Tr × Tr`` in the generic case).

Heterogeneous ranks work because only concatenation is used (003 App. E.2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, NamedTuple

import torch
from torch import Tensor

from mergelab.linalg import numerical_rank, rank_tolerance, svd64
from mergelab.params import Interval
from mergelab.spaces.base import Context, Factored, Space, StoredBasis, output_dtype, require_low_rank
from mergelab.taskset import LowRank, Update

__all__ = ["GRAM_COND_MAX", "CoreBasis", "CoreSpace", "StackSVD", "alignment_errors", "core_basis", "core_factors",
           "reference_basis", "reference_bases", "stack_svd", "stacks"]

#: The largest ``cond(SᵀS)`` for which a stack's SVD is taken from its Gram matrix: ``eps(float64)^(-1/2)``
#: (module docstring, "Route").
GRAM_COND_MAX = torch.finfo(torch.float64).eps ** -0.5


class StackSVD(NamedTuple):
    """The reduced SVD ``S = U diag(s) Vᵀ`` of a tall stack ``S`` (``n × k``), truncated to ``d`` values.

    ``s`` (``d``, descending), ``V`` (``k × d``); ``U`` (``n × d``) is formed only by the SVD fallback,
    ``None`` on the Gram route where it is ``S V diag(1/s)`` (:func:`reference_basis`).
    """

    s: Tensor
    V: Tensor
    U: Tensor | None


class CoreBasis(NamedTuple):
    """One module's reference bases (003 Eq. 3): ``B``: ``[B_1 … B_T] = U_B^ref Σ_B V_Bᵀ``;
    ``A``: ``[A_1; …; A_T]ᵀ = V_A^ref Σ_A U_Aᵀ`` (its ``U`` is ``V_A^ref``, its ``V`` is ``U_A``)."""

    B: StackSVD
    A: StackSVD


def stacks(updates: Sequence[LowRank]) -> tuple[Tensor, Tensor]:
    """``[B_1 … B_T]`` (``out × k``) and ``[A_1; …; A_T]ᵀ`` (``in × k``, a transposed view), float64 (003 Eq. 3)."""
    B_stack = torch.cat([u.B for u in updates], dim=1).to(torch.float64)
    A_stack = torch.cat([u.A for u in updates], dim=0).to(torch.float64)
    return B_stack, A_stack.T


def _gram_svd(stack: Tensor, rank_rtol: float | None) -> StackSVD | None:
    """``(s, V, None)`` from ``SᵀS = V diag(s²) Vᵀ``, or ``None`` where the Gram route does not apply (module docstring)."""
    n, k = stack.shape
    if k > n:
        return None
    eigenvalues, V = torch.linalg.eigh(stack.T @ stack)  # ascending, (k,), (k, k)
    low, top = float(eigenvalues[0]), float(eigenvalues[-1])
    if not (top > 0.0 and low * GRAM_COND_MAX >= top):
        return None
    s = eigenvalues.flip(0).sqrt()
    if float(s[-1]) <= rank_tolerance(s, (n, k), torch.float64, rank_rtol):
        return None
    return StackSVD(s, V.flip(1), None)


def stack_svd(stack: Tensor, rank_rtol: float | None = None) -> StackSVD:
    """The reduced SVD of a tall float64 stack of LoRA factors, truncated to its numerical rank (003 Eq. 3).

    From the ``k × k`` Gram matrix where the stack is well conditioned, otherwise from
    :func:`~mergelab.linalg.svd64` of the stack itself (module docstring, "Route"). At least one
    value is kept, so that an all-zero module (an untrained LoRA: ``B = 0``) still has a basis.
    """
    gram = _gram_svd(stack, rank_rtol)
    if gram is not None:
        return gram
    U, s, Vh = svd64(stack)
    d = max(1, numerical_rank(s, tuple(stack.shape), torch.float64, rank_rtol))
    return StackSVD(s[:d], Vh[:d].T, U[:, :d])


def core_basis(stacked: tuple[Tensor, Tensor], rank_rtol: float | None = None) -> CoreBasis:
    """The reference bases of 003 Eq. (3) from the :func:`stacks` of one module's updates."""
    B_stack, A_stack_T = stacked
    return CoreBasis(stack_svd(B_stack, rank_rtol), stack_svd(A_stack_T, rank_rtol))


def reference_basis(stack: Tensor, svd: StackSVD) -> Tensor | Factored:
    """``U`` of a stack's SVD as a map: formed (SVD fallback) or ``S · (V diag(1/s))`` (Gram route, 003 Eq. 3
    solved for ``U``)."""
    return svd.U if svd.U is not None else Factored(stack, svd.V / svd.s)


def reference_bases(updates: Sequence[LowRank], rank_rtol: float | None = None,
                    basis: CoreBasis | None = None) -> tuple[Tensor, Tensor]:
    """``(U_B^ref (out, d_U), V_A^ref (in, d_V))`` of 003 Eq. (3), formed (for analyses and the core banks);
    from ``basis`` when given (:func:`core_basis` of the same updates)."""
    stacked = stacks(updates)
    basis = core_basis(stacked, rank_rtol) if basis is None else basis
    U_B, V_A = (reference_basis(S, svd) for S, svd in zip(stacked, basis, strict=True))
    return tuple(x.dense() if isinstance(x, Factored) else x for x in (U_B, V_A))  # type: ignore[return-value]


def core_factors(ranks: Sequence[int], basis: CoreBasis) -> list[LowRank]:
    """The core matrices ``M_t = (U_B^refᵀ B_t)(A_t V_A^ref)`` (003 Def. 2, Eq. 8) as their factors
    ``Σ_B V_B[t]ᵀ`` (``d_U × r_t``) and ``U_A[t] Σ_A`` (``r_t × d_V``), float64; ``ranks`` are the tasks' ``r_t``
    in stacking order (module docstring)."""
    left = (basis.B.V * basis.B.s).T  # (d_U, k): Σ_B V_Bᵀ = U_B^refᵀ [B_1 … B_T]
    right = basis.A.V * basis.A.s  # (k, d_V): U_A Σ_A = [A_1; …; A_T] V_A^ref
    return [LowRank(b, a) for b, a in zip(left.split(list(ranks), dim=1), right.split(list(ranks), dim=0), strict=True)]


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
    #: ``s_B``, ``V_B``, ``s_A``, ``U_A`` and, for a side the SVD fallback decomposed, ``U_B_ref`` / ``V_A_ref``
    #: (version 3)
    stored_basis: ClassVar = StoredBasis("3", {"rank_rtol": None},
                                         lambda b: {"s_B": b.B.s, "V_B": b.B.V, "s_A": b.A.s, "U_A": b.A.V,
                                                    **({"U_B_ref": b.B.U} if b.B.U is not None else {}),
                                                    **({"V_A_ref": b.A.U} if b.A.U is not None else {})},
                                         lambda t: CoreBasis(StackSVD(t["s_B"], t["V_B"], t.get("U_B_ref")),
                                                             StackSVD(t["s_A"], t["U_A"], t.get("V_A_ref"))))
    scope: Literal["module", "model"] = "module"  # type: ignore[misc]
    rank_rtol: float | None = None

    def basis(self, updates: Sequence[Update]) -> CoreBasis:
        """The reference bases of 003 Def. 1, Eq. (3) (:func:`core_basis`)."""
        return core_basis(stacks(require_low_rank(updates, self.name)), self.rank_rtol)

    def project(self, updates: Sequence[Update],
                basis: CoreBasis | tuple[Tensor, Tensor] | None = None) -> tuple[list[LowRank], Context]:
        """Core matrices ``M_t = (U_B^refᵀ B_t)(A_t V_A^ref)`` (003 Def. 2, Eq. 8) as their rank-``r_t`` factors.

        ``basis``: :meth:`basis` of the same updates (``None`` computes it), whose cores come from the
        stacks' decompositions (:func:`core_factors`) and whose maps are :func:`reference_basis`; or any
        other pair of orthonormal bases ``(U (out, ·), V (in, ·))`` (003 Tab. 5 compares such
        reference bases), whose cores are Eq. 8 as written, ``(Uᵀ B_t)(A_t V)``.
        """
        lowrank = require_low_rank(updates, self.name)
        if basis is None or isinstance(basis, CoreBasis):
            stacked = stacks(lowrank)
            basis = core_basis(stacked, self.rank_rtol) if basis is None else basis
            U_B, V_A = (reference_basis(S, svd) for S, svd in zip(stacked, basis, strict=True))
            cores = core_factors([u.rank for u in lowrank], basis)
        else:
            U_B, V_A = basis
            cores = [LowRank(U_B.T @ u.B.to(U_B.dtype), u.A.to(V_A.dtype) @ V_A) for u in lowrank]
        ctx = Context(shape=tuple(updates[0].shape), dtype=output_dtype(updates), left=U_B, left_pinv=U_B.T, right=V_A,
                      info={"d_U": U_B.shape[1], "d_V": V_A.shape[1]})
        return cores, ctx
