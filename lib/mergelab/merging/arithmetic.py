"""Linear combinations of task updates: averaging, task arithmetic, MetaGPT, NormAvg.

Every method here is an element-wise weighted sum, so it is defined on tensors of any shape
and, in every space, gives exactly the full-space result for its weights (003 Eq. 11; the
norms used by MetaGPT / NormAvg are preserved by the orthonormal core bases).
``alpha`` is the global scaling coefficient (001's λ, 003's α): ``ΔW = alpha · merged``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["average", "metagpt", "normavg", "task_arithmetic"]


def average(deltas: Sequence[Tensor], *, alpha: float = 1.0) -> Tensor:
    """Weight averaging (model soups; Wortsman et al., 2022; 004 Sec. 2): ``alpha · (1/T) Σ_t τ_t``."""
    return alpha * torch.stack(list(deltas)).mean(dim=0)


def task_arithmetic(deltas: Sequence[Tensor], *, alpha: float = 0.3) -> Tensor:
    """Task Arithmetic (Ilharco et al., 2023; 001 Sec. 4 (ii); 002 Eq. 1): ``alpha · Σ_t τ_t``.

    001 writes ``W_merge = W_0 + λ Σ_i ΔW_i``; ``alpha`` is that λ (default 0.3, the TA
    setting of AdaMerging / FusionBench; 001 App. C.3 searches 0.1 … 1.0).
    """
    return alpha * torch.stack(list(deltas)).sum(dim=0)


def _norms(deltas: Sequence[Tensor]) -> Tensor:
    return torch.stack([d.to(torch.float64).norm() for d in deltas])


def _weighted_sum(deltas: Sequence[Tensor], weights: Tensor) -> Tensor:
    stacked = torch.stack(list(deltas))
    return (weights.to(stacked.dtype).view(-1, *([1] * (stacked.ndim - 1))) * stacked).sum(dim=0)


def metagpt(deltas: Sequence[Tensor], *, alpha: float = 1.0, power: float = 2.0) -> Tensor:
    """MetaGPT (Zhou et al., 2024; 004 App. B Eq. 3-4): ``alpha · Σ_t λ_t τ_t``,
    ``λ_t = ‖τ_t‖^p / Σ_j ‖τ_j‖^p``.

    Decision: ``power=2`` (squared norms) as in the MetaGPT paper and the IBM/STAR code
    (REFERENCES §12); 004 Eq. (3)-(4) print the norm without the square, which ``power=1``
    reproduces. Applied per module, this is 004's "MetaGPT per layer" (Eq. 4: a module is a
    layer's parameter tensor); in a ``scope="model"`` space it is the whole-model original.
    All-zero updates give zero.
    """
    norms = _norms(deltas) ** power
    total = norms.sum()
    weights = norms / total if total > 0 else torch.zeros_like(norms)
    return alpha * _weighted_sum(deltas, weights)


def normavg(deltas: Sequence[Tensor], *, alpha: float = 1.0) -> Tensor:
    """NormAvg (004: "Model Merging Beyond Image Classification: A Reality Check", 2026, Sec. 4.3): rescale every task vector to the smallest norm, then average:
    ``alpha · (1/T) Σ_t (min_j ‖τ_j‖ / ‖τ_t‖) τ_t``.

    Per module this is 004's per-layer NormAvg (the version 004 reports; App. B). A task whose
    update is zero contributes zero (and makes the smallest norm zero).
    """
    norms = _norms(deltas)
    scale = torch.where(norms > 0, norms.min() / norms.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(norms))
    return alpha * _weighted_sum(deltas, scale) / len(deltas)
