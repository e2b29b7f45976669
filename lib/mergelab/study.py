"""The nodes of a study (DESIGN §8): pure functions, each cached in the store under a content key.

``flows/`` wraps every node in a Prefect task; nothing here imports Prefect. A node takes the
:class:`StudySpec`, the store URL and its own inputs (plain values or other nodes' keys), so it
runs the same in a thread, an in-process Dask worker or a remote one, and returns a
:class:`NodeResult` that says whether the store already held its artifact.

| node        | key inputs                                                 | artifact |
|-------------|------------------------------------------------------------|----------|
| stage       | TaskSet content hash, bench data id                         | JSON: tasks, hashes, sources |
| reference   | the task's update hash, base hash, data id                  | Dataset: fine-tuned / zero-shot scores |
| merge       | TaskSet hash, method, space, resolved hyper-parameters      | tensors: the MergedUpdate (+ wall time, peak memory) |
| adapt       | TaskSet hash, data id, the adaptive spec, seed              | tensors: the MergedUpdate; Dataset: its history |
| evaluate    | the merged artifact's key, data id, metrics asked for       | Dataset ``score(task, metric)`` |
| analysis    | the registry entry's producer/version, its inputs           | Dataset (``studies/<name>/analysis/<a>``) |
| adaptation_study | the entry's producer/version, TaskSet hash, data id, settings, seed | Dataset (``studies/<name>/<ref>``) |
| results     | every evaluation's key, the selection rule                  | Dataset ``studies/<name>/results`` |

Changing one hyper-parameter changes one merge key, hence its evaluation and the results, and
nothing else. Changed adapters change the TaskSet hash and every key below it.
"""

from __future__ import annotations

import copy
import inspect
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from mergelab.bases import Bases, adaptation_bases, space_bases
from mergelab.bench import Bench, load_bench
from mergelab.config import AdaptiveSpec, StudySpec, config_label
from mergelab.errors import InputError
from mergelab.merging import METHODS, merge, project
from mergelab.profiling import Measured, measure
from mergelab.store import Key, Kind, Store
from mergelab.taskset import MergedUpdate, TaskSet

__all__ = ["AdaptJob", "Context", "JOINT", "MergeJob", "NODES", "NodeResult", "NotCached", "Row", "Submit", "VERSIONS",
           "adapt_jobs", "adapt_node", "adapt_row", "adaptation_study_node", "analyses_up_to_date", "analysis_graph",
           "analysis_node", "context",
           "evaluate_node", "grid_edges", "local_submit", "merge_jobs", "merge_node", "merge_row", "reference_node", "results_node",
           "results_table", "run_graph", "selected_for_analyses", "selected_merges", "stage_node", "up_to_date"]

#: Code version of every node's producer; bump one when its output changes for the same inputs.
VERSIONS = {"stage": "1", "reference": "3", "merge": "2", "adapt": "4", "evaluate": "1", "results": "5"}
# adapt 2: tied TARA-B bank; 3: STCH anchors no longer shift the loop's batches, |Δcoef| recorded; 4: TARA AdamW, AdaMerging
# clamp [0, 1], AdaRank masks attention/MLP only, start grids. merge 2: fidelity pass (TSV / Iso support "all", inner alpha 1,
# norm weights from the true updates, isometric spectral methods, CART ceil). results 2: mean_abs_delta_coef; 3: zero-shot
# joint Hits@k; 4: dimension merge_method (``method`` is a keyword of DataArray.sel); 5: the fine-tuned experts' joint
# Hits@k. reference 2: the zero-shot base is scored on the joint task too; 3: each fine-tuned model on the joint task
# (its own task's images against every task's labels)
#: The pseudo-task holding the joint-task metrics (Hits@k over the union of labels).
JOINT = "joint"
#: Metrics per task: test accuracy and its normalised value, the same on val, TAS on val.
TASK_METRICS = ("acc", "norm_acc", "val_acc", "val_norm_acc", "tas")
JOINT_KS = (1, 3, 5)


class NotCached(Exception):
    """A probing :class:`Context` met a node whose artifact is not in the store."""


@dataclass(frozen=True)
class NodeResult:
    """What one node did: its kind, its content key, whether the store already had it, and a label."""

    node: str
    key: str
    hit: bool
    label: str = ""


@dataclass(frozen=True)
class MergeJob:
    """One static merge of the sweep: method × space × configuration (× seed for stochastic methods)."""

    method: str
    space: str
    config: dict[str, Any]
    seed: int | None = None

    @property
    def label(self) -> str:
        return f"{self.method}/{self.space}/{config_label(self.config)}" + ("" if self.seed is None else f"/seed={self.seed}")


@dataclass(frozen=True)
class AdaptJob:
    """One adaptive run: its spec and seed."""

    spec: AdaptiveSpec
    seed: int

    @property
    def label(self) -> str:
        return f"{self.spec.name}/seed={self.seed}"


# The context a node runs in ------------------------------------------------------------------------


class Context:
    """A study's spec, store and lazily loaded benchmark, shared by the nodes of one process.

    ``bench`` overrides the benchmark the spec describes (``mergelab merge --select`` evaluates
    the user's adapters on a benchmark's tasks). A ``probe`` context computes nothing: a node
    whose artifact is missing raises :class:`NotCached` (see :func:`up_to_date`).
    """

    def __init__(self, spec: StudySpec, store_url: str, bench: Bench | None = None, probe: bool = False) -> None:
        self.spec = spec
        self.store = Store(store_url)
        self.probe = probe
        self._given_bench = bench
        self._lock = threading.RLock()
        self._local = threading.local()
        self._bases: dict[str, Bases | None] = {}
        self._bases_lock = threading.Lock()

    @cached_property
    def bench(self) -> Bench:
        with self._lock:
            return self._given_bench or load_bench(self.spec.bench, self.spec.tasks)

    @property
    def local_bench(self) -> Bench:
        """The (warmed) bench with this thread's own copy of the backbone.

        A functional forward swaps the module's parameters while it runs, so two threads must
        never run one module at once; each worker thread gets a private copy instead.
        """
        if getattr(self._local, "bench", None) is None:
            self.warm()
            with self._lock:
                local = replace(self.bench, backbone=copy.deepcopy(self.bench.backbone))
                local.__dict__["taskset"] = self.taskset  # share the loaded TaskSet (cached_property slot)
                self._local.bench = local
        return self._local.bench

    @cached_property
    def taskset(self) -> TaskSet:
        with self._lock:
            return self.bench.taskset

    @cached_property
    def base(self) -> dict[str, Tensor]:
        with self._lock:
            return self.bench.backbone.base_state()

    @cached_property
    def heads(self) -> dict[str, Tensor]:
        from mergelab.evaluation.heads import task_head

        with self._lock, torch.no_grad():
            return {name: task_head(self.bench.backbone, task) for name, task in self.bench.tasks.items()}

    def warm(self) -> None:
        """Build the shared data once (task splits, heads) before this thread runs a model.

        The first caller generates everything while concurrent callers wait; nodes whose
        artifact is already stored never call it, so a cached rerun skips the data entirely.
        """
        with self._lock:
            if not getattr(self, "_warm", False):
                _ = self.taskset, self.base, self.heads
                for task in self.bench.tasks.values():
                    task.tensors("val"), task.tensors("test")
                self._warm = True

    def space_bases(self, space: str) -> Bases | None:
        """The task set's bases for ``space`` (:func:`mergelab.bases.space_bases`), read from the
        store, or computed and published, once per run rather than once per merge."""
        with self._bases_lock:
            if space not in self._bases:
                self._bases[space] = space_bases(self.store, self.taskset, space)
            return self._bases[space]

    def cached(self, key: str) -> bool:
        """Whether ``key`` is published (a probe raises :class:`NotCached` instead of answering no)."""
        if self.store.exists(key):
            return True
        if self.probe:
            raise NotCached(key)
        return False

    def publish(self, key: str, kind: Kind, compute: Callable[[], Any], attrs: Mapping[str, Any] | None = None) -> bool:
        """Publish ``compute()`` under ``key`` unless it is there (nothing is read then); return the hit."""
        if self.cached(key):
            return True
        self.store.memo(key, kind, compute, attrs)
        return False

    def params(self, merged: MergedUpdate) -> dict[str, Tensor]:
        """Full encoder weights ``W_0 + ΔW`` for every merged parameter."""
        return {m: self.base[m] + u.dense(self.base[m].dtype) for m, u in merged.modules.items()}


_CONTEXTS: dict[tuple[str, str, str], Context] = {}
_CONTEXTS_LOCK = threading.Lock()
#: Contexts kept per process (older runs' are dropped: a run re-reads its checkpoints).
_KEEP = 2


def context(spec: StudySpec, store_url: str, run: str = "") -> Context:
    """The :class:`Context` of one run (``run`` identifies it) of ``spec`` against ``store_url``.

    Nodes of the same run in the same process share it; a new run loads the checkpoints again,
    so adapters changed on disk between scheduled runs are seen.
    """
    ident = (spec.model_dump_json(), store_url, run)
    with _CONTEXTS_LOCK:
        if ident not in _CONTEXTS:
            _CONTEXTS[ident] = Context(spec, store_url)
            while len(_CONTEXTS) > _KEEP:
                _CONTEXTS.pop(next(iter(_CONTEXTS)))
        return _CONTEXTS[ident]


# Planning ------------------------------------------------------------------------------------------


def _stochastic(method: str) -> bool:
    return any(name.rsplit(".", 1)[-1] == "seed" for name in METHODS[method].params)


def merge_jobs(spec: StudySpec) -> list[MergeJob]:
    """Every static merge of the study: methods × spaces × grid configurations (× seeds if stochastic)."""
    jobs = []
    for m in spec.methods:
        seeds: Sequence[int | None] = spec.seeds if _stochastic(m.method) else [None]
        jobs += [MergeJob(m.method, space, config, seed) for space in m.spaces for config in m.configs() for seed in seeds]
    return jobs


def adapt_jobs(spec: StudySpec) -> list[AdaptJob]:
    """Every adaptive run: adaptive specs × seeds, each started from the study's ``adaptive_init``
    (written into its ``hp``, hence its key and label) when the study sets one."""
    from mergelab.adaptation import ADAPTERS

    def started(a: AdaptiveSpec) -> AdaptiveSpec:
        if spec.adaptive_init is None:
            return a
        return a.model_copy(update={"hp": ADAPTERS[a.method].with_start(a.hp, spec.adaptive_init)})

    return [AdaptJob(started(a), seed) for a in spec.adaptive for seed in spec.seeds]


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


def _batches(images: Tensor, labels: Tensor | None, batch_size: int, seed: int) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
    """Endless shuffled val batches (a new permutation per epoch); labelled only when ``labels`` is given."""
    g = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(images))
    while True:
        order = torch.randperm(len(images), generator=g)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            take = order[i:i + batch_size]
            yield images[take] if labels is None else (images[take], labels[take])


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
    from mergelab.adaptation import Forward, adapt
    from mergelab.evaluation.heads import image_logits

    key = adapt_key(ctx, job)
    history_key = ctx.store.key("adapt.history", VERSIONS["adapt"], run=str(key))
    if ctx.cached(key):
        return NodeResult("adapt", key, True, job.label)
    a, bench = job.spec, ctx.local_bench
    names = list(bench.tasks)
    forward = Forward(base={m: ctx.base[m] for m in ctx.taskset.module_names},
                      logits=lambda t, x, p: image_logits(bench.backbone, x, ctx.heads[names[t]], p),
                      tokens=bench.backbone.image_tokens)
    labelled = a.objective == "labels"  # only when the study sets allow_labels (validated in config)
    batches = [_batches(*_val(bench, n, labelled), a.batch_size, job.seed + i) for i, n in enumerate(names)]
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


def _val(bench: Bench, name: str, labelled: bool) -> tuple[Tensor, Tensor | None]:
    images, labels = bench.tasks[name].tensors("val")
    return images, labels if labelled else None


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
        params = ctx.params(build(a.method, ctx.taskset, bases=bases, **{**a.hp, **chosen}).merged_update(ctx.taskset.base))
        score = _val_criterion(ctx, params)
        if best is None or score > best[0]:
            best = (score, chosen)
    return {**a.hp, **best[1]}, best[1]


@torch.no_grad()
def _val_criterion(ctx: Context, params: Mapping[str, Tensor]) -> float:
    """The study's selection criterion of one merged model on val, larger is better: the mean val
    accuracy over tasks (``selection: val``) or minus the mean TAS (``tas``, 004 Eq. 2)."""
    names = list(ctx.bench.tasks)
    if ctx.spec.selection == "tas":
        return -float(np.mean([_tas(ctx, n, params) for n in names]))
    return float(np.mean([_accuracy(ctx, n, "val", params)[0] for n in names]))


def _merged(ctx: Context, key: str) -> MergedUpdate:
    return MergedUpdate.from_tensors(ctx.store.get_tensors(key), base=ctx.taskset.base)


def _tas_enabled(ctx: Context) -> bool:
    return ctx.spec.selection == "tas"


def reference_node(ctx: Context, task: str | None) -> NodeResult:
    """Scores of task ``task``'s fine-tuned model on its own task (``None``: the zero-shot base on all)."""
    from mergelab.adaptation.loop import task_weights

    ts = ctx.taskset
    index = None if task is None else ts.names.index(task)
    identity = ts.base.content_hash if index is None else ts.tasks[index].content_hash
    key = ctx.store.key("reference", VERSIONS["reference"], update=identity, base=ts.base.content_hash,
                        data=ctx.bench.data_id, task=task, joint=ctx.spec.joint)

    def compute() -> xr.Dataset:
        params = None if index is None else task_weights(ts, ctx.base, index)
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
    hit = ctx.publish(key, "dataset", lambda: _scores(ctx, ctx.params(_merged(ctx, source.key)), list(ctx.bench.tasks),
                                                      joint=ctx.spec.joint, tas=_tas_enabled(ctx)))
    return NodeResult("evaluate", key, hit, source.label)


@torch.no_grad()
def _scores(ctx: Context, params: Mapping[str, Tensor] | None, names: Sequence[str], *, joint: bool, tas: bool) -> xr.Dataset:
    """``score(task, metric)``: raw accuracies (normalisation happens when results are assembled)."""
    from mergelab.evaluation.metrics import joint_hits

    bench = ctx.local_bench
    tasks = names + ([JOINT] if joint else [])
    score = np.full((len(tasks), len(TASK_METRICS) + len(JOINT_KS)), np.nan)
    metrics = [*TASK_METRICS, *(f"hits@{k}" for k in JOINT_KS)]
    test_features = {}
    for i, name in enumerate(names):
        score[i, metrics.index("acc")], test_features[name] = _accuracy(ctx, name, "test", params)
        score[i, metrics.index("val_acc")], _ = _accuracy(ctx, name, "val", params)
        if tas:
            score[i, metrics.index("tas")] = _tas(ctx, name, params)
    if joint:  # every task's labels in the head; the images of ``names`` (a fine-tuned model: its own task's)
        hits = joint_hits(bench.backbone, list(bench.tasks.values()), params, "test", JOINT_KS, features=test_features,
                          images_of=names)
        for k in JOINT_KS:
            score[-1, metrics.index(f"hits@{k}")] = hits[f"hits@{k}"]
    return xr.Dataset({"score": (("task", "metric"), score)},
                      coords={"task": np.array(tasks, dtype=object), "metric": np.array(metrics, dtype=object)})


def _accuracy(ctx: Context, name: str, split: str, params: Mapping[str, Tensor] | None) -> tuple[float, Tensor]:
    """Top-1 accuracy of task ``name`` on ``split`` with its zero-shot head, and the image features."""
    from mergelab.evaluation.metrics import embed, top1_accuracy

    images, labels = ctx.local_bench.tasks[name].tensors(split)
    features = embed(ctx.local_bench.backbone, images, params)
    return top1_accuracy(features @ ctx.heads[name].T, labels), features


def _tas(ctx: Context, name: str, params: Mapping[str, Tensor] | None) -> float:
    """TAS_t (004 Eq. 2) of the merged model on task ``name``'s unlabeled val images."""
    from mergelab.adaptation.loop import task_weights
    from mergelab.analysis.proxies import tas

    t = ctx.taskset.names.index(name)
    return tas(ctx.local_bench.backbone, ctx.bench.tasks[name], params, task_weights(ctx.taskset, ctx.base, t))


def _dataset_label(ctx: Context) -> str:
    """What a study's Datasets were computed on, for figure captions (``attrs["dataset"]``)."""
    return f"{ctx.bench.name} benchmark" + (" (micro-benchmark numbers, not the papers')" if ctx.spec.bench.kind == "micro" else "")


def analysis_node(ctx: Context, name: str, merged: Sequence[tuple[MergeJob, NodeResult]] = ()) -> NodeResult:
    """Run one registered analysis on the study's TaskSet (or bench, or its selected merges)."""
    from mergelab.analysis.registry import ANALYSES

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
            return entry.fn(ctx.local_bench, **entry.params)
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
    ablation; :data:`mergelab.adaptation.registry.ADAPTATION_STUDIES`) and publish its Dataset."""
    from mergelab.adaptation.registry import ADAPTATION_STUDIES, run_study

    entry, settings, seed = ADAPTATION_STUDIES[name], ctx.spec.adaptation_studies[name], ctx.spec.seeds[0]
    key = ctx.store.key(entry.producer, entry.version, taskset=ctx.taskset.content_hash, data=ctx.bench.data_id,
                        settings=settings, seed=seed)
    label = _dataset_label(ctx)
    hit = ctx.publish(key, "dataset", lambda: run_study(name, ctx.local_bench, settings, seed=seed, dataset=label),
                      attrs={"adaptation_study": name})
    ctx.store.set_ref(f"studies/{ctx.spec.name}/{entry.ref}", key)
    return NodeResult("adaptation_study", key, hit, name)


# Results -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One merged model of the study: where it sits in the results and its nodes' keys."""

    method: str
    space: str
    config: str
    seed: int
    produced: str
    evaluated: str


def merge_row(job: MergeJob, produced: NodeResult, evaluated: NodeResult, seed: int) -> Row:
    return Row(job.method, job.space, config_label(job.config), job.seed if job.seed is not None else seed,
               produced.key, evaluated.key)


def adapt_row(ctx: Context, job: AdaptJob, produced: NodeResult, evaluated: NodeResult) -> Row:
    attrs = ctx.store.info(produced.key).attrs
    return Row(job.spec.name, attrs["space"], attrs["config"], job.seed, produced.key, evaluated.key)


def selected_merges(ctx: Context, results: NodeResult, jobs: Sequence[MergeJob],
                    produced: Sequence[NodeResult]) -> list[tuple[MergeJob, NodeResult]]:
    """The static merges the selection chose (first seed), for analyses of merged models."""
    selected = ctx.store.get_dataset(results.key)["selected"]
    seed = ctx.spec.seeds[0]
    return [(j, p) for j, p in zip(jobs, produced, strict=True)
            if (j.seed is None or j.seed == seed) and bool(selected.sel(merge_method=j.method, space=j.space, config=config_label(j.config), seed=seed))]


def results_key(ctx: Context, rows: Sequence[Row], references: Sequence[NodeResult]) -> Key:
    return ctx.store.key("results", VERSIONS["results"], study=ctx.spec.name, rows=[r.__dict__ for r in rows],
                         references=[r.key for r in references], selection=ctx.spec.selection)


def results_node(ctx: Context, rows: Sequence[Row], references: Sequence[NodeResult]) -> NodeResult:
    """Assemble the study's results Dataset, select configurations, publish ``studies/<name>/results``."""
    key = results_key(ctx, rows, references)
    hit = ctx.publish(key, "dataset", lambda: _assemble(ctx, rows, references))
    ctx.store.set_ref(f"studies/{ctx.spec.name}/results", key)
    return NodeResult("results", key, hit, ctx.spec.name)


def _unique(values: Sequence[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def _assemble(ctx: Context, rows: Sequence[Row], references: Sequence[NodeResult]) -> xr.Dataset:
    store = ctx.store
    names = list(ctx.bench.tasks)
    zeroshot = store.get_dataset(references[0].key)["score"]
    experts = [store.get_dataset(r.key)["score"] for r in references[1:]]
    finetuned = xr.concat([e.sel(task=[t]) for e, t in zip(experts, names, strict=True)], dim="task")
    if JOINT in experts[0].task.values:  # the experts on the joint task: micro average over every test image
        sizes = xr.DataArray([len(ctx.local_bench.tasks[t].tensors("test")[1]) for t in names], dims="expert")
        joint = (xr.concat([e.sel(task=JOINT) for e in experts], dim="expert") * sizes).sum("expert", skipna=False) / sizes.sum()
        finetuned = xr.concat([finetuned, joint.expand_dims(task=[JOINT])], dim="task")
    dims = {"merge_method": _unique([r.method for r in rows]), "space": _unique([r.space for r in rows]),
            "config": _unique([r.config for r in rows]), "seed": _unique([r.seed for r in rows])}
    first = store.get_dataset(rows[0].evaluated)["score"]
    tasks, metrics = list(first.task.values), list(first.metric.values)
    score = np.full([len(dims["merge_method"]), len(dims["space"]), len(dims["config"]), len(tasks), len(metrics), len(dims["seed"])], np.nan)
    per_merge = {v: np.full([len(values) for values in dims.values()], np.nan)
                 for v in ("merge_seconds", "peak_memory_mb", "mean_abs_delta_coef")}
    ft = finetuned.sel(task=names)
    for r in rows:
        at = tuple(values.index(v) for values, v in zip(dims.values(), (r.method, r.space, r.config, r.seed), strict=True))
        s = store.get_dataset(r.evaluated)["score"].copy()
        s.loc[names, "norm_acc"] = s.sel(task=names, metric="acc") / ft.sel(metric="acc")
        s.loc[names, "val_norm_acc"] = s.sel(task=names, metric="val_acc") / ft.sel(metric="val_acc")
        score[at[:3] + (slice(None), slice(None), at[3])] = s.sel(task=tasks, metric=metrics).values
        attrs = store.info(r.produced).attrs
        for v in per_merge:
            per_merge[v][at] = attrs.get(v, np.nan)
    coords = {d: np.array(v, dtype=object) if d != "seed" else np.array(v) for d, v in dims.items()}
    coords |= {"task": np.array(tasks, dtype=object), "metric": np.array(metrics, dtype=object)}
    ds = xr.Dataset({"score": (("merge_method", "space", "config", "task", "metric", "seed"), score),
                     **{v: (tuple(dims), a) for v, a in per_merge.items()}}, coords=coords)
    reference = xr.concat([zeroshot.reindex(task=tasks), finetuned.reindex(task=tasks)],
                          dim=xr.DataArray(["zeroshot", "finetuned"], dims="reference"))
    ds["reference_score"] = reference.assign_coords(reference=np.array(["zeroshot", "finetuned"], dtype=object),
                                              task=np.array(tasks, dtype=object), metric=np.array(metrics, dtype=object))
    ds["selected"] = _select(ds, ctx.spec.selection, names)
    ds.attrs.update({"study": ctx.spec.name, "bench": ctx.bench.name, "taskset": ctx.taskset.content_hash,
                     "selection": ctx.spec.selection, "tasks": names,
                     "note": f"{ctx.bench.name} benchmark numbers" + (" (the embedded micro benchmark, not the papers')"
                                                                      if ctx.spec.bench.kind == "micro" else "")})
    return ds


def _select(ds: xr.Dataset, rule: str, names: Sequence[str]) -> xr.DataArray:
    """Per method × space × seed, the configuration with the best mean val normalised accuracy
    (``val``) or the lowest mean TAS on val (``tas``, 004 Eq. 2). The test split never enters."""
    metric, best = ("val_norm_acc", "max") if rule == "val" else ("tas", "min")
    criterion = ds["score"].sel(task=list(names), metric=metric).mean("task")
    filled = criterion.fillna(-np.inf if best == "max" else np.inf)
    chosen = filled.argmax("config") if best == "max" else filled.argmin("config")
    selected = xr.zeros_like(ds["merge_seconds"], dtype=bool)
    for i in range(len(ds.config)):
        selected[{"config": i}] = (chosen == i) & criterion.isel(config=i).notnull()
    return selected.assign_attrs(rule=rule, criterion=f"{best} mean {metric} over tasks")


def results_table(ds: xr.Dataset, seed: int | None = None) -> Any:
    """The selected configuration of every method × space as a pandas DataFrame.

    Columns: method, space, config, mean normalised accuracy and mean accuracy (test, %),
    joint Hits@1 (%), merge time (s) and peak memory (MiB), and for adaptive runs the mean
    ``|Δcoefficient|`` from their start, averaged over seeds unless ``seed``. A configuration that
    sits on the edge of its grid (:func:`grid_edges`) is marked ``(edge)``.
    """
    import pandas as pd

    sel = ds if seed is None else ds.sel(seed=[seed])
    tasks = list(ds.attrs["tasks"])
    edges = grid_edges(ds)
    rows = []
    for method in sel.merge_method.values:
        for space in sel.space.values:
            mask = sel["selected"].sel(merge_method=method, space=space)
            if not bool(mask.any()):
                continue
            picked = sel.sel(merge_method=method, space=space).where(mask)
            configs = [c for c in sel.config.values if bool(mask.sel(config=c).any())]
            configs = [c + (" (edge)" if edges.get((method, space, c)) else "") for c in configs]
            score = picked["score"]
            row = {"method": method, "space": space, "config": "; ".join(configs),
                   "norm_acc": 100 * float(score.sel(task=tasks, metric="norm_acc").mean("task").max("config").mean("seed")),
                   "acc": 100 * float(score.sel(task=tasks, metric="acc").mean("task").max("config").mean("seed")),
                   "merge_s": float(picked["merge_seconds"].max("config").mean("seed")),
                   "peak_mb": float(picked["peak_memory_mb"].max("config").mean("seed"))}
            if JOINT in score.task.values:
                row["hits@1"] = 100 * float(score.sel(task=JOINT, metric="hits@1").max("config").mean("seed"))
            if "mean_abs_delta_coef" in picked:
                row["|Δcoef|"] = float(picked["mean_abs_delta_coef"].max("config").mean("seed"))
            rows.append(row)
    finetuned = ds["reference_score"].sel(reference="finetuned", task=tasks, metric="acc")
    references = [{"method": name, "space": "-", "config": "-",
                   "norm_acc": 100 * float((acc / finetuned).mean()), "acc": 100 * float(acc.mean())}
                  for name in ("zeroshot", "finetuned")
                  for acc in [ds["reference_score"].sel(reference=name, task=tasks, metric="acc")]]
    if JOINT in ds["reference_score"].task.values and rows and "hits@1" in rows[0]:
        for row in references:
            row["hits@1"] = 100 * float(ds["reference_score"].sel(reference=row["method"], task=JOINT, metric="hits@1"))
    return pd.DataFrame(references + rows)


def _parse_label(label: str) -> dict[str, str]:
    """``config_label``'s ``k=v,k=v`` back into its pairs (a part without ``=`` belongs to a list
    value such as ``clamp=[0, 1]`` and is dropped: lists are never numeric grid values)."""
    return dict(part.split("=", 1) for part in label.split(",") if "=" in part)


def _number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def _at_bound(method: str, name: str, value: float) -> bool:
    """Whether ``value`` is an end of the hyper-parameter's allowed range (TIES' density 1: no trim),
    beyond which no grid can go."""
    try:
        interval = METHODS[method].params[name].interval
    except (InputError, KeyError):
        return False
    return interval is not None and value in (interval.low, interval.high)


def grid_edges(ds: xr.Dataset) -> dict[tuple[str, str, str], list[str]]:
    """``{(method, space, config): [hyper-parameters]}`` of selected configurations whose value of a
    swept numeric hyper-parameter is the smallest or largest of the grid that was swept (the
    optimum may lie outside it: widen that grid), unless it is an end of the allowed range (TIES'
    density 1). Adaptive runs (one configuration) never are."""
    out: dict[tuple[str, str, str], list[str]] = {}
    for method in ds.merge_method.values:
        for space in ds.space.values:
            present = ds["merge_seconds"].sel(merge_method=method, space=space).notnull().any("seed")
            configs = [str(c) for c in ds.config.values if bool(present.sel(config=c))]
            chosen = ds["selected"].sel(merge_method=method, space=space).any("seed")
            parsed = {c: _parse_label(c) for c in configs}
            for config in (c for c in configs if bool(chosen.sel(config=c))):
                flagged = []
                for name, value in parsed[config].items():
                    values = {_number(p[name]) for p in parsed.values() if name in p} - {None}
                    x = _number(value)
                    if len(values) > 1 and x in (min(values), max(values)) and not _at_bound(str(method), name, x):
                        flagged.append(name)
                if flagged:
                    out[(str(method), str(space), config)] = flagged
    return out


# The graph -----------------------------------------------------------------------------------------

#: Node kind -> node function ``(ctx, *args) -> NodeResult``; ``flows/`` wraps each in a Prefect task.
NODES: dict[str, Callable[..., NodeResult]] = {
    "stage": stage_node, "reference": reference_node, "merge": merge_node, "adapt": adapt_node, "evaluate": evaluate_node,
    "results": results_node, "analysis": analysis_node, "adaptation_study": adaptation_study_node,
}

#: Runs a batch of nodes of one kind, ``submit(kind, [args, ...])``, and returns their results in order.
Submit = Callable[[str, Sequence[tuple[Any, ...]]], list[NodeResult]]


def run_graph(ctx: Context, submit: Submit) -> tuple[list[NodeResult], NodeResult | None]:
    """Every node of the study in dependency order; returns them all and the results node.

    Stage, references, merges, adaptive runs, their evaluations, the results (selection), the
    analyses (those of merged models take the selected merges) and the adaptation studies. A
    study without merges (only analyses or adaptation studies) has no results node (``None``).
    """
    spec = ctx.spec
    staged = submit("stage", [()])
    merges, adapts = merge_jobs(spec), adapt_jobs(spec)
    references = submit("reference", [(name,) for name in [None, *ctx.bench.tasks]]) if merges or adapts else []
    merged = submit("merge", [(job,) for job in merges])
    adapted = submit("adapt", [(job,) for job in adapts])
    evaluated = submit("evaluate", [(produced,) for produced in merged + adapted])
    rows = [merge_row(j, p, e, spec.seeds[0]) for j, p, e in zip(merges, merged, evaluated[:len(merged)], strict=True)]
    rows += [adapt_row(ctx, j, p, e) for j, p, e in zip(adapts, adapted, evaluated[len(merged):], strict=True)]
    done = submit("results", [(rows, references)])[0] if rows else None
    selected = selected_merges(ctx, done, merges, merged) if done is not None and merges else []
    analyses = submit("analysis", [(name, selected) for name in spec.analyses])
    studies = submit("adaptation_study", [(name,) for name in spec.adaptation_studies])
    return staged + references + merged + adapted + evaluated + ([done] if done else []) + analyses + studies, done


def analysis_graph(ctx: Context, submit: Submit, names: Sequence[str],
                   selected: Sequence[tuple[MergeJob, NodeResult]]) -> list[NodeResult]:
    """The stage node and the named analyses, on their own (``mergelab analyze``); analyses of
    merged models take ``selected`` (:func:`selected_for_analyses`)."""
    from mergelab.analysis.registry import ANALYSES

    batch = [(name, list(selected) if ANALYSES[name].needs == "merged" else []) for name in names]
    return submit("stage", [()]) + submit("analysis", batch)


def analyses_up_to_date(spec: StudySpec, store_url: str, names: Sequence[str]) -> list[NodeResult] | None:
    """:func:`analysis_graph`'s nodes when every one is already in the store, else ``None``
    (probed here, nothing computed: a cached ``mergelab analyze`` needs no orchestrator)."""
    from mergelab.analysis.registry import ANALYSES

    selected = selected_for_analyses(spec, store_url) if any(ANALYSES[n].needs == "merged" for n in names) else []
    ctx = Context(spec, store_url, probe=True)
    try:
        return analysis_graph(ctx, local_submit(ctx), names, selected)
    except NotCached:
        return None


def selected_for_analyses(spec: StudySpec, store_url: str) -> list[tuple[MergeJob, NodeResult]]:
    """The study's selected static merges, for analyses of merged models run on their own.

    Needs every merge, evaluation and the results of the study in the store (``mergelab run``);
    otherwise an :class:`InputError` says so.
    """
    core = spec.model_copy(update={"analyses": [], "adaptation_studies": {}})
    found = up_to_date(core, store_url) if spec.methods else None
    if found is None or found[1] is None:
        raise InputError(f"study {spec.name}: analyses of merged models need the study's selected merges; "
                         "run `mergelab run` on the study first")
    produced, done = found
    return selected_merges(Context(core, store_url), done, merge_jobs(spec), [n for n in produced if n.node == "merge"])


def local_submit(ctx: Context, on_node: Callable[[NodeResult], None] | None = None,
                 adapt_progress: Callable[[int, float], None] | None = None) -> Submit:
    """A :data:`Submit` that runs every node here, one after another (no orchestrator).

    ``on_node`` hears of each result; ``adapt_progress(iteration, loss)`` of every adaptation step.
    """
    def submit(kind: str, batch: Sequence[tuple[Any, ...]]) -> list[NodeResult]:
        options = {"progress": adapt_progress} if kind == "adapt" and adapt_progress is not None else {}
        results = []
        for args in batch:
            results.append(NODES[kind](ctx, *args, **options))
            if on_node is not None:
                on_node(results[-1])
        return results

    return submit


def up_to_date(spec: StudySpec, store_url: str) -> tuple[list[NodeResult], NodeResult | None] | None:
    """The study's nodes and results node when every artifact is already in the store, else ``None``.

    Walks :func:`run_graph` in this process with a probing context: nothing is computed or
    loaded, so an unchanged study is confirmed without starting an orchestrator.
    """
    ctx = Context(spec, store_url, probe=True)
    try:
        return run_graph(ctx, local_submit(ctx))
    except NotCached:
        return None
