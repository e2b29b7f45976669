"""The node kinds of a study that compute artifacts: stage, reference, merge, adapt, evaluate, analysis, adaptation study.

Each kind is one :class:`~mergelab.study.run.Node` (kind, code version, content key, compute);
its key function reads nothing but keys and hashes, so probing a study computes keys and nothing else.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from mergelab.adaptive_spec import AdaptiveSpec
from mergelab.bases import Bases, adaptation_bases
from mergelab.config import config_label
from mergelab.errors import InputError
from mergelab.merging import METHODS, merge_modules, project
from mergelab.profiling import Measured, measure
from mergelab.provenance import reproducibility
from mergelab.store_format import Key
from mergelab.selection import SELECTION_RULES
from mergelab.study.run import JOINT, JOINT_KS, TASK_METRICS, AdaptJob, Run, MergeJob, Node, NodeResult
from mergelab.taskset import MergedUpdate, StoredUpdates, Update, update_tensors
from mergelab.tensor_files import Spool

# Node versions (bump one when its output changes for the same inputs): adapt 2: tied TARA-B bank; 3: STCH anchors no
# longer shift the loop's batches, |Δcoef| recorded; 4: TARA AdamW, AdaMerging clamp [0, 1], AdaRank masks attention/MLP
# only, start grids. merge 2: fidelity pass (TSV / Iso support "all", inner alpha 1, norm weights from the true updates,
# isometric spectral methods, CART ceil); 3: deterministic completion of zero singular directions (TSV / Iso on
# rank-deficient updates), KnOTS spectral stages on the reconstructed update, LoRA-LEGO on isometric factors.
# reference 2: the zero-shot base is scored on the joint task too; 3: each fine-tuned model on the joint task (its
# own task's images against every task's labels).


# Nodes ---------------------------------------------------------------------------------------------


def _stage(ctx: Run, key: Key) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load and hash the checkpoints; record what was staged. Warms the run's benchmark session."""
    from mergelab.checkpoints import describe

    ts = ctx.taskset
    return {"bench": ctx.bench.name, "taskset": ts.content_hash, "data": ctx.bench.data_id, "base": ts.base.content_hash,
            "tasks": [describe(t) for t in ts]}, {}


STAGE = Node("stage", "1", "json", lambda ctx: ctx.store.key("stage", STAGE.version, taskset=ctx.taskset.content_hash,
                                                             data=ctx.bench.data_id),
             _stage, lambda ctx: ctx.bench.name)


def hyper_parameters(job: MergeJob) -> dict[str, Any]:
    """A merge job's resolved hyper-parameters: its configuration and seed over the method's defaults."""
    config = dict(job.config)
    if job.seed is not None:
        config = {**config, "seed": job.seed}
    return METHODS[job.method].resolve(config)


def _merge_key(ctx: Run, job: MergeJob) -> Key:
    return ctx.store.key("merge", MERGE.version, taskset=ctx.taskset.content_hash, method=job.method,
                         space=job.space, hyper_parameters=hyper_parameters(job))


def _cost(run: Measured, bases: Sequence[Bases]) -> dict[str, Any]:
    """``merge_seconds`` / ``peak_memory_mb`` of a merge (or adaptation) that took its bases from the
    store: its own time plus the recorded time of computing them, the larger of the two peaks
    (docs/store.md §9), so the numbers mean the same whether the bases were computed now or read."""
    return {"merge_seconds": run.wall_s + sum(b.seconds for b in bases),
            "peak_memory_mb": max([run.peak_bytes / 2**20, *(b.peak_memory_mb for b in bases)]),
            "bases": [str(b.key) for b in bases], "bases_seconds": sum(b.seconds for b in bases)}


def _merge(ctx: Run, key: Key, job: MergeJob) -> tuple[Spool, dict[str, Any]]:
    """Merge one configuration (timed, peak memory measured): the MergedUpdate's tensors, spooled module by
    module as the merge makes them (:func:`~mergelab.merging.merge_modules`, :meth:`Store.spool
    <mergelab.store.Store.spool>`), so a full-space merge of an LLM is never held whole beside its model
    (the time includes writing the spool).

    In the knots and core spaces the projection is built from the task set's bases in the store
    (:func:`mergelab.bases.space_bases`: computed and published by the first merge that needs them).
    """
    hp = hyper_parameters(job)
    bases = ctx.space_bases(job.space)
    spool = ctx.store.spool(key)

    def emit(module: str, update: Update) -> None:
        for name, tensor in update_tensors(module, update).items():
            spool[name] = tensor

    if bases is None:
        run = measure(lambda: merge_modules(emit, ctx.taskset, job.method, job.space, **hp))
    else:
        run = measure(lambda: merge_modules(emit, project(ctx.taskset, job.space, bases=bases.modules), job.method, **hp))
    attrs = {"method": job.method, "space": job.space, "config": config_label(job.config), "seed": job.seed,
             "completed_directions": run.value.get("completed_directions", {}), **_cost(run, [] if bases is None else [bases]),
             **_merge_record(ctx, job, hp, spool[next(iter(spool))])}
    return spool, attrs


def _merge_record(ctx: Run, job: MergeJob, hp: Mapping[str, Any], sample: Tensor) -> dict[str, Any]:
    """What ``mergelab store verify --recompute`` re-runs a merge from (:mod:`mergelab.study.recompute`):
    the resolved hyper-parameters, the task set's hash and the study sections that load it, and the
    environment (:func:`mergelab.provenance.reproducibility`)."""
    return {"hyper_parameters": dict(hp), "taskset": ctx.taskset.content_hash,
            "taskset_source": ctx.spec.model_dump(mode="json", include={"bench", "tasks"}),
            "reproducibility": reproducibility(device=sample.device, dtype=sample.dtype,
                                               seeds={} if job.seed is None else {"merge": job.seed})}


MERGE = Node("merge", "3", "tensors", _merge_key, _merge, lambda ctx, job: job.label)


def _adapt_key(ctx: Run, job: AdaptJob) -> Key:
    return ctx.store.key("adapt", ADAPT.version, taskset=ctx.taskset.content_hash, data=ctx.bench.data_id,
                         spec=job.spec.model_dump(mode="json", exclude={"label"}), seed=job.seed,
                         allow_labels=ctx.spec.allow_labels)


def _history_key(ctx: Run, key: Key) -> Key:
    return ctx.store.key("adapt.history", ADAPT.version, run=str(key))


def _adapt(ctx: Run, key: Key, job: AdaptJob, progress: Callable[[int, float], None] | None = None,
           start_progress: Callable[[int, int], None] | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Adapt coefficients on unlabeled val batches (never test): the merged tensors.

    The history Dataset (loss curves, coefficient trajectories, final coefficients or masks) is
    published first and named ``studies/<name>/adapt/<label>``; the merged tensors last, so
    their presence means the node completed. SVD banks (``tara_b``, ``adarank``) are built from the
    task set's bases in the store (:func:`mergelab.bases.adaptation_bases`). ``progress(iteration,
    loss)`` hears of every step, ``start_progress(scored, total)`` of the search for the starting
    point before step 1 (:func:`_start`).
    """
    from mergelab.adaptation import adapt
    from mergelab.model.placement import resolve_device

    a, session = job.spec, ctx.local_session
    forward = session.forward()
    schedule = a.schedule
    labelled = schedule.objective == "labels"  # only when the study sets allow_labels (validated in config)
    batches = session.val_streams(session.names, schedule.batch_size, job.seed, labels=labelled)
    bank_bases, used = adaptation_bases(ctx.store, ctx.taskset, a.method, a.hp) or (None, [])
    hp, started = _start(ctx, a, bank_bases, start_progress)
    torch.manual_seed(job.seed)
    run = measure(lambda: adapt(a.method, ctx.taskset, forward, batches, schedule, bases=bank_bases, progress=progress, **hp))
    result = run.value
    attrs = {"method": a.name, "space": str(result.merged.meta.get("space", "full")),
             "config": config_label(adapt_hyper_parameters(a, started)),
             "seed": job.seed, **_cost(run, used), "seconds_per_iter": result.seconds_per_iter,
             "mean_abs_delta_coef": result.history.attrs["mean_abs_delta_coef"], "start": dict(started),
             "reproducibility": reproducibility(device=resolve_device(ctx.spec.device), dtype=ctx.spec.dtype,
                                                seeds={"adapt": job.seed})}  # torch.manual_seed and the val batch order
    if not ctx.store.exists(history := _history_key(ctx, key)):  # labelled with the bench, for figure captions
        ctx.store.put_dataset(history, result.history.assign_attrs(dataset=_dataset_label(ctx)), attrs=attrs)
    return result.merged.to_tensors(), attrs


# adapt 5: the history holds AdaRank's mask per singular component (002 Fig. 5) and the bench's label; 6: AdaRank-CART
# chooses its initial rank ratio on val with λ (002 App. A)
ADAPT = Node("adapt", "6", "tensors", _adapt_key, _adapt, lambda ctx, job: job.label,
             lambda ctx, key, job: {f"studies/{ctx.spec.name}/adapt/{job.spec.name}": _history_key(ctx, key)})


def adapt_hyper_parameters(a: AdaptiveSpec, started: Mapping[str, Any]) -> dict[str, Any]:
    """An adaptive run's configuration as the results record it: its schedule (iterations, learning
    rate, α where the scalarisation is anchored), its method's settings and the starting values
    chosen before it ran (``started``)."""
    from mergelab.adaptation.objectives import SCALARIZATIONS

    anchored = a.scalarization is not None and SCALARIZATIONS[a.scalarization].anchored
    return {"iters": a.iters, "lr": a.lr, **({"alpha": a.alpha} if anchored else {}), **a.hp, **started}


def _start(ctx: Run, a: AdaptiveSpec, bases: Any,
           progress: Callable[[int, int], None] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``a.hp`` with its starting hyper-parameters chosen before adapting, and those chosen values.

    The grid is ``a.start_grid`` or the method's (:attr:`~mergelab.adaptation.Adapter.start_grid`); every
    combination's starting merge (the coefficient model before any step) is scored on val by the
    study's selection rule (mean val accuracy, or mean TAS for ``selection: tas``), never on test.
    ``progress(scored, total)`` hears of every combination scored.
    """
    from itertools import product

    from mergelab.adaptation import ADAPTERS, build

    grid = ADAPTERS[a.method].start_grid(a.hp) if a.start_grid is None else a.start_grid
    if not grid:
        return dict(a.hp), {}
    best: tuple[float, dict[str, Any]] | None = None
    total = math.prod(len(values) for values in grid.values())
    for scored, values in enumerate(product(*grid.values()), start=1):
        chosen = dict(zip(grid, values, strict=True))
        params = ctx.session.weights(build(a.method, ctx.taskset, bases=bases, **{**a.hp, **chosen}).merged_update(ctx.taskset.base))
        score = _val_criterion(ctx, params)
        if best is None or score > best[0]:
            best = (score, chosen)
        if progress is not None:
            progress(scored, total)
    return {**a.hp, **best[1]}, best[1]


@torch.no_grad()
def start_scores(ctx: Run, job: AdaptJob, started: Mapping[str, Any]) -> xr.DataArray:
    """``score(task, metric)`` of an adaptive run's starting merge: its coefficient model before step
    1, with the starting values ``started`` that :func:`_start` chose (the adapt node's ``start``
    attribute), evaluated as every merge is (:func:`_scores`; raw accuracies). Where adaptation
    began, so that a table shows whether it helped."""
    from mergelab.adaptation import build

    a = job.spec
    bank_bases, _ = adaptation_bases(ctx.store, ctx.taskset, a.method, a.hp) or (None, [])
    model = build(a.method, ctx.taskset, bases=bank_bases, **{**a.hp, **started})
    return _scores(ctx, ctx.session.weights(model.merged_update(ctx.taskset.base)), ctx.session.names, joint=False)["score"]


@torch.no_grad()
def _val_criterion(ctx: Run, params: Mapping[str, Tensor]) -> float:
    """The study's selection criterion of one merged model on val, larger is better: the mean val
    accuracy over tasks (a rule of val accuracies) or minus the mean TAS (``tas``, 004 Eq. 2)."""
    session = ctx.local_session
    if _tas_enabled(ctx):
        return -float(np.mean([session.tas(n, params) for n in session.names]))
    return float(np.mean([session.accuracy(n, "val", params)[0] for n in session.names]))


def _merged(ctx: Run, key: str) -> MergedUpdate:
    return MergedUpdate.from_tensors(ctx.store.get_tensors(key), base=ctx.taskset.base)


def _tas_enabled(ctx: Run) -> bool:
    """Whether the study's selection rule reads the task alignment score."""
    return SELECTION_RULES[ctx.spec.selection].metric == "tas"


def _reference_key(ctx: Run, task: str | None) -> Key:
    ts = ctx.eval_session.taskset
    identity = ts.base.content_hash if task is None else ts.tasks[ts.names.index(task)].content_hash
    return ctx.store.key("reference", REFERENCE.version, update=identity, base=ts.base.content_hash,
                         data=ctx.eval_session.bench.data_id, task=task, joint=ctx.spec.joint)


def _reference(ctx: Run, key: Key, task: str | None) -> tuple[xr.Dataset, dict[str, Any]]:
    """Scores of task ``task``'s fine-tuned model on its own task (``None``: the zero-shot base on
    every evaluated task, the study's and its unseen ones)."""
    params = None if task is None else ctx.eval_session.finetuned(task)
    names = ctx.eval_session.names if task is None else [task]
    return _scores(ctx, params, names, joint=ctx.spec.joint), {"reference": "zeroshot" if task is None else "finetuned", "task": task}


# reference 4 / evaluate 2: TAS (val) in every evaluation, joint Hits@k per task as well as over all images;
# 5 / 3: the mean prediction entropy on val (val_entropy) and each test image's outcome (test_hit)
REFERENCE = Node("reference", "5", "dataset", _reference_key, _reference, lambda ctx, task: task or "zeroshot")


def _evaluate_key(ctx: Run, source: NodeResult) -> Key:
    return ctx.store.key("evaluate", EVALUATE.version, merged=source.key, data=ctx.eval_session.bench.data_id, joint=ctx.spec.joint)


def _evaluate(ctx: Run, key: Key, source: NodeResult) -> tuple[xr.Dataset, dict[str, Any]]:
    """Per-task val/test accuracy, TAS (val) and joint Hits@k (test) of one merge, on the study's
    tasks and its unseen ones; each module's update is read from the store when a forward needs it."""
    params = ctx.eval_session.weights(StoredUpdates(ctx.store.tensors(source.key)))
    return _scores(ctx, params, ctx.eval_session.names, joint=ctx.spec.joint), {}


EVALUATE = Node("evaluate", "3", "dataset", _evaluate_key, _evaluate, lambda ctx, source: source.label)


@torch.no_grad()
def _scores(ctx: Run, params: Mapping[str, Tensor] | None, names: Sequence[str], *, joint: bool) -> xr.Dataset:
    """``score(task, metric)``: raw accuracies, TAS and mean prediction entropy (normalisation happens
    when results are assembled); with ``joint``, each task's joint Hits@k (its images against every
    task's labels) and, on the :data:`JOINT` row, their micro average over all images.
    ``test_hit(example)``: each test image's top-1 outcome (its task in ``example_task``), which the
    results' paired bootstrap resamples."""
    from mergelab.evaluation.metrics import joint_hit_counts

    session = ctx.local_eval_session
    tasks = list(names) + ([JOINT] if joint else [])
    metrics = [*TASK_METRICS, *(f"hits@{k}" for k in JOINT_KS)]
    score = xr.DataArray(np.full((len(tasks), len(metrics)), np.nan), dims=("task", "metric"),
                         coords={"task": np.array(tasks, dtype=object), "metric": np.array(metrics, dtype=object)})
    test_features, hits = {}, {}
    for name in names:
        score.loc[name, "acc"], test_features[name] = session.accuracy(name, "test", params)
        hits[name] = session.hits(name, "test", params, features=test_features[name]).numpy()
        val = session.features(name, "val", params)
        score.loc[name, "val_acc"], _ = session.accuracy(name, "val", params, features=val)
        score.loc[name, "tas"] = session.tas(name, params, features=val)
        score.loc[name, "val_entropy"] = session.entropy(name, "val", params, features=val)
    if joint:  # every task's labels in the head; the images of ``names`` (a fine-tuned model: its own task's)
        counts = joint_hit_counts(session.backbone, list(session.bench.tasks.values()), params, "test", JOINT_KS,
                                  features=test_features, images_of=names, head=session.joint_head())
        for k in JOINT_KS:
            for name, c in counts.items():
                score.loc[name, f"hits@{k}"] = c[k] / c[0]
            score.loc[JOINT, f"hits@{k}"] = sum(c[k] for c in counts.values()) / sum(c[0] for c in counts.values())
    example_task = np.concatenate([np.full(len(h), name, dtype=object) for name, h in hits.items()])
    return xr.Dataset({"score": score, "test_hit": xr.DataArray(np.concatenate(list(hits.values())), dims="example",
                                                                coords={"example_task": ("example", example_task)})})


def _dataset_label(ctx: Run) -> str:
    """What a study's Datasets were computed on, for figure captions (``attrs["dataset"]``)."""
    return f"{ctx.bench.name} benchmark" + (f" ({ctx.spec.bench.embedded} numbers, not the papers')" if ctx.spec.bench.embedded else "")


def _analysis_key(ctx: Run, name: str, merged: Sequence[tuple[MergeJob, NodeResult]] = ()) -> Key:
    from mergelab.experiments.registry import ANALYSES

    entry = ANALYSES[name]
    inputs: dict[str, Any] = {"taskset": ctx.taskset.content_hash, "dataset": _dataset_label(ctx),
                              **entry.settings(ctx.spec.analysis_settings.get(name))}
    if entry.needs == "bench":
        inputs["data"] = ctx.bench.data_id
    if entry.needs == "merged":
        inputs["merged"] = [str(r.key) for _, r in merged]
    return ctx.store.key(entry.producer, entry.version, **inputs)


def _analysis(ctx: Run, key: Key, name: str,
              merged: Sequence[tuple[MergeJob, NodeResult]] = ()) -> tuple[xr.Dataset, dict[str, Any]]:
    """Run one registered analysis on the study's TaskSet (or bench, or its selected merges)."""
    from mergelab.experiments.registry import ANALYSES

    entry = ANALYSES[name]
    settings = entry.settings(ctx.spec.analysis_settings.get(name))
    if entry.needs == "taskset":
        ds = entry.fn(ctx.taskset, **settings)
    elif entry.needs == "bench":
        ds = entry.fn(ctx.local_session, **settings)
    elif not merged:
        raise InputError(f"analysis {name!r} needs merged models; add methods to the study")
    else:
        with_taskset = "taskset" in inspect.signature(entry.fn).parameters
        parts = [entry.fn(merged=_merged(ctx, r.key), **({"taskset": ctx.taskset} if with_taskset else {}), **settings)
                 .expand_dims(merge_method=[j.method], space=[j.space]) for j, r in merged]
        ds = xr.merge(parts, combine_attrs="drop_conflicts", join="outer", compat="no_conflicts")
    return ds.assign_attrs(dataset=_dataset_label(ctx)), {"analysis": name}


ANALYSIS = Node("analysis", None, "dataset", _analysis_key, _analysis, lambda ctx, name, merged=(): name,
                lambda ctx, key, name, merged=(): {f"studies/{ctx.spec.name}/analysis/{name}": key})


def _adaptation_study_key(ctx: Run, name: str) -> Key:
    from mergelab.experiments.registry import resolve

    _, entry, settings = resolve(name, ctx.spec.adaptation_studies[name])
    return ctx.store.key(entry.producer, entry.version, taskset=ctx.taskset.content_hash, data=ctx.bench.data_id,
                         settings=settings, seed=ctx.spec.seeds[0])


def _adaptation_study(ctx: Run, key: Key, name: str) -> tuple[xr.Dataset, dict[str, Any]]:
    """Run one adaptation study of the spec's ``adaptation_studies`` (preference sweeps, AdaRank
    ablation; :data:`mergelab.experiments.registry.ADAPTATION_STUDIES`)."""
    from mergelab.experiments.registry import run_study

    ds = run_study(name, ctx.local_session, ctx.spec.adaptation_studies[name], seed=ctx.spec.seeds[0],
                   dataset=_dataset_label(ctx))
    return ds, {"adaptation_study": name}


def _adaptation_study_refs(ctx: Run, key: Key, name: str) -> dict[str, str]:
    from mergelab.experiments.registry import study_ref

    return {f"studies/{ctx.spec.name}/{study_ref(name, ctx.spec.adaptation_studies[name])}": key}


ADAPTATION_STUDY = Node("adaptation_study", None, "dataset", _adaptation_study_key, _adaptation_study,
                        lambda ctx, name: name, _adaptation_study_refs)
