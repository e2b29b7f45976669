"""Shared numerics for spaces, merge methods, analysis and adaptation.

Numerics: SVDs run in float64 on CPU with ``full_matrices=False``; truncation is
by an explicit, named tolerance. Callers pass the dtype a matrix *came from* so that the default
tolerance matches the precision its numbers were computed in (a float32 LoRA product carries
float32 rounding noise even after an upcast). Factored updates ``B @ A`` are decomposed from
their factors (:func:`lowrank_svd`), never by forming the dense matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["lowrank_svd", "numerical_rank", "polar", "random_orthonormal", "rank_tolerance", "svd64", "truncated_svd"]


def svd64(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Reduced SVD ``U (m, k) · diag(s (k,)) · Vh (k, n)`` in float64, ``k = min(m, n)``."""
    return torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)


def rank_tolerance(s: Tensor, shape: tuple[int, ...], source_dtype: torch.dtype, rtol: float | None = None) -> float:
    """The singular-value threshold below which a value counts as zero.

    Default (``rtol=None``): ``σ_max · max(m, n) · eps(source_dtype)``, the convention of
    ``numpy.linalg.matrix_rank`` applied to the precision the matrix was computed in.
    An explicit ``rtol`` gives ``σ_max · rtol``.
    """
    if s.numel() == 0:
        return 0.0
    top = float(s.max())
    if rtol is None:
        rtol = max(shape) * torch.finfo(source_dtype).eps
    return top * rtol


def numerical_rank(s: Tensor, shape: tuple[int, ...], source_dtype: torch.dtype, rtol: float | None = None) -> int:
    """How many singular values ``s`` (descending) exceed :func:`rank_tolerance`."""
    if s.numel() == 0 or float(s.max()) == 0.0:
        return 0
    return int((s > rank_tolerance(s, shape, source_dtype, rtol)).sum())


def truncated_svd(matrix: Tensor, rtol: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`svd64` restricted to the numerically non-zero singular values."""
    U, s, Vh = svd64(matrix)
    k = numerical_rank(s, tuple(matrix.shape), matrix.dtype, rtol)
    return U[:, :k], s[:k], Vh[:k]


def lowrank_svd(B: Tensor, A: Tensor, rtol: float | None = None, *, truncate: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """The reduced SVD of ``B @ A`` (``B (m, r)``, ``A (r, n)``) from the factors, in float64.

    ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` (QR), so ``B A = Q_B (R_B R_Aᵀ) Q_Aᵀ``; the SVD of the
    small ``r × r`` core ``u s vᵀ`` gives ``U = Q_B u``, ``Vh = vᵀ Q_Aᵀ``. Cost O((m + n) r²)
    instead of O(m n min(m, n)). With ``truncate`` (default) only the numerically non-zero
    components are kept (:func:`numerical_rank` of the factors' dtype); otherwise all
    ``min(r, m, n)``.
    """
    Q_B, R_B = torch.linalg.qr(B.to(torch.float64))  # (m, p), (p, r)
    Q_A, R_A = torch.linalg.qr(A.to(torch.float64).T)  # (n, q), (q, r)
    u, s, vh = svd64(R_B @ R_A.T)  # core (p, q)
    k = numerical_rank(s, (B.shape[0], A.shape[1]), torch.promote_types(B.dtype, A.dtype), rtol) if truncate else s.numel()
    return Q_B @ u[:, :k], s[:k], vh[:k] @ Q_A.T


def polar(matrix: Tensor) -> Tensor:
    """The orthogonal polar factor ``P Qᵀ`` of ``matrix = P Σ Qᵀ`` (nearest matrix with
    orthonormal columns or rows in Frobenius norm); used by TSV-M and Iso-CTS to whiten
    concatenated singular vectors (Gargiulo et al., 2025, Sec. 4; 003 App. B "obtaining
    orthogonal matrices")."""
    P, _, Qh = svd64(matrix)
    return P @ Qh


def random_orthonormal(rows: int, cols: int, generator: torch.Generator) -> Tensor:
    """A random ``(rows, cols)`` float64 matrix with orthonormal columns (``cols ≤ rows``).

    The Q factor of a Gaussian matrix, signs fixed by ``diag(R) > 0`` so that the basis is
    Haar-distributed (uniform on the Stiefel manifold) and a function of the generator's state
    only; the "random orthonormal basis" of 003 Tab. 5 (row 2).
    """
    assert 0 <= cols <= rows, (rows, cols)
    Q, R = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    signs = torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(torch.float64)
    return Q * signs
