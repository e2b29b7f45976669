"""The analyses that run the model on a bench's validation images, through a :class:`BenchSession`.

Each is registered in :data:`mergelab.experiments.registry.ANALYSES` with ``needs="bench"``; the
mathematics and the Dataset schemas are those of the pure modules they build on:

* :func:`jacobian_anisotropy` — the restricted task-loss Jacobian of 001 Sec. 2.3 / App. E
  (:mod:`mergelab.analysis.anisotropy`);
* :func:`component_loss_changes` — AdaRank's per-component loss changes, 002 Eqs. (3)–(4)
  (:mod:`mergelab.analysis.components`);
* :func:`task_alignment` / :func:`tas_sweep` — TAS (004 Eq. 2) and AdaMMS* (004 Eq. 5) across a
  merge coefficient (:mod:`mergelab.analysis.proxies`);
* :func:`embedding_interference` / :func:`merged_embedding_interference` / :func:`embedding_interference_by_space` —
  003 App. C.1's L1 distance of final embeddings, of one merge or of one method in each space (Fig. 6).

Every one reads validation images only (the first ``batches × batch_size`` of each task); the
accuracy axis of :func:`tas_sweep` is the one exception a caller asks for by ``eval_split``.

Each takes the session, then one keyword per setting a study's ``analyses:`` entry may give, read from its
signature by :mod:`mergelab.experiments.registry`: why several take more than six parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from mergelab.analysis.anisotropy import lora_modules, loss_gradients, restricted_jacobian
from mergelab.analysis.components import mean_losses, singular_components
from mergelab.analysis.factored import annotated, dataset_attrs
from mergelab.analysis.proxies import DISTANCES, adamms_scores, check_distance, features
from mergelab.analysis.settings import BatchCount, BatchSize, MethodName, RelativeTolerance, Scaling, Share, SpaceName, SpaceNames, Split
from mergelab.analysis.spectra import ENERGY, energy_rank
from mergelab.errors import InputError
from mergelab.bench import BenchSession
from mergelab.bench.session import Params
from mergelab.merging import METHODS, merge
from mergelab.naming import module_coords
from mergelab.params import Interval, Layers
from mergelab.taskset import MergedUpdate

__all__ = ["component_loss_changes", "embedding_interference", "embedding_interference_by_space", "jacobian_anisotropy",
           "merged_embedding_interference", "tas_sweep", "task_alignment"]


def jacobian_anisotropy(session: BenchSession, *, lam: Scaling = 0.3, batch_size: BatchSize = 64, batches: BatchCount = 2,
                        labels: bool = True, split_packed: bool = True, rtol: RelativeTolerance = None) -> xr.Dataset:
    """:func:`~mergelab.analysis.anisotropy.restricted_jacobian` of the bench's tasks (001 Sec. 2.3, App. E).

    ``W`` is the Task Arithmetic merge of the bench's tasks with coefficient ``lam``; ``f_i`` task
    i's loss over its first ``batches × batch_size`` validation images (``batches=None``: every
    validation image): the cross-entropy task loss of its zero-shot head, as 001 Eqs. 3-6 define
    it (default; labels of the val split, used for analysis only, never by adaptation), or with
    ``labels=False`` the label-free mean prediction entropy. The Dataset's ``objective`` attribute
    says which, and the figures print it.
    It takes 7 parameters: the session and one per setting a study may give (module docstring)."""
    taskset = session.taskset
    batch_sets = [session.val_batches(n, batch_size=batch_size, batches=batches, labels=labels) for n in taskset.names]
    heads = [session.head(n) for n in taskset.names]
    params = {**session.base, **session.weights(merge(taskset, "task_arithmetic", "full", alpha=lam))}
    losses, grads = loss_gradients(session.backbone, heads, batch_sets, params, lora_modules(taskset))
    return restricted_jacobian(taskset, losses, grads, [sum(len(x) for x, _ in bs) for bs in batch_sets], lam=lam,
                               labels=labels, batch_size=batch_size, batches=batches, split_packed=split_packed, rtol=rtol)


def component_loss_changes(session: BenchSession, *, lam: Scaling = 0.3, components: Annotated[float, Interval(0, 1, low_open=True)] = 0.1,
                           layers: Annotated[Sequence[int] | None, Interval(0), Layers()] = None,
                           batch_size: BatchSize = 64, batches: BatchCount = 2, labels: bool = True,
                           energy: Share = ENERGY) -> xr.Dataset:
    """ΔL_j(r) of 002 Eq. (4) for every source task, analysed module and top component (schema in docs/store.md).

    ``lam``: λ of Eqs. (3)–(4); ``components``: fraction in (0, 1] of each update's singular
    components to add (at least one); ``layers``: block indices to analyse (``None``: all);
    ``batch_size`` / ``batches``: the validation images per task (``batches=None``: all).
    It takes 8 parameters: the session and one per setting a study may give (module docstring)."""
    if not 0.0 < components <= 1.0:
        raise InputError(f"components is a fraction of singular components in (0, 1], got {components}")
    taskset, backbone = session.taskset, session.backbone
    names = [m for m in taskset.module_names if len(taskset.updates(m)[0].shape) == 2
             and (layers is None or taskset.layout.layer(m) in set(layers))]
    if not names:
        raise InputError(f"layers={list(layers or [])} selects no 2-D module; layers present: "
                         f"{sorted({taskset.layout.layer(m) for m in taskset.module_names})}")
    T, M = len(taskset), len(names)
    batch_sets = [session.val_batches(n, batch_size=batch_size, batches=batches, labels=labels) for n in taskset.names]
    heads = [session.head(n) for n in taskset.names]
    svds = {(i, m): singular_components(taskset.updates(m)[i]) for i in range(T) for m in names}
    counts = {key: max(1, math.ceil(components * s.numel())) if s.numel() else 0 for key, (_, s, _) in svds.items()}
    R = max(counts.values())
    delta = np.full((T, M, R, T), np.nan)
    sigma = np.full((T, M, R), np.nan)
    e_rank = np.zeros((T, M), dtype=np.int64)
    base_loss = np.zeros((T, T))
    for i in range(T):
        others = [n for j, n in enumerate(taskset.names) if j != i]
        params = {**session.base, **(session.weights(merge(taskset.subset(others), "task_arithmetic", "full", alpha=lam)) if others else {})}
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
        coords={"task": names_arr, "eval_task": names_arr.copy(), **module_coords(names, taskset.layout), "component": np.arange(1, R + 1)},
        attrs=dataset_attrs(taskset, title="loss change per added singular component", paper="002 Sec. 4, Eqs. (3)-(4), Figs. 1-3",
                            lam=lam, components=components, layers="all" if layers is None else [int(x) for x in layers],
                            objective="labels" if labels else "entropy", split="val", batch_size=batch_size,
                            batches=-1 if batches is None else batches, energy=energy),
    )


def task_alignment(session: BenchSession, merged: MergedUpdate | Params, *, distances: Sequence[str] = ("l2",),
                   batch_size: int = 64, batches: int | None = None) -> xr.Dataset:
    """Per-task TAS and its task mean for one merged model (004 Eq. (2)); dims ``(distance, task)``.

    ``merged`` is a :class:`~mergelab.taskset.MergedUpdate` (applied to the backbone's base
    weights) or replacement parameters ``W_0 + ΔW``.
    """
    taskset, backbone, base = session.taskset, session.backbone, session.base
    fns = [check_distance(d) for d in distances]
    params = {**base, **session.weights(merged)} if isinstance(merged, MergedUpdate) else merged
    teachers = [{**base, **session.finetuned(n)} for n in taskset.names]
    values = np.zeros((len(distances), len(taskset)))
    for t, name in enumerate(taskset.names):
        task = session.bench.tasks[name]
        f = features(backbone, task, params, batch_size=batch_size, batches=batches)
        g = features(backbone, task, teachers[t], batch_size=batch_size, batches=batches)
        values[:, t] = [float(fn(f, g).mean()) for fn in fns]
    return xr.Dataset(
        {"tas": annotated(("distance", "task"), values, "TAS_t = mean_x d(f(x; θ), f(x; θ_t))", "feature units"),
         "tas_mean": annotated(("distance",), values.mean(axis=1), "TAS = (1/T) Σ_t TAS_t", "feature units")},
        coords={"distance": np.array(list(distances), dtype=object), "task": np.array(taskset.names, dtype=object)},
        attrs=dataset_attrs(taskset, title="task alignment score", paper="004 Sec. 3.2, Eq. (2)", split="val",
                            features="encode_image (final embedding, unnormalised)", batch_size=batch_size,
                            batches=-1 if batches is None else batches,
                            merge_meta=dict(merged.meta) if isinstance(merged, MergedUpdate) else {}),
    )


def tas_sweep(session: BenchSession, *, method: MethodName = "task_arithmetic", space: SpaceName = "full",
              lams: Annotated[Sequence[float] | None, Interval(-1000.0, 1000.0)] = None,
              distances: Sequence[Literal["l1", "l2", "cos"]] = ("l1", "l2", "cos"),
              batch_counts: Annotated[Sequence[int], Interval(1, math.inf)] = (1, 2), batch_size: BatchSize = 64,
              accuracy: bool = True, eval_split: Split = "test") -> xr.Dataset:
    """TAS and AdaMMS* over a merge method's λ grid vs accuracy (004 Sec. 3.2 Figs. 3–4, App. D–E Figs. 9–11).

    ``lams``: the values of the method's ``alpha`` (ascending; ``None``: its registry grid, for
    Task Arithmetic 0.1 … 1.0). For every λ, distance and batch count ``b``, TAS and AdaMMS* use
    the first ``b × batch_size`` validation images of each task. ``accuracy`` adds each merge's
    top-1 accuracy on ``eval_split`` (and the fine-tuned models'), the performance axis of the
    proxy-vs-performance study only: the selections in this Dataset never read it.
    It takes 9 parameters: the session and one per setting a study may give (module docstring)."""
    grid = _sweep_grid(method, lams, distances, batch_counts, batch_size)
    measured = _measure_sweep(session, method, space, grid, accuracy, eval_split)
    attrs = dataset_attrs(session.taskset, title="TAS and AdaMMS* across the merge coefficient",
                          paper="004 Sec. 3.2 (Eq. (2), Figs. 3-4), App. D (Eq. (5), Fig. 9), App. E (Figs. 10-11)",
                          method=method, space=space, hp="alpha", split="val", eval_split=eval_split,
                          batch_size=batch_size, features="encode_image (final embedding, unnormalised)")
    return _sweep_dataset(session.taskset.names, grid, measured, eval_split, attrs)


@dataclass(frozen=True)
class _SweepGrid:
    """What :func:`tas_sweep` sweeps: the ascending λ values, the distances (names and functions), the ascending
    batch counts, and the batch size."""

    lams: list[float]
    distances: Sequence[str]
    fns: list[Callable[[Tensor, Tensor], Tensor]]
    counts: list[int]
    batch_size: int


@dataclass(frozen=True)
class _SweptValues:
    """What :func:`tas_sweep` measures: validation images per (task, batch count), TAS_t (λ, distance, batch count, task),
    the distances between adjacent λ of AdaMMS* (one λ fewer), the merges' and the fine-tuned models' accuracies."""

    sizes: list[int]
    tas: np.ndarray
    adjacent: np.ndarray
    accuracy: np.ndarray
    finetuned_accuracy: np.ndarray


def _sweep_grid(method: str, lams: Sequence[float] | None, distances: Sequence[str], batch_counts: Sequence[int],
                batch_size: int) -> _SweepGrid:
    """Step 1 of :func:`tas_sweep`: a method with an ``alpha``, at least 3 λ (AdaMMS*, 004 Eq. (5)), positive batch counts,
    known distances."""
    if method not in METHODS or "alpha" not in METHODS[method].params:
        raise InputError(f"tas_sweep sweeps a method's alpha; {method!r} is not a registered method with one")
    lams = sorted(float(x) for x in (METHODS[method].grid["alpha"] if lams is None else lams))
    if len(lams) < 3:
        raise InputError(f"tas_sweep needs at least 3 values of lams for AdaMMS* (004 Eq. (5)), got {lams}")
    counts = sorted({int(b) for b in batch_counts})
    if not counts or counts[0] < 1:
        raise InputError(f"batch_counts must be positive integers, got {list(batch_counts)}")
    fns = [check_distance(d) for d in distances]
    return _SweepGrid(lams, distances, fns, counts, batch_size)


def _measure_sweep(session: BenchSession, method: str, space: str, grid: _SweepGrid, accuracy: bool, eval_split: str) -> _SweptValues:
    """Step 2 of :func:`tas_sweep`: per λ, the merge's features and their distances to the fine-tuned models' (TAS_t, 004 Eq. (2))
    and to the previous λ's (AdaMMS*), over the first ``b × batch_size`` validation images; the accuracies if asked."""
    lams, fns, counts, batch_size = grid.lams, grid.fns, grid.counts, grid.batch_size
    taskset, backbone, base = session.taskset, session.backbone, session.base
    tasks = [session.bench.tasks[n] for n in taskset.names]
    T, L, D, B = len(tasks), len(lams), len(grid.distances), len(counts)
    sizes = [min(b * batch_size, len(session.tensors(n, "val")[0])) for n in taskset.names for b in counts]
    teachers = [{**base, **session.finetuned(n)} for n in taskset.names]
    teacher_f = [features(backbone, task, teachers[t], batch_size=batch_size, batches=counts[-1]) for t, task in enumerate(tasks)]
    tas_v = np.zeros((L, D, B, T))
    adjacent = np.zeros((L - 1, D, B, T))
    acc = np.full((L, T), np.nan)
    previous: list[Tensor] = []
    for li, lam in enumerate(lams):
        params = {**base, **session.weights(merge(taskset, method, space, alpha=lam))}
        current = [features(backbone, task, params, batch_size=batch_size, batches=counts[-1]) for task in tasks]
        for t in range(T):
            for di, fn in enumerate(fns):
                to_teacher = fn(current[t], teacher_f[t])
                to_previous = fn(current[t], previous[t]) if previous else None
                for bi in range(B):
                    n = sizes[t * B + bi]
                    tas_v[li, di, bi, t] = float(to_teacher[:n].mean())
                    if to_previous is not None:
                        adjacent[li - 1, di, bi, t] = float(to_previous[:n].mean())
            if accuracy:
                acc[li, t] = session.accuracy(taskset.names[t], eval_split, params)[0]
        previous = current
    ft_acc = np.array([session.accuracy(n, eval_split, teachers[t])[0] for t, n in enumerate(taskset.names)]) \
        if accuracy else np.full(T, np.nan)
    return _SweptValues(sizes, tas_v, adjacent, acc, ft_acc)


def _sweep_dataset(names: Sequence[str], grid: _SweepGrid, measured: _SweptValues, eval_split: str, attrs: Mapping[str, Any]) -> xr.Dataset:
    """Step 3 of :func:`tas_sweep`: AdaMMS* (004 Eq. (5)), the λ each proxy selects, and the dataset."""
    lams, counts, m = grid.lams, grid.counts, measured
    T, D, B = len(names), len(grid.distances), len(counts)
    adamms = np.apply_along_axis(adamms_scores, 0, m.adjacent)  # (L, D, B, T)
    tas_mean, adamms_mean = m.tas.mean(axis=3), adamms.mean(axis=3)
    pick = lambda scores: np.array([[lams[int(np.nanargmin(scores[:, d, b]))] for b in range(B)] for d in range(D)])  # noqa: E731
    dims = ("lam", "distance", "n_batches")
    return xr.Dataset(
        {
            "tas": annotated((*dims, "task"), m.tas, "TAS_t(θ(λ)) (004 Eq. (2))", "feature units"),
            "tas_mean": annotated(dims, tas_mean, "TAS = mean over tasks", "feature units"),
            "adamms": annotated((*dims, "task"), adamms, "AdaMMS*_λ per task (004 Eq. (5)); NaN at the grid ends", "feature units"),
            "adamms_mean": annotated(dims, adamms_mean, "AdaMMS*_λ averaged over tasks", "feature units"),
            "selected_lam_tas": annotated(("distance", "n_batches"), pick(tas_mean), "argmin_λ TAS"),
            "selected_lam_adamms": annotated(("distance", "n_batches"), pick(adamms_mean), "argmin_λ AdaMMS* (interior λ)"),
            "n_images": annotated(("n_batches", "task"), np.array(m.sizes, dtype=np.int64).reshape(T, B).T,
                                  "validation images per task"),
            "accuracy": annotated(("lam", "task"), m.accuracy, f"top-1 accuracy on {eval_split} (NaN: not evaluated)"),
            "finetuned_accuracy": annotated(("task",), m.finetuned_accuracy, f"fine-tuned model's top-1 accuracy on {eval_split}"),
            "normalized_accuracy": annotated(("lam", "task"), m.accuracy / m.finetuned_accuracy, "accuracy / fine-tuned accuracy"),
        },
        coords={"lam": np.array(lams), "distance": np.array(list(grid.distances), dtype=object),
                "n_batches": np.array(counts, dtype=np.int64), "task": np.array(names, dtype=object)},
        attrs=attrs,
    )


def embedding_interference(session: BenchSession, merged: MergedUpdate, *, batch_size: int = 64, batches: int | None = None,
                           split: str = "val") -> xr.Dataset:
    """Mean L1 distance between the merged and each fine-tuned model's final embeddings; dims ``(task,)``.

    003 App. C.1 (following its refs. [53, 28]) measures interference as "the L1 distance between
    the final embeddings of task-specific models and the merged one": per task, the mean over its
    images of ``‖f(x; θ_merged) − f(x; θ_t)‖₁`` with ``f`` = ``Backbone.encode_image`` (the
    projection into the common vision-language space). That is TAS with ``distance="l1"``; 003
    averages over the test set, we default to the validation images like every other
    model-dependent analysis, and ``split="test"`` reproduces 003.
    """
    taskset, backbone, base = session.taskset, session.backbone, session.base
    params = {**base, **session.weights(merged)}
    l1 = np.zeros(len(taskset))
    for t, name in enumerate(taskset.names):
        task = session.bench.tasks[name]
        f = features(backbone, task, params, batch_size=batch_size, batches=batches, split=split)
        g = features(backbone, task, {**base, **session.finetuned(name)}, batch_size=batch_size, batches=batches, split=split)
        l1[t] = float(DISTANCES["l1"](f, g).mean())
    return xr.Dataset(
        {"l1_distance": annotated(("task",), l1, "mean_x ‖f(x; θ_merged) − f(x; θ_t)‖₁ (final embeddings)", "feature units"),
         "l1_distance_mean": annotated((), float(l1.mean()), "l1_distance averaged over tasks", "feature units")},
        coords={"task": np.array(taskset.names, dtype=object)},
        attrs=dataset_attrs(taskset, title="final-embedding L1 interference", paper="003 App. C.1, Fig. 6", split=split,
                            batch_size=batch_size, batches=-1 if batches is None else batches,
                            merge_meta={k: v for k, v in merged.meta.items() if k in ("method", "space", "hyper_parameters")}),
    )


def merged_embedding_interference(session: BenchSession, *, method: str = "task_arithmetic", space: str = "full",
                                  hp: Mapping[str, Any] | None = None, batch_size: int = 64, batches: int | None = None,
                                  split: str = "val") -> xr.Dataset:
    """:func:`embedding_interference` of ``merge(session.taskset, method, space, **hp)`` (003 Fig. 6: TSV + Iso per space).
    It takes 7 parameters: the session and one per setting a study may give (module docstring)."""
    merged = merge(session.taskset, method, space, **dict(hp or {}))
    ds = embedding_interference(session, merged, batch_size=batch_size, batches=batches, split=split)
    ds.attrs.update(method=method, space=space, hp=dict(hp or {}))
    return ds


def embedding_interference_by_space(session: BenchSession, *, method: MethodName = "tsv+iso_c",
                                    spaces: SpaceNames = ("full", "core"), hp: Mapping[str, Any] | None = None,
                                    batch_size: BatchSize = 64, batches: BatchCount = None, split: Split = "val") -> xr.Dataset:
    """003 Fig. 6: :func:`merged_embedding_interference` of one method merged in each of ``spaces``, stacked along
    ``space`` (by default TSV + Iso-C in full and Core space, the comparison of 003 App. C.1).
    It takes 7 parameters: the session and one per setting a study may give (module docstring)."""
    parts = [merged_embedding_interference(session, method=method, space=space, hp=hp, batch_size=batch_size, batches=batches,
                                           split=split).expand_dims(space=np.array([space], dtype=object)) for space in spaces]
    ds = xr.concat(parts, dim="space", combine_attrs="drop_conflicts")
    ds.attrs.update(method=method, spaces=list(spaces), hp=dict(hp or {}))
    return ds
