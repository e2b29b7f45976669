"""Label-free proxies for choosing merge hyper-parameters: TAS and AdaMMS* (004 Sec. 3.2, App. D–E).

**Task alignment score** (004 Eq. (2)): for task t with unlabeled images ``D_t``,

    TAS_t(θ) = (1/|D_t|) Σ_{x ∈ D_t} d(f(x; θ), f(x; θ_t)),       TAS(θ) = (1/T) Σ_t TAS_t(θ),

where ``f(x; θ)`` is the image encoder's output feature and ``θ_t`` task t's fine-tuned model.
Here ``f`` is ``Backbone.encode_image``: the encoder's final embedding (for CLIP, the projection
into the shared vision-language space), unnormalised — 004 defines the proxy on the raw output
features; the EMA standardisation and per-patch-token cosine of 004 App. H.2 belong to the
*loss* (``adaptation.objectives.alignment_loss``), not to the proxy. ``d`` is one of (004 App. E,
Fig. 11) ``"l2"`` = ``‖a − b‖₂`` (the default of 004 Sec. 3.2), ``"l1"`` = ``‖a − b‖₁`` and
``"cos"`` = ``1 − cos(a, b)``. ``D_t`` is the task's **validation** images, the first
``batches × batch_size`` of them (004: 128 samples by default, robust to 1 vs 50 batches,
App. E, Fig. 10); labels and the test split are never read. **Lower TAS is better**: 004 selects
``λ*, μ* = argmin TAS(θ_merged(λ, μ))`` (:func:`select_by_tas`).

**AdaMMS*** (004 App. D, Eq. (5)): for an ordered hyper-parameter list ``α_0 < … < α_n``,

    AdaMMS_{α_i} = (d(α_{i−1}, α_i) + d(α_i, α_{i+1})) / 2,

with ``d(α, α')`` the mean feature distance between the models merged with ``α`` and ``α'``
(per task on its validation images; the task average is the score of the merge). Eq. (5) needs
both neighbours, so the two ends of the list have no score (NaN). We select the ``α`` with the
lowest score (the most stable merge, as AdaMMS selects by output consistency; :func:`select_adamms`);
004 transcribes the score, not the selection rule, so that is our reading.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from torch import Tensor

from mergelab.adaptation.loop import task_weights
from mergelab.analysis.batches import image_batches, weights_of
from mergelab.analysis.factored import annotated, dataset_attrs
from mergelab.errors import InputError
from mergelab.evaluation.heads import task_head
from mergelab.evaluation.metrics import evaluate_task
from mergelab.merging import METHODS, merge
from mergelab.taskset import MergedUpdate

if TYPE_CHECKING:
    from mergelab.bench import Bench
    from mergelab.data.tasks import ClassificationTask
    from mergelab.model.base import Backbone

__all__ = [
    "DISTANCES",
    "adamms_scores",
    "features",
    "select_adamms",
    "select_by_tas",
    "task_alignment",
    "tas",
    "tas_sweep",
]

Params = Mapping[str, Tensor]


def _l1(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).abs().sum(-1)


def _l2(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).norm(dim=-1)


def _cos(a: Tensor, b: Tensor) -> Tensor:
    return 1.0 - F.cosine_similarity(a, b, dim=-1)


#: Per-sample dissimilarities ``d(f(x; θ), f(x; θ'))`` of 004 App. E (features ``(N, D)`` -> ``(N,)``).
DISTANCES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"l1": _l1, "l2": _l2, "cos": _cos}


def _check_distance(distance: str) -> Callable[[Tensor, Tensor], Tensor]:
    if distance not in DISTANCES:
        raise InputError(f"unknown distance {distance!r}; choose one of {', '.join(DISTANCES)}")
    return DISTANCES[distance]


@torch.no_grad()
def features(backbone: Backbone, task: ClassificationTask, params: Params | None, *, batch_size: int = 64,
             batches: int | None = None, split: str = "val") -> Tensor:
    """``f(x; θ)`` (float64 ``(N, D)``) on the first ``batches × batch_size`` images of ``split`` (images only)."""
    return torch.cat([backbone.encode_image(x, params).double() for x, _ in
                      image_batches(task, batch_size=batch_size, batches=batches, split=split)])


def tas(backbone: Backbone, task: ClassificationTask, params: Params, finetuned_params: Params, *,
        distance: str = "l2", batch_size: int = 64, batches: int | None = None) -> float:
    """``TAS_t`` of 004 Eq. (2): mean ``d(f(x; params), f(x; finetuned_params))`` over task t's validation images.

    ``params`` / ``finetuned_params`` are replacement weights for ``encode_image`` (e.g.
    :func:`mergelab.adaptation.loop.task_weights`); only ``task.tensors("val")[0]`` is read.
    Lower is better.
    """
    d = _check_distance(distance)
    merged = features(backbone, task, params, batch_size=batch_size, batches=batches)
    teacher = features(backbone, task, finetuned_params, batch_size=batch_size, batches=batches)
    return float(d(merged, teacher).mean())


def _lowest(scores: Mapping[Hashable, float]) -> Hashable:
    finite = {k: float(v) for k, v in scores.items() if np.isfinite(v)}
    if not finite:
        raise InputError("no finite score to select from")
    return min(finite, key=finite.__getitem__)


def select_by_tas(scores: Mapping[Hashable, float]) -> Hashable:
    """The configuration label with the lowest TAS (004 Sec. 3.2: ``argmin_λ,μ TAS``); ties -> first."""
    return _lowest(scores)


def select_adamms(scores: Mapping[Hashable, float]) -> Hashable:
    """The configuration with the lowest AdaMMS* score (ends of the list, NaN, are skipped)."""
    return _lowest(scores)


def adamms_scores(adjacent: Sequence[float]) -> np.ndarray:
    """004 Eq. (5) from ``adjacent[i] = d(α_i, α_{i+1})`` (n values for n + 1 configurations).

    ``score[i] = (adjacent[i−1] + adjacent[i]) / 2`` for ``0 < i < n``; NaN at both ends.
    """
    d = np.asarray(adjacent, dtype=np.float64)
    out = np.full(d.size + 1, np.nan)
    out[1:-1] = (d[:-1] + d[1:]) / 2
    return out


def _finetuned(bench: Bench, base: Params) -> list[dict[str, Tensor]]:
    return [{**base, **task_weights(bench.taskset, base, t)} for t in range(len(bench.taskset))]


def task_alignment(bench: Bench, merged: MergedUpdate | Params, *, distances: Sequence[str] = ("l2",),
                   batch_size: int = 64, batches: int | None = None) -> xr.Dataset:
    """Per-task TAS and its task mean for one merged model (004 Eq. (2)); dims ``(distance, task)``.

    ``merged`` is a :class:`~mergelab.taskset.MergedUpdate` (applied to the backbone's base
    weights) or replacement parameters ``W_0 + ΔW``.
    """
    taskset, backbone = bench.taskset, bench.backbone
    fns = [_check_distance(d) for d in distances]
    base = backbone.base_state()
    params = weights_of(base, merged) if isinstance(merged, MergedUpdate) else merged
    teachers = _finetuned(bench, base)
    values = np.zeros((len(distances), len(taskset)))
    for t, name in enumerate(taskset.names):
        task = bench.tasks[name]
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


def tas_sweep(bench: Bench, *, method: str = "task_arithmetic", space: str = "full", lams: Sequence[float] | None = None,
              distances: Sequence[str] = ("l1", "l2", "cos"), batch_counts: Sequence[int] = (1, 2), batch_size: int = 64,
              accuracy: bool = True, eval_split: str = "test") -> xr.Dataset:
    """TAS and AdaMMS* over a merge method's λ grid vs accuracy (004 Sec. 3.2 Figs. 3–4, App. D–E Figs. 9–11).

    ``lams``: the values of the method's ``alpha`` (ascending; ``None``: its registry grid, for
    Task Arithmetic 0.1 … 1.0). For every λ, distance and batch count ``b``, TAS and AdaMMS* use
    the first ``b × batch_size`` validation images of each task. ``accuracy`` adds each merge's
    top-1 accuracy on ``eval_split`` (and the fine-tuned models'), the performance axis of the
    proxy-vs-performance study only: the selections in this Dataset never read it.
    """
    if method not in METHODS or "alpha" not in METHODS[method].params:
        raise InputError(f"tas_sweep sweeps a method's alpha; {method!r} is not a registered method with one")
    lams = sorted(float(x) for x in (METHODS[method].grid["alpha"] if lams is None else lams))
    if len(lams) < 3:
        raise InputError(f"tas_sweep needs at least 3 values of lams for AdaMMS* (004 Eq. (5)), got {lams}")
    counts = sorted({int(b) for b in batch_counts})
    if not counts or counts[0] < 1:
        raise InputError(f"batch_counts must be positive integers, got {list(batch_counts)}")
    fns = [_check_distance(d) for d in distances]
    taskset, backbone = bench.taskset, bench.backbone
    tasks = [bench.tasks[n] for n in taskset.names]
    base = backbone.base_state()
    T, L, D, B = len(tasks), len(lams), len(distances), len(counts)
    sizes = [min(b * batch_size, len(task.tensors("val")[0])) for task in tasks for b in counts]
    teachers = _finetuned(bench, base)
    teacher_f = [features(backbone, task, teachers[t], batch_size=batch_size, batches=counts[-1]) for t, task in enumerate(tasks)]
    tas_v = np.zeros((L, D, B, T))
    adjacent = np.zeros((L - 1, D, B, T))
    acc = np.full((L, T), np.nan)
    heads = [task_head(backbone, task) for task in tasks] if accuracy else []
    previous: list[Tensor] = []
    for li, lam in enumerate(lams):
        params = weights_of(base, merge(taskset, method, space, alpha=lam))
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
                acc[li, t] = evaluate_task(backbone, tasks[t], params, eval_split, heads[t])
        previous = current
    adamms = np.apply_along_axis(adamms_scores, 0, adjacent)  # (L, D, B, T)
    tas_mean, adamms_mean = tas_v.mean(axis=3), adamms.mean(axis=3)
    pick = lambda scores: np.array([[lams[int(np.nanargmin(scores[:, d, b]))] for b in range(B)] for d in range(D)])  # noqa: E731
    ft_acc = np.array([evaluate_task(backbone, task, teachers[t], eval_split, heads[t]) for t, task in enumerate(tasks)]) \
        if accuracy else np.full(T, np.nan)
    grid = ("lam", "distance", "n_batches")
    return xr.Dataset(
        {
            "tas": annotated((*grid, "task"), tas_v, "TAS_t(θ(λ)) (004 Eq. (2))", "feature units"),
            "tas_mean": annotated(grid, tas_mean, "TAS = mean over tasks", "feature units"),
            "adamms": annotated((*grid, "task"), adamms, "AdaMMS*_λ per task (004 Eq. (5)); NaN at the grid ends", "feature units"),
            "adamms_mean": annotated(grid, adamms_mean, "AdaMMS*_λ averaged over tasks", "feature units"),
            "selected_lam_tas": annotated(("distance", "n_batches"), pick(tas_mean), "argmin_λ TAS"),
            "selected_lam_adamms": annotated(("distance", "n_batches"), pick(adamms_mean), "argmin_λ AdaMMS* (interior λ)"),
            "n_images": annotated(("n_batches", "task"), np.array(sizes, dtype=np.int64).reshape(T, B).T,
                                  "validation images per task"),
            "accuracy": annotated(("lam", "task"), acc, f"top-1 accuracy on {eval_split} (NaN: not evaluated)"),
            "finetuned_accuracy": annotated(("task",), ft_acc, f"fine-tuned model's top-1 accuracy on {eval_split}"),
            "normalized_accuracy": annotated(("lam", "task"), acc / ft_acc, "accuracy / fine-tuned accuracy"),
        },
        coords={"lam": np.array(lams), "distance": np.array(list(distances), dtype=object),
                "n_batches": np.array(counts, dtype=np.int64), "task": np.array(taskset.names, dtype=object)},
        attrs=dataset_attrs(taskset, title="TAS and AdaMMS* across the merge coefficient",
                            paper="004 Sec. 3.2 (Eq. (2), Figs. 3-4), App. D (Eq. (5), Fig. 9), App. E (Figs. 10-11)",
                            method=method, space=space, hp="alpha", split="val", eval_split=eval_split,
                            batch_size=batch_size, features="encode_image (final embedding, unnormalised)"),
    )
