"""Linear combinations of task updates: averaging, task arithmetic, MetaGPT, NormAvg.

Every method here is an element-wise weighted sum, so it is defined on tensors of any shape
and, in every space, gives exactly the full-space result for its weights (003 Eq. 11).
``alpha`` is the global scaling coefficient (001's λ, 003's α): ``ΔW = alpha · merged``.

MetaGPT and NormAvg weigh tasks by the norms of their updates. Those norms are the true
Frobenius norms of ``ΔW_t`` over a group of parameters (:data:`Group`), never the norms of a
space's representation (KnOTS ``per_layer`` represents a task by ``V_t`` without its singular
values): the merge driver derives them from the task set (the ``"norms"`` side input,
:func:`group_norms`) and passes them in, so these methods give the same merge in every space.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from mergelab.taskset import TaskSet

__all__ = ["Group", "average", "group_norms", "metagpt", "normavg", "task_arithmetic"]

#: Which parameters one norm is taken over: ``"layer"`` (004 Eq. 4 and Tab. 3: every parameter of
#: one Transformer block together; a parameter outside the blocks is its own layer), ``"tensor"``
#: (each parameter tensor alone) or ``"model"`` (the whole model: 004 Eq. 3, MetaGPT's original).
Group = Literal["layer", "tensor", "model"]


def average(deltas: Sequence[Tensor], *, alpha: float = 1.0) -> Tensor:
    """Weight averaging (model soups; Wortsman et al., 2022; 004 Sec. 2): ``alpha · (1/T) Σ_t τ_t``."""
    return alpha * torch.stack(list(deltas)).mean(dim=0)


def task_arithmetic(deltas: Sequence[Tensor], *, alpha: float = 0.3) -> Tensor:
    """Task Arithmetic (Ilharco et al., 2023; 001 Sec. 4 (ii); 002 Eq. 1): ``alpha · Σ_t τ_t``.

    001 writes ``W_merge = W_0 + λ Σ_i ΔW_i``; ``alpha`` is that λ (default 0.3, the TA
    setting of AdaMerging / FusionBench; 001 App. C.3 searches 0.1 … 1.0).
    """
    return alpha * torch.stack(list(deltas)).sum(dim=0)


def group_norms(taskset: TaskSet, group: Group) -> dict[str, list[Tensor]]:
    """``{module: [‖ΔW_t‖ over the module's group, per task]}`` (float64 scalars) from the true
    updates (a LoRA update's norm from its factors, never a dense product)."""
    key = {"layer": taskset.layout.block, "tensor": lambda m: m, "model": lambda m: ""}[group]
    squared: dict[str, Tensor] = {}
    for m in taskset.module_names:
        per_task = torch.tensor([u.norm() ** 2 for u in taskset.updates(m)], dtype=torch.float64)
        squared[key(m)] = squared.get(key(m), torch.zeros_like(per_task)) + per_task
    return {m: list(squared[key(m)].sqrt()) for m in taskset.module_names}


def _norms(deltas: Sequence[Tensor], norms: Sequence[Tensor] | None) -> Tensor:
    if norms is None:
        return torch.stack([d.to(torch.float64).norm() for d in deltas])
    return torch.stack([torch.as_tensor(n, dtype=torch.float64) for n in norms])


def _weighted_sum(deltas: Sequence[Tensor], weights: Tensor) -> Tensor:
    stacked = torch.stack(list(deltas))
    return (weights.to(stacked.dtype).view(-1, *([1] * (stacked.ndim - 1))) * stacked).sum(dim=0)


def metagpt(deltas: Sequence[Tensor], norms: Sequence[Tensor] | None = None, *, alpha: float = 1.0, power: float = 2.0,
            group: Group = "layer") -> Tensor:
    """MetaGPT (Zhou et al., 2024; 004 App. B Eqs. 3-4): ``alpha · Σ_t λ_t τ_t``,
    ``λ_t = ‖τ_t‖^p / Σ_j ‖τ_j‖^p``, the norms taken over ``group`` (:data:`Group`).

    Defaults: ``group="layer"``, 004's "MetaGPT per layer" (Eq. 4; the version 004 reports);
    ``"model"`` is the original (Eq. 3). ``power=2`` (squared norms) as the MetaGPT paper and the
    IBM/STAR code (``merger/metagpt.py``); 004's Eqs. 3-4 print the norm without the square: ``power=1``.
    ``norms``: the tasks' norms over the group (the driver derives them, :func:`group_norms`);
    ``None`` uses the norms of ``deltas`` themselves. All-zero updates give zero.
    """
    weights = _norms(deltas, norms) ** power
    total = weights.sum()
    return alpha * _weighted_sum(deltas, weights / total if total > 0 else torch.zeros_like(weights))


def normavg(deltas: Sequence[Tensor], norms: Sequence[Tensor] | None = None, *, alpha: float = 1.0,
            group: Group = "layer") -> Tensor:
    """NormAvg (004: "Model Merging Beyond Image Classification: A Reality Check", 2026, Sec. 4.3):
    rescale every task vector to the smallest norm, then average:
    ``alpha · (1/T) Σ_t (min_j ‖τ_j‖ / ‖τ_t‖) τ_t``, the norms over ``group`` (:data:`Group`; default
    ``"layer"``, the per-layer version 004 reports, App. B; ``"model"`` normalises the whole model).

    Decision: the minimum is over the tasks whose update is non-zero in the group. A task that did not
    change a layer (e.g. a LoRA that does not target it) contributes nothing there instead of
    zeroing every other task's update (the literal formula's ``min = 0``). ``norms``: as :func:`metagpt`.
    """
    values = _norms(deltas, norms)
    nonzero = values > 0
    if not bool(nonzero.any()):
        return alpha * torch.zeros_like(deltas[0])
    smallest = values[nonzero].min()
    scale = torch.where(nonzero, smallest / values.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(values))
    return alpha * _weighted_sum(deltas, scale) / len(deltas)
