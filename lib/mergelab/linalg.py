"""Exact linear algebra on factored updates: SVDs of ``B @ A`` without forming it.

CONVENTIONS "Numerics": float64 on CPU, ``full_matrices=False``, truncation by an explicit,
named relative tolerance.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["DEFAULT_RTOL", "lowrank_svd", "svd"]

#: Singular values below ``rtol · σ_max`` are treated as zero (numerical rank).
DEFAULT_RTOL = 1e-10


def _truncate(U: Tensor, s: Tensor, Vh: Tensor, rtol: float | None) -> tuple[Tensor, Tensor, Tensor]:
    if rtol is None or s.numel() == 0:
        return U, s, Vh
    keep = s > rtol * s[0].clamp_min(torch.finfo(s.dtype).tiny)
    return U[:, keep], s[keep], Vh[keep]


def svd(matrix: Tensor, rtol: float | None = DEFAULT_RTOL) -> tuple[Tensor, Tensor, Tensor]:
    """Reduced SVD in float64 (``U (m, k)``, ``s (k,)``, ``Vh (k, n)``), truncated at ``rtol``."""
    U, s, Vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return _truncate(U, s, Vh, rtol)


def lowrank_svd(B: Tensor, A: Tensor, rtol: float | None = DEFAULT_RTOL) -> tuple[Tensor, Tensor, Tensor]:
    """The reduced SVD of ``B @ A`` (``B (m, r)``, ``A (r, n)``) from the factors.

    ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` (QR), so ``B A = Q_B (R_B R_Aᵀ) Q_Aᵀ``; the SVD of the
    small ``r × r`` core ``u s vᵀ`` gives ``U = Q_B u``, ``V = Q_A v``. Cost O((m + n) r²)
    instead of O(m n min(m, n)).
    """
    Q_B, R_B = torch.linalg.qr(B.double())
    Q_A, R_A = torch.linalg.qr(A.double().T)
    u, s, vh = torch.linalg.svd(R_B @ R_A.T, full_matrices=False)
    return _truncate(Q_B @ u, s, vh @ Q_A.T, rtol)
