"""Consensus merging with TALL masks (Wang et al., 2024, "Localizing Task Information for
Improved Model Merging and Compression")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mergelab.errors import InputError
from mergelab.taskset import TaskSet

__all__ = ["consensus", "consensus_feasible", "tall_masks"]


def tall_masks(deltas: Sequence[Tensor], lam: float) -> Tensor:
    """TALL masks ``m_t = |τ_t| > lam · |τ_MTL − τ_t|`` with ``τ_MTL = Σ_t τ_t`` (stacked, bool)."""
    stacked = torch.stack(list(deltas))
    tau_mtl = stacked.sum(dim=0)
    return stacked.abs() > lam * (tau_mtl - stacked).abs()


def consensus_feasible(taskset: TaskSet, hp: Mapping[str, Any]) -> None:
    """InputError unless ``k`` is at most the number of tasks: more TALL masks than tasks never agree,
    so every entry would be dropped and the merge would be the base model."""
    k = hp.get("k", 2)
    if k > len(taskset.names):
        raise InputError(f"k={k} masks must agree but the task set has {len(taskset.names)} tasks, so every "
                         f"entry would be dropped; choose k <= {len(taskset.names)}")


def consensus(deltas: Sequence[Tensor], *, lam: float = 0.4, k: int = 2, alpha: float = 0.4) -> Tensor:
    """Consensus merging (Wang et al., 2024): keep the entries of ``τ_MTL = Σ_t τ_t`` that at least ``k`` TALL masks
    select, ``alpha · 1[Σ_t m_t ≥ k] ⊙ τ_MTL``.

    ``k = 2`` removes "catastrophic" (no task) and "selfish" (one task) weights. Defaults are
    the data-free setting of the STAR code (λ = 0.4, α = 0.4, k = 2); the TALL paper picks λ
    per task on validation data from {0.2, …, 0.6} — here one λ for all tasks, searched in
    the grid. ``τ_MTL`` is the plain sum (the ``use_ties`` variant is not offered).
    """
    masks = tall_masks(deltas, lam)
    tau_mtl = torch.stack(list(deltas)).sum(dim=0)
    keep = masks.sum(dim=0) >= k
    return alpha * torch.where(keep, tau_mtl, torch.zeros_like(tau_mtl))
