"""Shared numerics for spaces and merge methods: float64 SVDs, numerical rank, polar factors.

CONVENTIONS "Numerics": SVDs run in float64 on CPU with ``full_matrices=False``; truncation is
by an explicit, named tolerance. Callers pass the dtype the matrix *came from* so that the
tolerance matches the precision the numbers were computed in (a float32 LoRA product carries
float32 rounding noise even after an upcast).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["numerical_rank", "polar", "rank_tolerance", "svd64", "truncated_svd"]


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


def polar(matrix: Tensor) -> Tensor:
    """The orthogonal polar factor ``P Qᵀ`` of ``matrix = P Σ Qᵀ`` (nearest matrix with
    orthonormal columns or rows in Frobenius norm); used by TSV-M and Iso-CTS to whiten
    concatenated singular vectors (Gargiulo et al., 2025, Sec. 4; 003 App. B "obtaining
    orthogonal matrices")."""
    P, _, Qh = svd64(matrix)
    return P @ Qh
