"""AdaRank's per-component loss changes (002 Sec. 4, Figs. 1–3).

For a source task i, 002 Eq. (3) merges the *other* tasks with Task Arithmetic,

    θ_m = θ_0 + λ Σ_{j≠i} τ_j,

and 002 Eq. (4) adds task i's r-th singular component ``s_ir = σ_ir u_ir v_irᵀ`` of one layer,
one component at a time, and records every task's loss change

    ΔL_j(r) = L_j(θ_m + λ s_ir) − L_j(θ_m),     ΔL(r) = Σ_j ΔL_j(r).

``ΔL_i(r)`` is the own-task change (Fig. 1, blue), ``ΔL(r)`` the multi-task change (Fig. 1,
green), ``ΔL_j(r)`` per task the breakdown of Fig. 2. ``L_j`` is task j's cross-entropy loss
on its validation images with its zero-shot head, as 002 Eqs. 3-4 define it (default; val labels,
for analysis only), or with ``labels=False`` the label-free mean prediction entropy (AdaRank's own
adaptation objective, 002 Eq. 6). The Dataset's ``objective`` attribute says which.

Budget. 002 shows "the top 10 % of indices"; ``components`` is that fraction of each task
update's singular components (its numerical rank: at most ``r`` for a LoRA update), at least one;
``layers`` restricts the analysed modules to some block indices (:func:`mergelab.naming.module_layer`).
Parameters are analysed as stored (a packed q/k/v projection is one matrix here).

002 Fig. 3's 95 %-energy rank is :func:`mergelab.analysis.spectra.energy_rank`, reported here for
the analysed modules (the full table of every module is ``coverage.subspace_coverage``'s
``energy_rank``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from mergelab.analysis.batches import Batch, task_loss
from mergelab.linalg import lowrank_svd, truncated_svd
from mergelab.taskset import LowRank, Update

if TYPE_CHECKING:
    from mergelab.model.base import Backbone

__all__ = ["mean_losses", "singular_components"]


def singular_components(update: Update) -> tuple[Tensor, Tensor, Tensor]:
    """``(U, σ, Vh)`` of a 2-D update (float64, numerically non-zero components only)."""
    if isinstance(update, LowRank):
        return lowrank_svd(update.B, update.A)
    return truncated_svd(update.delta)


@torch.no_grad()
def mean_losses(backbone: Backbone, heads: Sequence[Tensor], batches: Sequence[Sequence[Batch]], params) -> np.ndarray:
    """``(L_1 … L_T)``: each task's loss (image-weighted over its batches) at ``params``."""
    out = np.zeros(len(heads))
    for t, (head, task_batches) in enumerate(zip(heads, batches, strict=True)):
        total = sum(len(images) for images, _ in task_batches)
        out[t] = sum(float(task_loss(backbone, head, x, y, params)) * len(x) / total for x, y in task_batches)
    return out
