"""The nodes of a study that compute artifacts: stage, reference, merge, adapt, evaluate, analysis, adaptation study."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from mergelab.bases import Bases, adaptation_bases
from mergelab.config import AdaptiveSpec, config_label
from mergelab.errors import InputError
from mergelab.merging import METHODS, merge, project
from mergelab.profiling import Measured, measure
from mergelab.store import Key
from mergelab.selection import SELECTION_RULES
from mergelab.study.context import JOINT, JOINT_KS, TASK_METRICS, AdaptJob, Context, MergeJob, NodeResult
from mergelab.taskset import MergedUpdate

#: Code version of every node's producer; bump one when its output changes for the same inputs.
VERSIONS = {"stage": "1", "reference": "3", "merge": "2", "adapt": "4", "evaluate": "1", "results": "5"}
# adapt 2: tied TARA-B bank; 3: STCH anchors no longer shift the loop's batches, |Δcoef| recorded; 4: TARA AdamW, AdaMerging
# clamp [0, 1], AdaRank masks attention/MLP only, start grids. merge 2: fidelity pass (TSV / Iso support "all", inner alpha 1,
# norm weights from the true updates, isometric spectral methods, CART ceil). results 2: mean_abs_delta_coef; 3: zero-shot
# joint Hits@k; 4: dimension merge_method (``method`` is a keyword of DataArray.sel); 5: the fine-tuned experts' joint
# Hits@k. reference 2: the zero-shot base is scored on the joint task too; 3: each fine-tuned model on the joint task
# (its own task's images against every task's labels)


# Nodes ---------------------------------------------------------------------------------------------


def stage_node(ctx: Context) -> NodeResult:
    """Load and hash the checkpoints; record what was staged. Warms the shared context."""
    from mergelab.checkpoints import describe

    ts = ctx.taskset
    key = ctx.store.key("stage", VERSIONS["stage"], taskset=ts.content_hash, data=ctx.bench.data_id)
    record = {"bench": ctx.bench.name, "taskset": ts.content_hash, "data": ctx.bench.data_id,
              "base": ts.base.content_hash, "tasks": [describe(t) for t in ts]}
    hit = ctx.publish(key, "json", lambda: record)
    return NodeResult("stage", key, hit, ctx.bench.name)


def _hyper_parameters(job: MergeJob) -> dict[str, Any]:
    config = dict(job.config)
    if job.seed is not None:
        config = {**config, "seed": job.seed}
    return METHODS[job.method].resolve(config)


def merge_key(ctx: Context, job: MergeJob) -> Key:
    return ctx.store.key("merge", VERSIONS["merge"], taskset=ctx.taskset.content_hash, method=job.method,
                         space=job.space, hyper_parameters=_hyper_parameters(job))


def _cost(run: Measured, bases: Sequence[Bases]) -> dict[str, Any]:
    """``merge_seconds`` / ``peak_memory_mb`` of a merge (or adaptation) that took its bases from the
    store: its own time plus the recorded time of computing them, the larger of the two peaks
    (docs/store.md §9), so the numbers mean the same whether the bases were computed now or read."""
    return {"merge_seconds": run.wall_s + sum(b.seconds for b in bases),
            "peak_memory_mb": max([run.peak_bytes / 2**20, *(b.peak_memory_mb for b in bases)]),
            "bases": [str(b.key) for b in bases], "bases_seconds": sum(b.seconds for b in bases)}


def merge_node(ctx: Context, job: MergeJob) -> NodeResult:
    """Merge one configuration (timed, peak memory measured) and store the MergedUpdate.

    In the knots and core spaces the projection is built from the task set's bases in the store
    (:func:`mergelab.bases.space_bases`: computed and published by the first merge that needs them).
    """
    key = merge_key(ctx, job)
    if ctx.cached(key):
        return NodeResult("merge", key, True, job.label)
    hp = _hyper_parameters(job)
    bases = ctx.space_bases(job.space)
    if bases is None:
        run = measure(lambda: merge(ctx.taskset, job.method, job.space, **hp))
    else:
        run = measure(lambda: merge(project(ctx.taskset, job.space, bases=bases.modules), job.method, **hp))
    attrs = {"method": job.method, "space": job.space, "config": config_label(job.config), "seed": job.seed,
             **_cost(run, [] if bases is None else [bases])}
    ctx.store.put_tensors(key, run.value.to_tensors(), attrs=attrs)
    return NodeResult("merge", key, False, job.label)


def adapt_key(ctx: Context, job: AdaptJob) -> Key:
    return ctx.store.key("adapt", VERSIONS["adapt"], taskset=ctx.taskset.content_hash, data=ctx.bench.data_id,
                         spec=job.spec.model_dump(mode="json", exclude={"label"}), seed=job.seed,
                         allow_labels=ctx.spec.allow_labels)


def adapt_node(ctx: Context, job: AdaptJob, progress: Callable[[int, float], None] | None = None) -> NodeResult:
    """Adapt coefficients on unlabeled val batches (never test); store the merge and its history.

    The history Dataset (loss curves, coefficient trajectories, final coefficients or masks) is
    published first and named ``studies/<name>/adapt/<label>``; the merged tensors last, so
    their presence means the node completed. SVD banks (``tara_b``, ``adarank``) are built from the
    task set's bases in the store (:func:`mergelab.bases.adaptation_bases`). ``progress(iteration,
    loss)`` hears of every step.
    """
    from mergelab.adaptation import adapt

    key = adapt_key(ctx, job)
    history_key = ctx.store.key("adapt.history", VERSIONS["adapt"], run=str(key))
    if ctx.cached(key):
        return NodeResult("adapt", key, True, job.label)
    a, session = job.spec, ctx.local_session
    forward = session.forward()
    labelled = a.objective == "labels"  # only when the study sets allow_labels (validated in config)
    batches = session.val_streams(session.names, a.batch_size, job.seed, labels=labelled)
    bank_bases, used = adaptation_bases(ctx.store, ctx.taskset, a.method, a.hp) or (None, [])
    hp, started = _start(ctx, a, bank_bases)
    torch.manual_seed(job.seed)
    run = measure(lambda: adapt(a.method, ctx.taskset, forward, batches, objective=a.objective, scalarization=a.scalarization,
                                optimizer=a.optimizer, preference=a.preference, alpha=a.alpha, iters=a.iters, lr=a.lr,
                                bases=bank_bases, progress=progress, **hp))
    result = run.value
    attrs = {"method": a.name, "space": str(result.merged.meta.get("space", "full")), "config": _adapt_config(a, started),
             "seed": job.seed, **_cost(run, used), "seconds_per_iter": result.seconds_per_iter,
             "mean_abs_delta_coef": result.history.attrs["mean_abs_delta_coef"]}
    if not ctx.store.exists(history_key):
        ctx.store.put_dataset(history_key, result.history, attrs=attrs)
    ctx.store.set_ref(f"studies/{ctx.spec.name}/adapt/{a.name}", history_key)
    ctx.store.put_tensors(key, result.merged.to_tensors(), attrs=attrs)
    return NodeResult("adapt", key, False, job.label)


def _adapt_config(a: AdaptiveSpec, started: Mapping[str, Any]) -> str:
    return config_label({"iters": a.iters, "lr": a.lr, **({"alpha": a.alpha} if a.scalarization == "stch" else {}), **a.hp,
                         **started})


def _start(ctx: Context, a: AdaptiveSpec, bases: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``a.hp`` with its starting hyper-parameters chosen before adapting, and those chosen values.

    The grid is ``a.start_grid`` or the method's (:attr:`~mergelab.adaptation.Adapter.start_grid`); every
    combination's starting merge (the coefficient model before any step) is scored on val by the
    study's selection rule (mean val accuracy, or mean TAS for ``selection: tas``), never on test.
    """
    from itertools import product

    from mergelab.adaptation import ADAPTERS, build

    grid = ADAPTERS[a.method].start_grid(a.hp) if a.start_grid is None else a.start_grid
    if not grid:
        return dict(a.hp), {}
    best: tuple[float, dict[str, Any]] | None = None
    for values in product(*grid.values()):
        chosen = dict(zip(grid, values, strict=True))
        params = ctx.session.weights(build(a.method, ctx.taskset, bases=bases, **{**a.hp, **chosen}).merged_update(ctx.taskset.base))
        score = _val_criterion(ctx, params)
        if best is None or score > best[0]:
            best = (score, chosen)
    return {**a.hp, **best[1]}, best[1]


@torch.no_grad()
def _val_criterion(ctx: Context, params: Mapping[str, Tensor]) -> float:
    """The study's selection criterion of one merged model on val, larger is better: the mean val
    accuracy over tasks (a rule of val accuracies) or minus the mean TAS (``tas``, 004 Eq. 2)."""
    session = ctx.local_session
    if _tas_enabled(ctx):
        return -float(np.mean([session.tas(n, params) for n in session.names]))
    return float(np.mean([session.accuracy(n, "val", params)[0] for n in session.names]))


def _merged(ctx: Context, key: str) -> MergedUpdate:
    return MergedUpdate.from_tensors(ctx.store.get_tensors(key), base=ctx.taskset.base)


def _tas_enabled(ctx: Context) -> bool:
    """Whether the study's selection rule reads the task alignment score (every evaluation computes it then)."""
    return SELECTION_RULES[ctx.spec.selection].metric == "tas"


def reference_node(ctx: Context, task: str | None) -> NodeResult:
    """Scores of task ``task``'s fine-tuned model on its own task (``None``: the zero-shot base on all)."""
    ts = ctx.taskset
    index = None if task is None else ts.names.index(task)
    identity = ts.base.content_hash if index is None else ts.tasks[index].content_hash
    key = ctx.store.key("reference", VERSIONS["reference"], update=identity, base=ts.base.content_hash,
                        data=ctx.bench.data_id, task=task, joint=ctx.spec.joint)

    def compute() -> xr.Dataset:
        params = None if task is None else ctx.session.finetuned(task)
        names = list(ctx.bench.tasks) if task is None else [task]
        return _scores(ctx, params, names, joint=ctx.spec.joint, tas=False)

    hit = ctx.publish(key, "dataset", compute, attrs={"reference": "zeroshot" if task is None else "finetuned", "task": task})
    return NodeResult("reference", key, hit, task or "zeroshot")


def evaluate_key(ctx: Context, source: str) -> Key:
    return ctx.store.key("evaluate", VERSIONS["evaluate"], merged=source, data=ctx.bench.data_id,
                         joint=ctx.spec.joint, tas=_tas_enabled(ctx))


def evaluate_node(ctx: Context, source: NodeResult) -> NodeResult:
    """Per-task val/test accuracy, joint Hits@k (test) and, for TAS selection, TAS (val) of one merge."""
    key = evaluate_key(ctx, source.key)
    hit = ctx.publish(key, "dataset", lambda: _scores(ctx, ctx.session.weights(_merged(ctx, source.key)), list(ctx.bench.tasks),
                                                      joint=ctx.spec.joint, tas=_tas_enabled(ctx)))
    return NodeResult("evaluate", key, hit, source.label)


@torch.no_grad()
def _scores(ctx: Context, params: Mapping[str, Tensor] | None, names: Sequence[str], *, joint: bool, tas: bool) -> xr.Dataset:
    """``score(task, metric)``: raw accuracies (normalisation happens when results are assembled)."""
    from mergelab.evaluation.metrics import joint_hits

    session = ctx.local_session
    tasks = names + ([JOINT] if joint else [])
    score = np.full((len(tasks), len(TASK_METRICS) + len(JOINT_KS)), np.nan)
    metrics = [*TASK_METRICS, *(f"hits@{k}" for k in JOINT_KS)]
    test_features = {}
    for i, name in enumerate(names):
        score[i, metrics.index("acc")], test_features[name] = session.accuracy(name, "test", params)
        score[i, metrics.index("val_acc")], _ = session.accuracy(name, "val", params)
        if tas:
            score[i, metrics.index("tas")] = session.tas(name, params)
    if joint:  # every task's labels in the head; the images of ``names`` (a fine-tuned model: its own task's)
        hits = joint_hits(session.backbone, list(session.bench.tasks.values()), params, "test", JOINT_KS, features=test_features,
                          images_of=names)
        for k in JOINT_KS:
            score[-1, metrics.index(f"hits@{k}")] = hits[f"hits@{k}"]
    return xr.Dataset({"score": (("task", "metric"), score)},
                      coords={"task": np.array(tasks, dtype=object), "metric": np.array(metrics, dtype=object)})


def _dataset_label(ctx: Context) -> str:
    """What a study's Datasets were computed on, for figure captions (``attrs["dataset"]``)."""
    return f"{ctx.bench.name} benchmark" + (" (micro-benchmark numbers, not the papers')" if ctx.spec.bench.kind == "micro" else "")


def analysis_node(ctx: Context, name: str, merged: Sequence[tuple[MergeJob, NodeResult]] = ()) -> NodeResult:
    """Run one registered analysis on the study's TaskSet (or bench, or its selected merges)."""
    from mergelab.experiments.registry import ANALYSES

    entry = ANALYSES[name]
    label = _dataset_label(ctx)
    inputs: dict[str, Any] = {"taskset": ctx.taskset.content_hash, "dataset": label, **entry.params}
    if entry.needs == "bench":
        inputs["data"] = ctx.bench.data_id
    if entry.needs == "merged":
        inputs["merged"] = [str(r.key) for _, r in merged]
    key = ctx.store.key(entry.producer, entry.version, **inputs)

    def analyse() -> xr.Dataset:
        if entry.needs == "taskset":
            return entry.fn(ctx.taskset, **entry.params)
        if entry.needs == "bench":
            return entry.fn(ctx.local_session, **entry.params)
        if not merged:
            raise InputError(f"analysis {name!r} needs merged models; add methods to the study")
        with_taskset = "taskset" in inspect.signature(entry.fn).parameters
        parts = [entry.fn(merged=_merged(ctx, r.key), **({"taskset": ctx.taskset} if with_taskset else {}), **entry.params)
                 .expand_dims(merge_method=[j.method], space=[j.space]) for j, r in merged]
        return xr.merge(parts, combine_attrs="drop_conflicts", join="outer", compat="no_conflicts")

    hit = ctx.publish(key, "dataset", lambda: analyse().assign_attrs(dataset=label), attrs={"analysis": name})
    ctx.store.set_ref(f"studies/{ctx.spec.name}/analysis/{name}", key)
    return NodeResult("analysis", key, hit, name)


def adaptation_study_node(ctx: Context, name: str) -> NodeResult:
    """Run one adaptation study of the spec's ``adaptation_studies`` (preference sweeps, AdaRank
    ablation; :data:`mergelab.experiments.registry.ADAPTATION_STUDIES`) and publish its Dataset."""
    from mergelab.experiments.registry import ADAPTATION_STUDIES, run_study

    entry, settings, seed = ADAPTATION_STUDIES[name], ctx.spec.adaptation_studies[name], ctx.spec.seeds[0]
    key = ctx.store.key(entry.producer, entry.version, taskset=ctx.taskset.content_hash, data=ctx.bench.data_id,
                        settings=settings, seed=seed)
    label = _dataset_label(ctx)
    hit = ctx.publish(key, "dataset", lambda: run_study(name, ctx.local_session, settings, seed=seed, dataset=label),
                      attrs={"adaptation_study": name})
    ctx.store.set_ref(f"studies/{ctx.spec.name}/{entry.ref}", key)
    return NodeResult("adaptation_study", key, hit, name)
