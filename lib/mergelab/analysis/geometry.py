"""Task-vector geometry: norms and similarities per module, layer and task (004 Sec. 4.3, App. G).

Everything is computed from Frobenius inner products of the updates (``‖BA‖_F² = tr((BᵀB)(AAᵀ))``
and the identities of :mod:`mergelab.analysis.factored`), never from a materialised ``B @ A``.
The whole-model quantities treat the task vector ``τ_t = θ_t − θ_0`` as the concatenation of its
module updates, so whole-model inner products are sums of per-module ones. Per-layer values
(004 App. G, Fig. 13: "flatten and concatenate all parameters in that layer") follow from the
per-module ones by grouping on the ``layer`` coordinate, e.g.
``np.sqrt((ds.norm ** 2).groupby("layer").sum())``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import xarray as xr

from mergelab.analysis.factored import annotated, dataset_attrs, gram, inner, module_updates, split_modules
from mergelab.errors import InputError
from mergelab.naming import module_coords
from mergelab.taskset import MergedUpdate, TaskSet, Update

__all__ = ["TA_LAMBDAS", "cosine_similarity", "lambda_similarity", "merged_similarity", "norms"]


def _cosine(inner_products: np.ndarray, norms_a: np.ndarray, norms_b: np.ndarray) -> np.ndarray:
    """``<a, b> / (‖a‖ ‖b‖)``, NaN where either norm is zero."""
    denom = norms_a * norms_b
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, inner_products / np.where(denom > 0, denom, 1.0), np.nan)


def _task_coords(taskset: TaskSet) -> np.ndarray:
    return np.array(taskset.names, dtype=object)


def norms(taskset: TaskSet, *, split_packed: bool = True) -> xr.Dataset:
    """Frobenius norm of every task's update per module, and of the whole task vector (004 Fig. 5 left, Figs. 12-13).

    Returns a Dataset with ``norm(task, module)`` and ``total_norm(task)`` (the L2 norm of the
    concatenated updates), plus ``layer`` / ``kind`` coordinates on ``module``. Packed q/k/v
    projections are split into their views (``split_packed``); that leaves ``total_norm`` unchanged.
    """
    modules = module_updates(taskset, split_packed=split_packed)
    values = np.array([[u.norm() for u in ups] for ups in modules.values()]).T  # (task, module)
    return xr.Dataset(
        {
            "norm": annotated(("task", "module"), values, "Frobenius norm of the task update", "weight units",
                              definition="‖ΔW_t‖_F per module"),
            "total_norm": annotated(("task",), np.sqrt((values**2).sum(axis=1)), "L2 norm of the whole task vector",
                                    "weight units", definition="sqrt(Σ_modules ‖ΔW_t‖_F²)"),
        },
        coords={"task": _task_coords(taskset), **module_coords(list(modules), taskset.layout)},
        attrs=dataset_attrs(taskset, title="task-vector norms", paper="004 Sec. 4.3 (Fig. 5 left), App. G (Figs. 12, 13)"),
    )


def cosine_similarity(taskset: TaskSet, *, split_packed: bool = True) -> xr.Dataset:
    """Cosine similarity between task vectors and between each task vector and their sum (004 Fig. 5 middle).

    Dims ``task``, ``other_task`` (the same task names) and ``module``. Variables:

    - ``gram(task, other_task, module)``: ``<ΔW_s, ΔW_t>_F``;
    - ``cosine(task, other_task, module)`` and ``cosine_total(task, other_task)`` (whole model);
    - ``cosine_to_sum(task, module)`` and ``cosine_to_sum_total(task)``: ``cos(τ_t, Σ_s τ_s)``.

    Cosines are NaN where a norm is zero.
    """
    modules = module_updates(taskset, split_packed=split_packed)
    G = np.stack([gram(ups) for ups in modules.values()], axis=-1)  # (T, T, M)
    n = np.sqrt(np.clip(np.einsum("ttm->tm", G), 0, None))  # (T, M)
    cos = _cosine(G, n[:, None, :], n[None, :, :])
    G_tot = G.sum(axis=-1)
    n_tot = np.sqrt(np.clip(np.diag(G_tot), 0, None))
    to_sum = G.sum(axis=1)  # <τ_t, Σ_s τ_s> per module, (T, M)
    sum_norm = np.sqrt(np.clip(G.sum(axis=(0, 1)), 0, None))  # ‖Σ_s τ_s‖ per module, (M,)
    names = _task_coords(taskset)
    pair = ("task", "other_task", "module")
    return xr.Dataset(
        {
            "gram": annotated(pair, G, "Frobenius inner product <ΔW_s, ΔW_t>", "weight units²"),
            "cosine": annotated(pair, cos, "cos(ΔW_s, ΔW_t) per module"),
            "cosine_total": annotated(pair[:2], _cosine(G_tot, n_tot[:, None], n_tot[None, :]), "cos(τ_s, τ_t), whole model"),
            "cosine_to_sum": annotated(("task", "module"), _cosine(to_sum, n, sum_norm[None, :]), "cos(ΔW_t, Σ_s ΔW_s) per module"),
            "cosine_to_sum_total": annotated(("task",), _cosine(to_sum.sum(axis=1), n_tot, np.sqrt(max(G_tot.sum(), 0.0))),
                                             "cos(τ_t, Σ_s τ_s), whole model"),
        },
        coords={"task": names, "other_task": names, **module_coords(list(modules), taskset.layout)},
        attrs=dataset_attrs(taskset, title="cosine similarity of task vectors", paper="004 Sec. 4.3 (Fig. 5 middle, Fig. 7)"),
    )


def _similarity_dataset(taskset: TaskSet, module_names: list[str], dims: tuple[str, ...], coords: dict,
                        cross: np.ndarray, merged_sq: np.ndarray, task_sq: np.ndarray, **attrs) -> xr.Dataset:
    """Cosine and normalised similarity from ``<Δ_M, τ_t>``, ``‖Δ_M‖²`` and ``‖τ_t‖²`` per module.

    ``cross`` and the result have shape ``(*dims, task, module)``; ``merged_sq`` ``(*dims, module)``;
    ``task_sq`` ``(task, module)``. Whole-model values sum the per-module terms.

    It takes 8 parameters because the similarity datasets of every shape share it: the task set and module names that
    label it, the extra leading dims and their coordinates, the three Gram quantities and the attributes passed on.
    """

    def similarity(c: np.ndarray, m_sq: np.ndarray, t_sq: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # c: <Δ_M, τ_t>; m_sq: ‖Δ_M‖² and t_sq: ‖τ_t‖², both broadcastable to c's shape
        dist = np.sqrt(np.clip(m_sq - 2 * c + t_sq, 0, None))  # ‖Δ_M − τ_t‖_F
        t_norm = np.broadcast_to(np.sqrt(np.clip(t_sq, 0, None)), c.shape)
        with np.errstate(invalid="ignore", divide="ignore"):
            normalized = np.where(t_norm > 0, 1.0 - dist / np.where(t_norm > 0, t_norm, 1.0), np.nan)
        return _cosine(c, np.sqrt(np.clip(m_sq, 0, None)), t_norm), normalized, dist

    cos, sim, dist = similarity(cross, merged_sq[..., None, :], task_sq)
    cos_tot, sim_tot, dist_tot = similarity(cross.sum(-1), merged_sq.sum(-1)[..., None], task_sq.sum(-1))
    tdims = (*dims, "task")
    return xr.Dataset(
        {
            "cosine": annotated((*tdims, "module"), cos, "cos(ΔW_merged, ΔW_t) per module"),
            "normalized_similarity": annotated((*tdims, "module"), sim, "1 − ‖ΔW_merged − ΔW_t‖_F / ‖ΔW_t‖_F per module"),
            "distance": annotated((*tdims, "module"), dist, "‖ΔW_merged − ΔW_t‖_F per module", "weight units"),
            "cosine_total": annotated(tdims, cos_tot, "cos(τ_merged, τ_t), whole model"),
            "normalized_similarity_total": annotated(tdims, sim_tot, "1 − ‖θ_merged − θ_t‖ / ‖τ_t‖, whole model"),
            "distance_total": annotated(tdims, dist_tot, "‖θ_merged − θ_t‖, whole model", "weight units"),
        },
        coords={**coords, "task": _task_coords(taskset), **module_coords(module_names, taskset.layout)},
        attrs=dataset_attrs(taskset, **attrs),
    )


_SIMILARITY_NOTE = (
    "normalized similarity s_t = 1 − ‖θ_merged − θ_t‖ / ‖θ_t − θ_0‖: 1 at the fine-tuned model, 0 at the "
    "distance of the base model; 004 Fig. 5 (right) does not spell out its formula"
)


def merged_similarity(taskset: TaskSet, merged: MergedUpdate | Mapping[str, Update], *,
                      split_packed: bool = True) -> xr.Dataset:
    """Similarity in weight space between one merged update and every task vector (004 Fig. 5 right, Fig. 7).

    Dims ``task`` and ``module``: ``cosine`` (``cos(Δ_M, τ_t)``), ``normalized_similarity``
    (``1 − ‖Δ_M − τ_t‖_F / ‖τ_t‖_F``) and ``distance`` (``‖Δ_M − τ_t‖_F``) per module, and their
    ``*_total`` whole-model versions over the concatenated modules. ``θ_merged − θ_t = Δ_M − τ_t``,
    so no base weights are needed. The merge must cover the task set's modules.
    """
    modules = module_updates(taskset, split_packed=split_packed)
    merged_modules = split_modules(merged.modules if isinstance(merged, MergedUpdate) else merged, split_packed=split_packed)
    missing = [m for m in modules if m not in merged_modules]
    if missing:
        raise InputError(f"the merged update lacks {len(missing)} of the task set's modules (e.g. {missing[0]!r}); "
                         "merge the same task set, or restrict it with TaskSet.restrict")
    names = list(modules)
    cross = np.array([[inner(merged_modules[m], u) for m, u in zip(names, ups)] for ups in zip(*modules.values())])  # (task, module)
    merged_sq = np.array([merged_modules[m].norm() ** 2 for m in names])
    task_sq = np.array([[u.norm() ** 2 for u in modules[m]] for m in names]).T
    meta = dict(merged.meta) if isinstance(merged, MergedUpdate) else {}
    return _similarity_dataset(taskset, names, (), {}, cross, merged_sq, task_sq, title="merged-vs-task similarity",
                               merge_meta=meta, note=_SIMILARITY_NOTE, paper="004 Sec. 4.3 (Fig. 5 right, Fig. 7)")


#: The Task Arithmetic scaling grid 0.1, 0.2, …, 1.0 (001 App. C.3).
TA_LAMBDAS = tuple(round(0.1 * i, 1) for i in range(1, 11))


def lambda_similarity(taskset: TaskSet, lambdas: Sequence[float] = TA_LAMBDAS, *, split_packed: bool = True) -> xr.Dataset:
    """:func:`merged_similarity` of the Task Arithmetic merge ``Δ(λ) = λ Σ_t τ_t`` across ``λ`` (004 Fig. 5 right).

    Closed form from the task Gram matrix ``G`` of each module: ``<Δ(λ), τ_t> = λ Σ_s G_st`` and
    ``‖Δ(λ)‖² = λ² Σ_st G_st``, so every λ costs nothing beyond the Gram. Dims ``lam``, ``task``,
    ``module``; the default grid is :data:`TA_LAMBDAS`.
    """
    modules = module_updates(taskset, split_packed=split_packed)
    lam = np.asarray(lambdas, dtype=np.float64)
    G = np.stack([gram(ups) for ups in modules.values()], axis=-1)  # (T, T, M)
    cross = lam[:, None, None] * G.sum(axis=0)[None]  # (lam, task, module)
    merged_sq = lam[:, None] ** 2 * G.sum(axis=(0, 1))[None]  # (lam, module)
    task_sq = np.einsum("ttm->tm", G)
    return _similarity_dataset(taskset, list(modules), ("lam",), {"lam": lam}, cross, merged_sq, task_sq,
                               title="Task Arithmetic merge vs task similarity across λ", method="task_arithmetic",
                               note=_SIMILARITY_NOTE, paper="004 Sec. 4.3 (Fig. 5 right)")
