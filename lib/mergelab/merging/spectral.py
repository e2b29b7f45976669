"""Merges that act on singular values and vectors: TSV-M, Iso-C, Iso-CTS, CART, STAR and the
LoRA-aware truncated SVD of the sum.

All SVDs run in float64 with ``full_matrices=False`` (:mod:`mergelab.linalg`); results
come back in the input dtype.

**Null space of a LoRA sum** (REFERENCES §3 "Iso caveat", §18). In the full space a merged
LoRA update has rank ≤ T·r ≪ min(out, in); its remaining singular values are zero and their
singular vectors are arbitrary (whatever LAPACK completes the basis with). The originals
(Iso-C/-CTS, TSV-M) use all ``min(out, in)`` of them, so Iso-C replaces those zeros by the
mean singular value and adds a full-rank orthogonal component, and TSV-M's whitening mixes
the arbitrary vectors into the meaningful ones; this is what 003 measures as the gap between
full and core space (Tabs. 2-4). Decision: ``support="all"`` (default) is the papers' and the
original code's behaviour, so that a study reproduces 003's Full-vs-Core comparison.
``support="nonzero"`` is the guard: only the numerically non-zero singular values are used;
with it, TSV-M and Iso-C on a LoRA sum in the full space equal their core-space results when the
core matrices have full rank. "Non-zero" means above ``σ_max · rtol`` with
``rtol = max(SUPPORT_RTOL, max(m, n) · eps(dtype))`` (or ``rank_rtol``): a relative floor,
because a dense update computed as ``(W_0 + ΔW) − W_0`` in float32 carries rounding noise at
``eps32 · ‖W_0‖`` whatever dtype it is handed over in (the floor holds for ``‖ΔW‖`` down to about
0.1 % of ``‖W_0‖``; pass a larger ``rank_rtol`` below that). For dense full fine-tunes both supports
coincide (the spectrum has no zeros).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from mergelab.linalg import numerical_rank, polar, svd64
from mergelab.taskset import LowRank

__all__ = ["SUPPORT_RTOL", "cart", "cart_rank", "iso_c", "iso_cts", "star", "svd_of_sum", "tsv", "tsv_components"]

Support = Literal["all", "nonzero"]

#: the relative floor of ``support="nonzero"`` (module docstring): singular values below
#: ``SUPPORT_RTOL · σ_max`` count as zero
SUPPORT_RTOL = 1e-4


def _kept(s: Tensor, like: Tensor, support: Support, rank_rtol: float | None) -> int:
    """How many leading singular values of ``like`` a method keeps under ``support``."""
    if support == "all":
        return int(s.numel())
    rtol = rank_rtol if rank_rtol is not None else max(SUPPORT_RTOL, max(like.shape) * torch.finfo(like.dtype).eps)
    return numerical_rank(s, tuple(like.shape), like.dtype, rtol)


def _sum(deltas: Sequence[Tensor]) -> Tensor:
    return torch.stack(list(deltas)).sum(dim=0)


def tsv_components(deltas: Sequence[Tensor], support: Support = "all",
                   rank_rtol: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """TSV-M's concatenated per-task components ``(U (m, K), s (K,), Vh (K, n))``: the top
    ``k = ⌊min(m, n) / T⌋`` singular triplets of every task, fewer where a task has fewer non-zero
    singular values and ``support="nonzero"``. ``k = 0`` (more tasks than ``min(m, n)``) gives
    no components (``K = 0``)."""
    m, n = deltas[0].shape
    k = min(m, n) // len(deltas)
    Us, ss, Vhs = [], [], []
    for delta in deltas:
        U, s, Vh = svd64(delta)
        k_t = min(k, _kept(s, delta, support, rank_rtol))
        Us.append(U[:, :k_t]), ss.append(s[:k_t]), Vhs.append(Vh[:k_t])
    return torch.cat(Us, dim=1), torch.cat(ss), torch.cat(Vhs, dim=0)


def tsv(deltas: Sequence[Tensor], *, alpha: float = 1.0, support: Support = "all",
        rank_rtol: float | None = None) -> Tensor:
    """TSV-M (Gargiulo et al., 2025, "Task Singular Vectors"; steps as in 003 App. B):
    keep each task's top ``⌊min(m, n)/T⌋`` singular triplets, concatenate them, whiten the
    concatenated left and right singular vectors with their orthogonal polar factors
    ``U⊥ = polar([U_1 … U_T])``, ``V⊥ = polar([V_1 … V_T])``, and return
    ``alpha · U⊥ diag([s_1 … s_T]) V⊥ᵀ``. ``support``: module docstring.
    In core space (``Tr × Tr``) the per-task ``k`` is ``r``, as in 003.

    More tasks than ``min(m, n)`` leave no component per task (``k = 0``), and no whitening can
    make ``T > min(m, n)`` components orthonormal: such a matrix is merged by TSV-M's rule for
    non-matrix parameters, ``alpha · mean``, with a warning (the original code would crash on the
    empty concatenation).
    """
    m, n = deltas[0].shape
    if min(m, n) < len(deltas):
        if any(bool(d.any()) for d in deltas):  # an untrained module (all zero) merges to zero quietly
                warnings.warn(f"tsv: a {m}×{n} matrix leaves ⌊{min(m, n)}/{len(deltas)}⌋ = 0 singular components per task; "
                          "it is merged by the mean (TSV-M's rule for non-matrix parameters)", stacklevel=2)
        return (alpha * torch.stack(list(deltas)).mean(dim=0)).to(deltas[0].dtype)
    U, s, Vh = tsv_components(deltas, support, rank_rtol)
    merged = polar(U) @ (s[:, None] * polar(Vh))
    return (alpha * merged).to(deltas[0].dtype)


def iso_c(deltas: Sequence[Tensor], *, alpha: float = 1.0, support: Support = "all",
          rank_rtol: float | None = None) -> Tensor:
    """Iso-C (Marczak et al., 2025, "No Task Left Behind", Sec. 4.1): with
    ``Σ_t τ_t = U diag(σ) Vᵀ``, return ``alpha · σ̄ U Vᵀ``, ``σ̄`` the mean singular value (a flat
    spectrum). ``support="all"`` uses all ``min(m, n)`` singular values as the original;
    ``"nonzero"`` averages over and keeps only the non-zero ones of a rank-deficient (LoRA) sum
    (module docstring). Also the post-processor of compositions such as ``tsv+iso_c``: applied to
    a single merged matrix it isotropizes that matrix (003's ``--isotropize``).
    """
    total = _sum(deltas)
    U, s, Vh = svd64(total)
    k = _kept(s, total, support, rank_rtol)
    if k == 0:
        return torch.zeros_like(total)
    return (alpha * s[:k].mean() * (U[:, :k] @ Vh[:k])).to(total.dtype)


def iso_cts(deltas: Sequence[Tensor], *, alpha: float = 1.0, common_fraction: float = 0.8, support: Support = "all",
            rank_rtol: float | None = None) -> Tensor:
    """Iso-CTS (Marczak et al., 2025, Sec. 4.2; REFERENCES §7): a common subspace plus
    task-specific ones, then an isotropic spectrum.

    With ``d`` the number of singular values in play (``min(m, n)``, or the numerical rank of
    ``Σ_t τ_t`` under ``support="nonzero"``): ``k_c = ⌊common_fraction · d⌋``, ``n_t`` =
    ``(d − k_c)/T`` rounded (so that ``k_c + T·n_t = d``); the common space is the top-``k_c``
    SVD of ``Σ_t τ_t``; task ``t`` contributes the top-``n_t`` SVD of ``τ_t − U_c U_cᵀ τ_t``.
    All components are concatenated, ``U`` and ``V`` whitened by their polar factors, every
    singular value replaced by the mean, and ``alpha · s̄ U⊥ V⊥ᵀ`` returned.
    """
    total = _sum(deltas)
    U, s, Vh = svd64(total)
    d = _kept(s, total, support, rank_rtol)
    if d == 0:
        return torch.zeros_like(total)
    T = len(deltas)
    n_t = min(round((d - int(common_fraction * d)) / T), d // T)
    k_c = d - T * n_t
    U_c = U[:, :k_c]
    Us, ss, Vhs = [U_c], [s[:k_c]], [Vh[:k_c]]
    for delta in deltas:
        residual = delta.to(torch.float64) - U_c @ (U_c.T @ delta.to(torch.float64))
        U_t, s_t, Vh_t = svd64(residual)
        Us.append(U_t[:, :n_t]), ss.append(s_t[:n_t]), Vhs.append(Vh_t[:n_t])
    mean_s = torch.cat(ss).mean()
    merged = polar(torch.cat(Us, dim=1)) @ polar(torch.cat(Vhs, dim=0))
    return (alpha * mean_s * merged).to(total.dtype)


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
    """STAR, Spectral Truncation And Rescale (Lee et al., NAACL 2025; REFERENCES §9): per task,
    keep the smallest rank ``r`` whose singular values hold ``eta`` % of the nuclear norm,
    rescale them by ``Σ_i σ_i / Σ_{i≤r} σ_i`` (nuclear norm preserved), then average:
    ``alpha · (1/T) Σ_t STAR(τ_t)``. Default ``eta=40`` (STAR code).
    """
    return (alpha * torch.stack([_star_one(d, eta) for d in deltas]).mean(dim=0)).to(deltas[0].dtype)


def svd_of_sum(deltas: Sequence[Tensor], *, alpha: float = 0.3, rank: int | None = None) -> LowRank:
    """LoRA-aware truncated SVD of the sum (Tang et al., 2025, as cited by 001 Sec. 4 (vi); PEFT
    ``combination_type="svd"``):
    ``alpha Σ_t τ_t ≈ U_k diag(σ_k) V_kᵀ``, returned as factors ``(U_k diag(σ_k), V_kᵀ)``.

    ``rank=None`` recovers the rank of the original LoRAs: the largest numerical rank among the
    task updates. Unlike PEFT (REFERENCES §14) the LoRA scaling enters once, the SVD is reduced
    (``full_matrices=False``), in float64.
    """
    total = alpha * _sum(deltas)
    U, s, Vh = svd64(total)
    if rank is None:
        rank = max(numerical_rank(torch.linalg.svdvals(d.to(torch.float64)), tuple(d.shape), d.dtype) for d in deltas)
    k = max(1, min(rank, s.numel()))
    return LowRank((U[:, :k] * s[:k]).to(total.dtype), Vh[:k].to(total.dtype))
