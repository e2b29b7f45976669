"""Frobenius geometry of task updates computed from their factors.

Every statistic in :mod:`mergelab.analysis` that needs inner products between updates goes
through this module, so no analysis ever forms ``B @ A`` or a ``d·m``-long ``vec`` of it:

- two rank-1 LoRA directions (001 Sec. 2.1: ``ΔW_i = Σ_j b_ij a_ijᵀ``; in PEFT orientation
  ``b`` is a column of ``B`` and ``aᵀ`` a row of ``A``)::

      <vec(b_i a_iᵀ), vec(b_j a_jᵀ)> = (b_i·b_j)(a_i·a_j)

- two low-rank updates ``B_s A_s`` and ``B_t A_t``::

      <vec(B_s A_s), vec(B_t A_t)> = tr((B_sᵀ B_t)(A_t A_sᵀ)) = Σ (B_sᵀ B_t) ⊙ (A_s A_tᵀ)

All products run in float64 on CPU, whatever the dtype of the stored factors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from mergelab.errors import InputError
from mergelab.checkpoints.modules import packed_views
from mergelab.taskset import Dense, LowRank, TaskSet, TaskUpdate, Update

__all__ = ["annotated", "block_sum", "dataset_attrs", "direction_gram", "gram", "inner", "matrix_modules", "matrix_taskset",
           "module_updates", "split_modules"]


def _f64(t: Tensor) -> Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


def split_modules(modules: Mapping[str, Update], *, split_packed: bool = True) -> dict[str, Update]:
    """``{name: update}`` with packed q/k/v projections split into their views."""
    if not split_packed:
        return dict(modules)
    out: dict[str, Update] = {}
    for name, update in modules.items():
        out.update(packed_views(name, update))
    return out


def module_updates(taskset: TaskSet, *, split_packed: bool = True) -> dict[str, list[Update]]:
    """The per-task updates of every module, in task order, with packed q/k/v split into views."""
    per_task = [split_modules(task.modules, split_packed=split_packed) for task in taskset.tasks]
    return {name: [modules[name] for modules in per_task] for name in per_task[0]}


def matrix_modules(taskset: TaskSet, *, split_packed: bool = True) -> dict[str, list[Update]]:
    """:func:`module_updates` restricted to 2-D parameters (weight matrices, embeddings)."""
    return {name: ups for name, ups in module_updates(taskset, split_packed=split_packed).items() if len(ups[0].shape) == 2}


def matrix_taskset(taskset: TaskSet, *, split_packed: bool = True, lora_only: bool = False) -> TaskSet:
    """The task set restricted to its 2-D modules (:func:`matrix_modules`), packed q/k/v split into views.

    Analyses that merge (and so must see the same matrices as their per-module statistics) run on
    this TaskSet. ``lora_only`` keeps only the modules where every task's update is LowRank (the
    LoRA targets, which the Core and KnOTS spaces need); InputError if none is left.
    """
    modules = matrix_modules(taskset, split_packed=split_packed)
    if lora_only:
        modules = {m: ups for m, ups in modules.items() if all(isinstance(u, LowRank) for u in ups)}
    if not modules:
        what = "LoRA (low-rank in every task)" if lora_only else "2-D"
        raise InputError(f"the task set has no {what} modules to analyse; its modules are {list(taskset.module_names)[:5]}")
    tasks = tuple(TaskUpdate(task.name, {m: ups[t] for m, ups in modules.items()}, task.source, task.meta)
                  for t, task in enumerate(taskset.tasks))
    return TaskSet(tasks, taskset.base, taskset.layout)


def inner(u: Update, v: Update) -> float:
    """Frobenius inner product ``<u, v>`` of two same-shape updates, from their factors.

    LowRank·LowRank uses ``tr((B_uᵀ B_v)(A_v A_uᵀ))``; LowRank·Dense uses
    ``Σ B_u ⊙ (D A_uᵀ)``; Dense·Dense is the plain dot product.
    """
    if isinstance(u, LowRank) and isinstance(v, LowRank):
        return float(((_f64(u.B).T @ _f64(v.B)) * (_f64(u.A) @ _f64(v.A).T)).sum())
    if isinstance(u, Dense) and isinstance(v, LowRank):
        u, v = v, u
    if isinstance(u, LowRank):
        return float((_f64(u.B) * (_f64(v.delta) @ _f64(u.A).T)).sum())  # (out, r) ⊙ (out, r)
    return float((_f64(u.delta) * _f64(v.delta)).sum())


def direction_gram(updates: Sequence[LowRank]) -> np.ndarray:
    """Gram matrix of all rank-1 LoRA directions of the given updates, ``(K, K)`` with ``K = Σ r_t``.

    Rows/columns follow the task order, then the rank index inside each task:
    ``H = (B_catᵀ B_cat) ⊙ (A_cat A_catᵀ)`` where ``B_cat = [B_1 … B_T]`` (out, K) and
    ``A_cat = [A_1; …; A_T]`` (K, in). This is ``X_aware X_awareᵀ`` of 001 App. D without
    forming ``X_aware`` (K × out·in).
    """
    B = torch.cat([_f64(u.B) for u in updates], dim=1)  # (out, K)
    A = torch.cat([_f64(u.A) for u in updates], dim=0)  # (K, in)
    return ((B.T @ B) * (A @ A.T)).numpy()


def block_sum(H: np.ndarray, ranks: Sequence[int]) -> np.ndarray:
    """Sum of each ``(r_s, r_t)`` block of ``H``: the update Gram from the direction Gram."""
    edges = np.concatenate([[0], np.cumsum(ranks)])
    return np.add.reduceat(np.add.reduceat(H, edges[:-1], axis=0), edges[:-1], axis=1)


def gram(updates: Sequence[Update]) -> np.ndarray:
    """``(T, T)`` Gram matrix ``G_st = <ΔW_s, ΔW_t>_F`` of one module's task updates.

    For all-LowRank input it is the block sum of :func:`direction_gram` (one pair of products);
    otherwise pairwise :func:`inner`.
    """
    if all(isinstance(u, LowRank) for u in updates):
        return block_sum(direction_gram(updates), [u.rank for u in updates])  # type: ignore[union-attr]
    T = len(updates)
    G = np.empty((T, T))
    for s in range(T):
        for t in range(s, T):
            G[s, t] = G[t, s] = inner(updates[s], updates[t])
    return G


def dataset_attrs(taskset: TaskSet, **extra: Any) -> dict[str, Any]:
    """Attrs shared by every analysis Dataset: what it was computed on, plus ``extra``.

    ``dataset`` labels figures; it defaults to the base model's name and a flow may overwrite
    it (``"micro benchmark"``, ``"ViT-B/32 KnOTS LoRA r=16"``).
    """
    return {
        "dataset": taskset.base.name,
        "base": taskset.base.name,
        "tasks": list(taskset.names),
        "taskset_hash": taskset.content_hash,
        **extra,
    }


def annotated(dims: tuple[str, ...], values: Any, long_name: str, units: str = "1", **attrs: Any) -> xr.Variable:
    """A Dataset variable with its ``long_name`` and ``units`` attrs (the schema in docs/store.md)."""
    return xr.Variable(dims, values, attrs={"long_name": long_name, "units": units, **attrs})
