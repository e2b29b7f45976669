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

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from mergelab.analysis.batches import Batch, image_batches, task_loss, weights_of
from mergelab.analysis.factored import annotated, dataset_attrs
from mergelab.analysis.spectra import ENERGY, energy_rank
from mergelab.errors import InputError
from mergelab.evaluation.heads import task_head
from mergelab.linalg import lowrank_svd, truncated_svd
from mergelab.merging import merge
from mergelab.naming import module_coords, module_layer
from mergelab.taskset import LowRank, Update

if TYPE_CHECKING:
    from mergelab.bench import Bench
    from mergelab.model.base import Backbone

__all__ = ["component_loss_changes", "mean_losses", "singular_components"]


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


def component_loss_changes(bench: Bench, *, lam: float = 0.3, components: float = 0.1, layers: Sequence[int] | None = None,
                           batch_size: int = 64, batches: int | None = 2, labels: bool = True,
                           energy: float = ENERGY) -> xr.Dataset:
    """ΔL_j(r) of 002 Eq. (4) for every source task, analysed module and top component (schema in docs/store.md).

    ``lam``: λ of Eqs. (3)–(4); ``components``: fraction in (0, 1] of each update's singular
    components to add (at least one); ``layers``: block indices to analyse (``None``: all);
    ``batch_size`` / ``batches``: the validation images per task (``batches=None``: all).
    """
    if not 0.0 < components <= 1.0:
        raise InputError(f"components is a fraction of singular components in (0, 1], got {components}")
    taskset, backbone = bench.taskset, bench.backbone
    names = [m for m in taskset.module_names if len(taskset.updates(m)[0].shape) == 2
             and (layers is None or module_layer(m) in set(layers))]
    if not names:
        raise InputError(f"layers={list(layers or [])} selects no 2-D module; layers present: "
                         f"{sorted({module_layer(m) for m in taskset.module_names})}")
    T, M = len(taskset), len(names)
    tasks = [bench.tasks[n] for n in taskset.names]
    batch_sets = [image_batches(task, batch_size=batch_size, batches=batches, labels=labels) for task in tasks]
    heads = [task_head(backbone, task) for task in tasks]
    base = backbone.base_state()
    svds = {(i, m): singular_components(taskset.updates(m)[i]) for i in range(T) for m in names}
    counts = {key: max(1, math.ceil(components * s.numel())) if s.numel() else 0 for key, (_, s, _) in svds.items()}
    R = max(counts.values())
    delta = np.full((T, M, R, T), np.nan)
    sigma = np.full((T, M, R), np.nan)
    e_rank = np.zeros((T, M), dtype=np.int64)
    base_loss = np.zeros((T, T))
    for i in range(T):
        others = [n for j, n in enumerate(taskset.names) if j != i]
        params = weights_of(base, merge(taskset.subset(others), "task_arithmetic", "full", alpha=lam) if others else None)
        base_loss[i] = mean_losses(backbone, heads, batch_sets, params)
        for mi, m in enumerate(names):
            U, s, Vh = svds[(i, m)]
            e_rank[i, mi] = energy_rank(s, energy)
            W = params[m]
            for r in range(counts[(i, m)]):
                s_ir = (s[r] * torch.outer(U[:, r], Vh[r])).to(W.dtype)  # σ_ir u_ir v_irᵀ, (out, in)
                delta[i, mi, r] = mean_losses(backbone, heads, batch_sets, {**params, m: W + lam * s_ir}) - base_loss[i]
                sigma[i, mi, r] = float(s[r])
    own = np.stack([delta[i, :, :, i] for i in range(T)])  # ΔL_i(r)
    per = ("task", "module", "component")
    names_arr = np.array(taskset.names, dtype=object)
    return xr.Dataset(
        {
            "delta_loss": annotated((*per, "eval_task"), delta, "ΔL_j(r) = L_j(θ_m + λ s_ir) − L_j(θ_m)", "nats"),
            "own_delta_loss": annotated(per, own, "own-task change ΔL_i(r)", "nats"),
            "multi_delta_loss": annotated(per, delta.sum(axis=3), "multi-task change ΔL(r) = Σ_j ΔL_j(r)", "nats"),
            "singular_value": annotated(per, sigma, "σ_ir of the added component", "weight units"),
            "n_components": annotated(("task", "module"), np.array([[counts[(i, m)] for m in names] for i in range(T)], dtype=np.int64),
                                      "components added (top fraction of the numerical rank)"),
            "energy_rank": annotated(("task", "module"), e_rank, f"rank keeping {energy:.0%} of the energy of ΔW_i (002 Fig. 3)"),
            "base_loss": annotated(("task", "eval_task"), base_loss, "L_j(θ_m), θ_m = θ_0 + λ Σ_{j≠i} τ_j", "nats"),
        },
        coords={"task": names_arr, "eval_task": names_arr.copy(), **module_coords(names), "component": np.arange(1, R + 1)},
        attrs=dataset_attrs(taskset, title="loss change per added singular component", paper="002 Sec. 4, Eqs. (3)-(4), Figs. 1-3",
                            lam=lam, components=components, layers="all" if layers is None else [int(x) for x in layers],
                            objective="labels" if labels else "entropy", split="val", batch_size=batch_size,
                            batches=-1 if batches is None else batches, energy=energy),
    )
