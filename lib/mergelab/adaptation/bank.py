"""Direction banks: the fixed directions an adaptive merge reweights, one bank per module.

Every adaptive method merges one module as

    ΔW(c) = offset + B_bank · diag(c) · A_bank          (low-rank bank, K directions)
    ΔW(c) = offset + Σ_k c_k D_k                         (dense bank: full fine-tunes, biases)

and differs only in which directions it uses and how the coefficients ``c`` depend on what is
learned:

* raw LoRA factors (001 Eq. 7, TARA-A; AdaMerging with ``c = λ_task``): :func:`raw_bank`;
* the shared singular directions of ``[ΔW_1 … ΔW_T]`` (001 Eqs. 8–9, TARA-B): :func:`shared_svd_bank`;
* each task's own singular components, optionally around the average (002 Eq. 5, AdaRank with the
  TA or CART origin): :func:`task_svd_bank`.

``ΔW(c)`` is formed as ``(B_bank * c) @ A_bank``: one dense matrix per module, never a dense
copy per task.

Core-space banks (:func:`core_bank`, 003 Sec. 4): any builder above runs on the core matrices
``M_t = (U_B^refᵀ B_t)(A_t V_A^ref)`` (003 Def. 2, Eq. 8) instead of the updates, and its directions are
lifted back through the reference bases as factors, ``ΔW(c) = U_B^ref (B_core diag(c) A_core + offset) V_A^refᵀ``
(003 Eq. 10). Because ``U_B^ref`` has orthonormal columns spanning every ``B_t`` and ``V_A^ref`` orthonormal
columns spanning every ``A_tᵀ`` (lossless projection, 003 Eq. 13 with ε = 0), an SVD taken in core space is
an SVD of the full-space matrix: ``[M_1 … M_N] = U_c Σ [V_c1ᵀ … V_cNᵀ]`` gives
``[ΔW_1 … ΔW_N] = (U_B U_c) Σ [V_c1ᵀ V_Aᵀ … V_cNᵀ V_Aᵀ]`` (TARA-B, 001 Eq. 9) and ``M_t = u s vᵀ`` gives
``ΔW_t = (U_B u) s (V_A v)ᵀ`` (AdaRank, 002 Eq. 5). The core and full banks hold the same directions (up
to the sign of each singular pair, and a rotation inside a repeated singular value); what changes is
the cost: the SVDs are of ``Tr × T·Tr`` / ``Tr × Tr`` matrices, and each step contracts the ``K``
directions in the ``d_U × d_V`` core (``d_U·K·d_V``) before two thin products with the bases
(``out·d_U·d_V + out·d_V·in``) instead of ``out·K·in``, a saving of ``K / d_V`` (= T for TARA-B at full R).
The merged update comes out as ``LowRank(U_B M*, V_Aᵀ)`` of rank ``d_V ≤ Σ r_t``.

Precomputed decompositions. The SVDs are the expensive part of a bank and depend only on the
updates, so :func:`shared_svd` and :func:`task_svds` are exposed, and every builder takes their
result back (``svd=`` / ``svds=``; :func:`core_bank` also ``reference=`` for the reference bases):
a study computes them once and shares them through the store (:mod:`mergelab.bases`; the shared SVD
is the KnOTS space's basis). A bank built from given decompositions equals the one computed here,
bit for bit, when they are the same tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
from torch import Tensor

from mergelab.linalg import lowrank_svd, truncated_svd
from mergelab.spaces.base import StoredBasis, numbered, require_low_rank
from mergelab.spaces.core import CoreBasis, core_basis, core_factors, reference_bases, stacks
from mergelab.spaces.knots import KnotsSpace, knots_svd
from mergelab.taskset import Dense, LowRank, Update

__all__ = ["DECOMPOSITIONS", "Bank", "BankBasis", "Decomposition", "core_bank", "core_matrices", "core_rtol", "mean_bank", "raw_bank",
           "shared_svd", "shared_svd_bank", "task_svd_bank", "task_svds"]


@dataclass(frozen=True, eq=False)
class Bank:
    """Fixed directions of one module. ``owner[k]`` is the task index of direction ``k``.

    With ``left`` / ``right`` set (a core-space bank), ``B``, ``A`` and ``offset`` are in core
    coordinates and every update is lifted as ``left @ (·) @ right``. A ``tied`` bank (TARA-B)
    stores one left factor ``B`` (``out × R``) shared by every task, ``A`` holding the tasks'
    ``R``-row blocks in task order: direction ``(i, k)`` is ``B[:, k] A[iR + k]``, and
    ``ΔW(c) = B (Σ_i diag(c_i) A_i)`` costs ``T·R·in + out·R·in`` instead of ``out·T·R·in``.
    """

    owner: Tensor  # (K,) long
    B: Tensor | None = None  # (out, K), core bank: (d_U, K)
    A: Tensor | None = None  # (K, in), core bank: (K, d_V)
    dense: Tensor | None = None  # (K, *shape)
    offset: Update | None = None
    left: Tensor | None = None  # (out, d_U): U_B^ref
    right: Tensor | None = None  # (d_V, in): V_A^refᵀ
    tied: bool = False  # B (out, R) shared by the T tasks' blocks of A (T·R, in)

    @property
    def size(self) -> int:
        return int(self.owner.numel())

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Bank:
        move = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        offset = None if self.offset is None else self.offset.to(dtype)
        return Bank(self.owner.to(device), move(self.B), move(self.A), move(self.dense), offset, move(self.left), move(self.right),
                    self.tied)

    def factors(self) -> tuple[Tensor, Tensor]:
        """Direction ``k``'s left and right vectors as ``B[:, k]``, ``A[k]`` (a tied bank's shared
        left factor repeated for every task)."""
        return (self.B.repeat(1, self.size // self.B.shape[1]) if self.tied else self.B), self.A

    def _inner(self, c: Tensor) -> Tensor:
        if self.tied:
            R = self.B.shape[1]
            out = self.B @ (c.view(-1, R, 1) * self.A.view(-1, R, self.A.shape[1])).sum(0)
        elif self.B is not None:
            out = (self.B * c) @ self.A
        else:
            out = torch.tensordot(c, self.dense, dims=1)
        if self.offset is not None:
            out = out + self.offset.dense(out.dtype).to(out.device)
        return out

    def delta(self, c: Tensor) -> Tensor:
        """The dense update ``ΔW(c)`` of this module (differentiable in ``c``)."""
        if self.left is not None:
            return (self.left @ self._inner(c)) @ self.right  # (out, d_V) @ (d_V, in)
        return self._inner(c)

    def update(self, c: Tensor) -> Update:
        """The final merged update, low rank when the bank is (``rank ≤ K + rank(offset)``;
        a core bank's ``LowRank(U_B M*, V_Aᵀ)`` has rank ``d_V``)."""
        c = c.detach().to(torch.float32).cpu()
        if self.left is not None:
            core = self.to("cpu")._inner(c)  # (d_U, d_V)
            return LowRank(self.left.cpu().float() @ core, self.right.cpu().float())
        if self.B is None:
            return Dense(self.delta(c.to(self.dense)).detach().cpu())
        B, A = self.factors()
        B, A = B.cpu().float() * c, A.cpu().float()
        if isinstance(self.offset, LowRank):
            B, A = torch.cat([B, self.offset.B.float()], 1), torch.cat([A, self.offset.A.float()], 0)
        elif isinstance(self.offset, Dense):
            return Dense((B @ A + self.offset.delta.float()))
        return LowRank(B, A)


def _all_low_rank(updates: Sequence[Update]) -> bool:
    return all(isinstance(u, LowRank) for u in updates)


def raw_bank(updates: Sequence[Update]) -> Bank:
    """The tasks' own factors as directions: column ``j`` of ``B_i`` with row ``j`` of ``A_i`` (001 Eq. 7)."""
    if _all_low_rank(updates):
        owner = torch.cat([torch.full((u.rank,), i, dtype=torch.long) for i, u in enumerate(updates)])
        return Bank(owner, B=torch.cat([u.B for u in updates], 1), A=torch.cat([u.A for u in updates], 0))
    return Bank(torch.arange(len(updates)), dense=torch.stack([u.dense(torch.float32) for u in updates]))


class BankBasis(NamedTuple):
    """Precomputed decompositions of one module's SVD bank.

    ``svd``: the builder's SVD — :func:`shared_svd` ``(U, s, [V_t])`` or :func:`task_svds`
    ``[(U_t, s_t, Vh_t)]`` — of the updates (full space) or of the core matrices (core space);
    ``reference``: ``(U_B^ref, V_A^ref)`` for a core bank (003 Eq. 3), else ``None``.
    """

    svd: Any
    reference: tuple[Tensor, Tensor] | None = None


def shared_svd(updates: Sequence[Update], rtol: float | None = None, naive: bool = False) -> tuple[Tensor, Tensor, list[Tensor]]:
    """``[ΔW_1 … ΔW_N] = U Σ [V_1 … V_N]`` (001 Eq. 8; ``V_t``: ``k × in`` blocks of ``Vᵀ``), the SVD TARA-B reweights.

    For LoRA updates this is the KnOTS space's basis (:func:`~mergelab.spaces.knots.knots_svd`, exact from the
    factors; the ``d × mN`` matrix is never formed unless ``naive``); for dense updates (full fine-tunes,
    core matrices) the float64 truncated SVD of the concatenation.
    """
    if _all_low_rank(updates):
        return knots_svd(updates, naive=naive, rank_rtol=rtol)
    U, s, Vh = truncated_svd(torch.cat([u.dense(torch.float64) for u in updates], 1), rtol)
    return U, s, list(Vh.split(updates[0].shape[1], dim=1))


def shared_svd_bank(updates: Sequence[Update], rank: int | None = None, rtol: float | None = None,
                    svd: tuple[Tensor, Tensor, Sequence[Tensor]] | None = None) -> Bank:
    """TARA-B (001 Eqs. 8–9): ``X = [ΔW_1 … ΔW_N] = U Σ Vᵀ``; direction ``(i, k)`` is
    ``σ_k u_k v_kiᵀ`` with ``v_ki`` task ``i``'s block of ``v_k``; top ``R = rank`` components.

    The basis is the KnOTS space's (:func:`shared_svd`, exact from the factors; the ``d × mN`` matrix
    is never formed), or ``svd`` when given. With all ``φ = 1`` and ``R`` = full rank,
    ``Σ_i U Σ V_iᵀ = Σ_i ΔW_i``.
    """
    T = len(updates)
    U, s, blocks = shared_svd(updates, rtol) if svd is None else svd
    R = len(s) if rank is None else min(rank, len(s))
    owner = torch.arange(T).repeat_interleave(R)
    A = torch.cat([V_t[:R] for V_t in blocks], 0)  # (T·R, in): v_ki for each task i
    return Bank(owner, B=(U[:, :R] * s[:R]).float(), A=A.float(), tied=True)


def task_svds(updates: Sequence[Update], center: bool = False, rtol: float | None = None) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Each task's SVD ``ΔW_i = U_i diag(σ_i) Vh_i`` (002 Eq. 5), truncated to its numerical rank; with
    ``center`` (CART origin, 002 Sec. 6.1) that of ``ΔW_i − mean_j ΔW_j``. LoRA updates are decomposed
    from their factors (:func:`~mergelab.linalg.lowrank_svd`; ``ΔW_i − mean = [B_i, −B_cat/T] [A_i; A_cat]``)."""
    T = len(updates)
    if _all_low_rank(updates):
        if not center:
            return [lowrank_svd(u.B, u.A, rtol) for u in updates]
        B_cat = torch.cat([u.B for u in updates], 1).double()
        A_cat = torch.cat([u.A for u in updates], 0).double()
        return [lowrank_svd(torch.cat([u.B.double(), -B_cat / T], 1), torch.cat([u.A.double(), A_cat], 0), rtol) for u in updates]
    dense = [u.dense(torch.float64) for u in updates]
    avg = sum(dense) / T
    return [truncated_svd(d - avg if center else d, rtol) for d in dense]


def mean_bank(updates: Sequence[Update]) -> Bank:
    """No directions, the weight average as the fixed offset: a module merged by ``mean_j ΔW_j``
    whatever the coefficients (CART's rule for the modules AdaRank does not mask)."""
    shape = tuple(updates[0].shape)
    return Bank(torch.zeros(0, dtype=torch.long), dense=torch.zeros((0, *shape)), offset=_mean(updates))


def _mean(updates: Sequence[Update]) -> Update:
    """``mean_j ΔW_j``, low rank (``[B_1 … B_T]/T · [A_1; …; A_T]``) when the updates are."""
    T = len(updates)
    if _all_low_rank(updates):
        B_cat = torch.cat([u.B for u in updates], 1).double()
        A_cat = torch.cat([u.A for u in updates], 0).double()
        return LowRank((B_cat / T).float(), A_cat.float())
    return Dense((sum([u.dense(torch.float64) for u in updates]) / T).float())


def task_svd_bank(updates: Sequence[Update], center: bool = False, rtol: float | None = None,
                  svds: Sequence[tuple[Tensor, Tensor, Tensor]] | None = None) -> Bank:
    """AdaRank (002 Eq. 5): each task's singular components ``σ_ir u_ir v_irᵀ`` as directions.

    With ``center=True`` (CART origin, 002 Sec. 6.1) the components are those of
    ``ΔW_i − mean_j ΔW_j`` and the mean becomes the bank's fixed offset, so all-ones masks give
    ``mean + λ Σ_i (ΔW_i − mean)``. ``svds``: :func:`task_svds` of the same updates, computed earlier.
    """
    factors = task_svds(updates, center, rtol) if svds is None else svds
    owner = torch.cat([torch.full((len(s),), i, dtype=torch.long) for i, (_, s, _) in enumerate(factors)])
    B = torch.cat([U * s for U, s, _ in factors], 1).float()
    A = torch.cat([Vh for _, _, Vh in factors], 0).float()
    return Bank(owner, B=B, A=A, offset=_mean(updates) if center else None)


def core_matrices(updates: Sequence[LowRank], basis: CoreBasis) -> list[Dense]:
    """``M_t = (U_B^refᵀ B_t)(A_t V_A^ref)`` (003 Def. 2, Eq. 8, :func:`~mergelab.spaces.core.core_factors`),
    float64, as dense updates."""
    return [Dense(M.dense()) for M in core_factors([u.rank for u in updates], basis)]  # (d_U, d_V)


def core_rtol(updates: Sequence[LowRank]) -> float:
    """The core banks' default truncation: ``max(out, in) · eps`` of the factors' dtype (see :func:`core_bank`)."""
    source = torch.promote_types(updates[0].B.dtype, updates[0].A.dtype)
    return max(updates[0].shape) * torch.finfo(source).eps


def core_bank(updates: Sequence[Update], matrix_bank: Callable[..., Bank], rtol: float | None = None,
              reference: CoreBasis | None = None, svd: Any = None) -> Bank:
    """``matrix_bank`` run in Core space (003 Sec. 4) and lifted back through the reference bases.

    ``U_B^ref, V_A^ref`` from the stacked factors (003 Eq. 3, :func:`~mergelab.spaces.core.core_basis`),
    or from ``reference`` (the Core space's basis) when given, formed;
    the builder sees the core matrices ``M_t = (U_B^refᵀ B_t)(A_t V_A^ref)`` (003 Eq. 8, ``d_U × d_V``,
    float64) as dense updates, and its SVD of them as ``svd=`` (``None``: it computes it); the returned bank
    keeps its core directions and lifts them with ``left = U_B^ref``, ``right = V_A^refᵀ`` (003 Eq. 10). No
    ``out × in`` matrix is formed.

    Truncation: the builder's singular values are kept above ``σ_max · rtol``; the default is the
    full-space banks' own (:func:`~mergelab.linalg.lowrank_svd`) ``max(out, in) · eps`` of the factors'
    dtype (:func:`core_rtol`), so float64 round-off of the core products never becomes a direction.
    """
    lowrank = require_low_rank(updates, "core")
    basis = core_basis(stacks(lowrank)) if reference is None else reference
    U_B, V_A = reference_bases(lowrank, basis=basis)  # (out, d_U), (in, d_V)
    cores = core_matrices(lowrank, basis)
    rtol = core_rtol(lowrank) if rtol is None else rtol
    bank = matrix_bank(cores, rtol=rtol) if svd is None else matrix_bank(cores, rtol=rtol, svd=svd)
    return replace(bank, left=U_B.float(), right=V_A.T.float())


@dataclass(frozen=True)
class Decomposition:
    """A decomposition an SVD bank is built on (an :class:`~mergelab.adaptation.Adapter`'s ``basis``
    names one): how it is kept in the store and how it is computed from one module's updates
    (``compute(updates, **options)``, the options its key records)."""

    stored: StoredBasis
    compute: Callable[..., Any]


#: The banks' decompositions: the shared SVD (TARA-B, 001 Eq. 8), stored as the KnOTS space's basis, and
#: each task's SVD (AdaRank, 002 Eq. 5).
DECOMPOSITIONS: Mapping[str, Decomposition] = {
    "knots": Decomposition(KnotsSpace.stored_basis, lambda updates, naive=False, rank_rtol=None: shared_svd(updates, rank_rtol, naive)),
    "task_svd": Decomposition(
        StoredBasis("1", {"center": False, "rank_rtol": None, "space": "full", "reference": None},
                    lambda b: {f"{n}.{i}": x for i, svd in enumerate(b) for n, x in zip(("U", "s", "Vh"), svd, strict=True)},
                    lambda t: list(zip(numbered(t, "U"), numbered(t, "s"), numbered(t, "Vh"), strict=True))),
        lambda updates, center=False, rank_rtol=None: task_svds(updates, center, rank_rtol)),
}
