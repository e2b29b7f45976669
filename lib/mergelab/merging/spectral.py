"""Merges that act on singular values and vectors: TSV-M, Iso-C, Iso-CTS, CART, STAR and the
LoRA-aware truncated SVD of the sum.

All SVDs run in float64 with ``full_matrices=False`` (:mod:`mergelab.linalg`); results
come back in the input dtype.

**Null space of a LoRA update** (a caveat of the Core Space code's Iso-C; issue 29). In the full space a
LoRA update has rank ≤ T·r ≪ min(out, in); its remaining singular values are zero and their
singular vectors are arbitrary (whatever LAPACK completes the basis with, which changes with the
thread count, the BLAS and the factorisation of ΔW). The originals use a fixed number of
directions — TSV-M ``⌊min(m, n)/T⌋`` per task, Iso-C / Iso-CTS all ``min(m, n)`` — so on LoRA
updates their results depend on round-off. Decision: ``support="all"`` (default) keeps the
papers' counts and completes the missing directions by one deterministic rule
(:mod:`mergelab.merging.completion`: orthogonal to every kept non-zero direction, paired by the
identity of the weight's coordinates). Then Iso-C replaces the zeros by the mean singular value
and adds a full-rank isotropic component on the null spaces (what 003 measures as part of the
gap between full and core space, Tabs. 2-4), while TSV-M's completed columns provably drop out.
``support="nonzero"`` uses only the numerically non-zero singular values (the guard); with it
Iso-C and Iso-CTS on a LoRA sum in the full space equal their core-space results when the core
matrices have full rank.

"Non-zero" means above ``σ_max · rtol`` with ``rtol = max(SUPPORT_RTOL, max(m, n) · eps(dtype))``
(or ``rank_rtol``): a relative floor, because a dense update computed as ``(W_0 + ΔW) − W_0`` in
float32 carries rounding noise at ``eps32 · ‖W_0‖`` whatever dtype it is handed over in (the floor
holds for ``‖ΔW‖`` down to about 0.1 % of ``‖W_0‖``; pass a larger ``rank_rtol`` below that). For
dense full fine-tunes both supports coincide (the spectrum has no zeros).

``frame``: Iso-C and Iso-CTS take the identity of the weight's coordinates in the coordinates they
see (the merge driver passes it from the space, :meth:`mergelab.spaces.Context.frame`; ``None``
is the rectangular identity of the matrices themselves, right for the full space). It decides
nothing but the pairing of completed directions.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from mergelab.errors import InputError
from mergelab.linalg import lowrank_svd, numerical_rank, polar, svd64
from mergelab.merging.completion import frame_pairs, identity_frame, note
from mergelab.taskset import LowRank, TaskSet

__all__ = ["SUPPORT_RTOL", "cart", "cart_rank", "iso_c", "iso_cts", "star", "svd_of_sum", "svd_rank_feasible", "tsv", "tsv_components"]

Support = Literal["all", "nonzero"]

#: the relative floor of ``support="nonzero"`` (module docstring): singular values below
#: ``SUPPORT_RTOL · σ_max`` count as zero
SUPPORT_RTOL = 1e-4


def _rank(s: Tensor, like: Tensor | LowRank, rank_rtol: float | None, scale: float | None = None) -> int:
    """How many singular values ``s`` of ``like`` are non-zero (module docstring), relative to
    ``scale`` (default ``σ_max`` of ``s`` itself)."""
    rtol = rank_rtol if rank_rtol is not None else max(SUPPORT_RTOL, max(like.shape) * torch.finfo(like.dtype).eps)
    top = float(s.max()) if scale is None and s.numel() else (scale or 0.0)
    return int((s > top * rtol).sum()) if top > 0 else 0


def _sum(deltas: Sequence[Tensor]) -> Tensor:
    return torch.stack(list(deltas)).sum(dim=0)


def _task_svd(delta: Tensor | LowRank) -> tuple[Tensor, Tensor, Tensor]:
    """A task's reduced SVD, from its factors when it comes as ``LowRank`` (:func:`~mergelab.linalg.lowrank_svd`:
    QR of the ``m × r`` and ``n × r`` factors and an ``r × r`` SVD instead of an ``m × n`` one)."""
    return lowrank_svd(delta.B, delta.A, truncate=False) if isinstance(delta, LowRank) else svd64(delta)


def tsv_components(deltas: Sequence[Tensor | LowRank], rank_rtol: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """TSV-M's concatenated per-task components ``(U (m, K), s (K,), Vh (K, n))``: the top
    ``k = ⌊min(m, n) / T⌋`` singular triplets of every task, or its non-zero ones where it has
    fewer (their completion drops out of TSV-M, :func:`tsv`; the count is noted). ``k = 0`` (more
    tasks than ``min(m, n)``) gives no components (``K = 0``). A task given as factors (Core's
    ``M_t``) is decomposed from them (:func:`_task_svd`)."""
    m, n = deltas[0].shape
    k = min(m, n) // len(deltas)
    Us, ss, Vhs = [], [], []
    for delta in deltas:
        U, s, Vh = _task_svd(delta)
        k_t = min(k, _rank(s, delta, rank_rtol))
        note(k - k_t)
        Us.append(U[:, :k_t]), ss.append(s[:k_t]), Vhs.append(Vh[:k_t])
    return torch.cat(Us, dim=1), torch.cat(ss), torch.cat(Vhs, dim=0)


def tsv(deltas: Sequence[Tensor | LowRank], *, alpha: float = 1.0, rank_rtol: float | None = None) -> Tensor:
    """TSV-M (Gargiulo et al., 2025, "Task Singular Vectors"; steps as in 003 App. B):
    keep each task's top ``⌊min(m, n)/T⌋`` singular triplets, concatenate them, whiten the
    concatenated left and right singular vectors with their orthogonal polar factors
    ``U⊥ = polar([U_1 … U_T])``, ``V⊥ = polar([V_1 … V_T])``, and return
    ``alpha · U⊥ diag([s_1 … s_T]) V⊥ᵀ``. In core space (``Tr × Tr``) the per-task ``k`` is ``r``
    as in 003 (``⌊Σ_t r_t / T⌋`` with mixed ranks, so higher-rank tasks are truncated there), and
    each core ``M_t`` comes as its rank-``r_t`` factors, from which its SVD is taken.

    A task with fewer than ``k`` non-zero singular values (a LoRA update, rank ``r_t < k``): the
    original fills its ``k − r_t`` slots with zero-σ vectors that LAPACK chooses arbitrarily, and
    whitening mixes them into the other tasks' directions, so its result depends on round-off.
    Completed by :mod:`mergelab.merging.completion`'s rule (orthogonal to every kept direction of
    every task) they drop out exactly: with ``U = [U_a, U_b]``, ``U_b ⊥ U_a`` (likewise ``V``), the
    Gram matrices ``UᵀU``, ``VᵀV`` are block-diagonal, so ``polar(U) = [polar(U_a), polar(U_b)]`` and
    ``polar(U) diag(s_a, 0) polar(V)ᵀ = polar(U_a) diag(s_a) polar(V_a)ᵀ``. Only the non-zero
    triplets are formed; the merge is the same for every thread count, BLAS and factorisation
    of the updates. (Rotating the zero-σ columns among themselves, or flipping the signs of
    ``(u_i, v_i)`` pairs, never changes TSV-M; which subspace they span does, and the rule fixes it.)

    More tasks than ``min(m, n)`` leave no component per task (``k = 0``), and no whitening can
    make ``T > min(m, n)`` components orthonormal: such a matrix is merged by TSV-M's rule for
    non-matrix parameters, ``alpha · mean``, with a warning (the original code would crash on the
    empty concatenation).
    """
    m, n = deltas[0].shape
    if min(m, n) < len(deltas):
        dense = [d.dense() if isinstance(d, LowRank) else d for d in deltas]
        if any(bool(d.any()) for d in dense):  # an untrained module (all zero) merges to zero quietly
            warnings.warn(f"tsv: a {m}×{n} matrix leaves ⌊{min(m, n)}/{len(deltas)}⌋ = 0 singular components per task; "
                          "it is merged by the mean (TSV-M's rule for non-matrix parameters)", stacklevel=2)
        return (alpha * torch.stack(dense).mean(dim=0)).to(deltas[0].dtype)
    U, s, Vh = tsv_components(deltas, rank_rtol)
    merged = polar(U) @ (s[:, None] * polar(Vh))
    return (alpha * merged).to(deltas[0].dtype)


def _frame(frame: Tensor | None, like: Tensor) -> Tensor:
    return identity_frame(tuple(like.shape)) if frame is None else frame


def iso_c(deltas: Sequence[Tensor], frame: Tensor | None = None, *, alpha: float = 1.0, support: Support = "all",
          rank_rtol: float | None = None) -> Tensor:
    """Iso-C (Marczak et al., 2025, "No Task Left Behind", Sec. 4.1): with
    ``Σ_t τ_t = U diag(σ) Vᵀ``, return ``alpha · σ̄ U Vᵀ``, ``σ̄`` the mean singular value (a flat
    spectrum). ``support="all"`` uses all ``d = min(m, n)`` singular values as the original:
    ``σ̄ = Σ_i σ_i / d`` and, when the sum has rank ``ρ < d``, ``U Vᵀ`` includes ``N_L Z N_Rᵀ`` on
    its null spaces, ``Z = polar(N_Lᵀ F N_R)`` with ``F`` the ``frame`` (the identity; module
    docstring and :mod:`mergelab.merging.completion`) where the original takes LAPACK's arbitrary
    pairing. ``"nonzero"`` averages over and keeps only the ``ρ`` non-zero ones. Also the
    post-processor of compositions such as ``tsv+iso_c``: applied to a single merged matrix it
    isotropizes that matrix (003's ``--isotropize``).
    """
    total = _sum(deltas)
    U, s, Vh = svd64(total)
    rho = _rank(s, total, rank_rtol)
    if rho == 0:  # σ̄ = 0
        return torch.zeros_like(total)
    d = s.numel() if support == "all" else rho
    orthogonal = U[:, :rho] @ Vh[:rho]
    if rho < d:
        U_c, Vh_c = frame_pairs(_frame(frame, total), U[:, :rho], Vh[:rho], d - rho)
        orthogonal = orthogonal + U_c @ Vh_c
        note(d - rho)
    return (alpha * (s[:rho].sum() / d) * orthogonal).to(total.dtype)


def iso_cts(deltas: Sequence[Tensor], frame: Tensor | None = None, *, alpha: float = 1.0, common_fraction: float = 0.8,
            support: Support = "all", rank_rtol: float | None = None) -> Tensor:
    """Iso-CTS (Marczak et al., 2025, Sec. 4.2; iso-merging's code): a common subspace plus
    task-specific ones, then an isotropic spectrum.

    With ``d`` the number of singular values in play (``min(m, n)``, or the numerical rank ``ρ`` of
    ``Σ_t τ_t`` under ``support="nonzero"``): ``k_c = ⌊common_fraction · d⌋``, ``n_t`` =
    ``(d − k_c)/T`` rounded (so that ``k_c + T·n_t = d``); the common space is the top-``k_c``
    SVD of ``Σ_t τ_t``; task ``t`` contributes the top-``n_t`` SVD of ``τ_t − U_c U_cᵀ τ_t``.
    All components are concatenated, ``U`` and ``V`` whitened by their polar factors, every
    singular value replaced by the mean ``s̄ = Σ s / d``, and ``alpha · s̄ U⊥ V⊥ᵀ`` returned.

    Only non-zero directions are taken from the SVDs: the common space stops at ``ρ`` and a
    residual at its own rank (relative to ``σ_max`` of the sum). Under ``support="all"`` the
    directions still missing to ``d`` are completed together by
    :mod:`mergelab.merging.completion`'s rule (orthogonal to all kept ones, paired by ``frame``),
    where the original takes LAPACK's arbitrary vectors: common directions beyond ``ρ`` are null
    vectors of the sum, and a residual's missing ones are noise that whitening mixes into every
    other direction. They cannot drop out here (their σ becomes ``s̄``), so the rule must pair them;
    its completed block ``s̄ N_L Z N_Rᵀ`` is Iso-C's. For a LoRA sum in the full space whose rank
    ``ρ ≤ k_c``, every residual is zero and Iso-CTS equals Iso-C.
    """
    total = _sum(deltas)
    U, s, Vh = svd64(total)
    rho = _rank(s, total, rank_rtol)
    if rho == 0:  # s̄ = 0
        return torch.zeros_like(total)
    d = s.numel() if support == "all" else rho
    T = len(deltas)
    n_t = min(round((d - int(common_fraction * d)) / T), d // T)
    k_c = min(d - T * n_t, rho)
    U_c = U[:, :k_c]
    Us, ss, Vhs = [U_c], [s[:k_c]], [Vh[:k_c]]
    for delta in deltas:
        residual = delta.to(torch.float64) - U_c @ (U_c.T @ delta.to(torch.float64))
        U_t, s_t, Vh_t = svd64(residual)
        r_t = min(n_t, _rank(s_t, residual, rank_rtol, scale=float(s[0])))
        Us.append(U_t[:, :r_t]), ss.append(s_t[:r_t]), Vhs.append(Vh_t[:r_t])
    kept = torch.cat(ss)
    missing = d - kept.numel() if support == "all" else 0
    if missing:
        U_m, Vh_m = frame_pairs(_frame(frame, total), torch.cat(Us, dim=1), torch.cat(Vhs, dim=0), missing)
        Us.append(U_m), Vhs.append(Vh_m)
        note(missing)
    merged = polar(torch.cat(Us, dim=1)) @ polar(torch.cat(Vhs, dim=0))
    return (alpha * (kept.sum() / (kept.numel() + missing)) * merged).to(total.dtype)


def _low_rank_approx(delta: Tensor, k: int) -> Tensor:
    U, s, Vh = svd64(delta)
    return U[:, :k] @ (s[:k, None] * Vh[:k])


def cart_rank(rank_ratio: float, shape: tuple[int, ...]) -> int:
    """CART's kept rank ``k = ⌈rank_ratio · min(m, n)⌉`` (at least 1), as 003's Core Space code
    computes it (``ceil``; the CART code's ``int`` floors). The product is rounded to 9 decimals
    first so that e.g. ``0.1 · 30`` gives 3, not 4."""
    return max(1, math.ceil(round(rank_ratio * min(shape), 9)))


def cart(deltas: Sequence[Tensor], *, alpha: float = 1.0, lam: float = 2.0, rank_ratio: float = 0.12) -> Tensor:
    """CART (Choi et al., 2024, "Revisiting Weight Averaging for Model Merging"; 002 Sec. 3
    Eq. 2 with θ_0 the average; 003 App. D.2): centre the task vectors on their mean
    ``τ̄ = (1/T) Σ_t τ_t`` and return ``alpha · (τ̄ + lam · Σ_t SVD_k(τ_t − τ̄))`` with
    ``k`` = :func:`cart_rank` (``⌈rank_ratio · min(m, n)⌉``, 003's code). Defaults: ``lam=2.0``,
    ``rank_ratio=0.12`` (official 8-task setting), ``alpha=1``.
    Truncation drops components, so a LoRA null space plays no role here.
    """
    stacked = torch.stack(list(deltas)).to(torch.float64)
    mean = stacked.mean(dim=0)
    k = cart_rank(rank_ratio, tuple(mean.shape))
    low_rank = sum(_low_rank_approx(c, k) for c in stacked - mean)
    return (alpha * (mean + lam * low_rank)).to(deltas[0].dtype)


def _star_one(delta: Tensor, eta: float) -> Tensor:
    U, s, Vh = svd64(delta)
    cumulative = s.cumsum(0)
    if s.numel() == 0 or cumulative[-1] <= 0:
        return torch.zeros_like(delta, dtype=torch.float64)
    total = cumulative[-1]
    r = min(int(torch.searchsorted(cumulative, eta / 100.0 * total)) + 1, s.numel())
    kept = s[:r] * (total / cumulative[r - 1])  # rescale: the nuclear norm is preserved
    return U[:, :r] @ (kept[:, None] * Vh[:r])


def star(deltas: Sequence[Tensor], *, alpha: float = 1.0, eta: float = 40.0) -> Tensor:
    """STAR, Spectral Truncation And Rescale (Lee et al., NAACL 2025): per task,
    keep the smallest rank ``r`` whose singular values hold ``eta`` % of the nuclear norm,
    rescale them by ``Σ_i σ_i / Σ_{i≤r} σ_i`` (nuclear norm preserved), then average:
    ``alpha · (1/T) Σ_t STAR(τ_t)``. Default ``eta=40`` (STAR code).
    """
    return (alpha * torch.stack([_star_one(d, eta) for d in deltas]).mean(dim=0)).to(deltas[0].dtype)


def svd_rank_feasible(taskset: TaskSet, hp: Mapping[str, Any]) -> None:
    """InputError when ``rank`` is above every matrix module's ``min(out, in)``: nothing would be
    truncated, so the merge would be plain task arithmetic under another name."""
    rank = hp.get("rank")
    bound = max((min(u.shape) for task in taskset.tasks for u in task.modules.values() if len(u.shape) == 2), default=None)
    if rank is not None and bound is not None and rank > bound:
        raise InputError(f"rank={rank} is above every module's min(out, in) (at most {bound}), so nothing would be truncated "
                         f"and the merge is task arithmetic; choose rank <= {bound}, or leave it unset (the adapters' own rank)")


def svd_of_sum(deltas: Sequence[Tensor], *, alpha: float = 0.3, rank: int | None = None) -> LowRank:
    """LoRA-aware truncated SVD of the sum (Tang et al., 2025, as cited by 001 Sec. 4 (vi); PEFT
    ``combination_type="svd"``):
    ``alpha Σ_t τ_t ≈ U_k diag(σ_k) V_kᵀ``, returned as factors ``(U_k diag(σ_k), V_kᵀ)``.

    ``rank=None`` recovers the rank of the original LoRAs: the largest numerical rank among the
    task updates. Unlike PEFT's ``add_weighted_adapter`` SVD the LoRA scaling enters once, the SVD is reduced
    (``full_matrices=False``), in float64.
    """
    total = alpha * _sum(deltas)
    U, s, Vh = svd64(total)
    if rank is None:
        rank = max(numerical_rank(torch.linalg.svdvals(d.to(torch.float64)), tuple(d.shape), d.dtype) for d in deltas)
    k = max(1, min(rank, s.numel()))
    return LowRank((U[:, :k] * s[:k]).to(total.dtype), Vh[:k].to(total.dtype))
