"""One-method studies on a benchmark: the hyper-parameter selection behind ``mergelab merge --select``
and the adaptive run behind ``mergelab adapt``, each a study run through the graph of every study
(:func:`mergelab.study.run_graph`, its cached nodes, in this process) on a benchmark whose tasks
the adapters are named after (:func:`bench_for`).

**Selection** (:func:`select_hyper_parameters`): the study sweeps the method's grid (its registry
grid, less the hyper-parameters the user fixed) on the given adapters: every candidate's merge and
evaluation land in the store under their content keys, the same keys a study of these adapters on
this bench uses (what either computed, the other reuses; joint metrics included, as in a study),
and the candidates with the choice are published as the study ``select-<method>-<space>-<taskset>``'s
results Dataset (``studies/<name>/results``, schema in docs/store.md §9).

Rules (as in studies): ``val`` takes the best mean validation normalised accuracy (001 App. C.3,
003 App. D.2 select on validation data), ``tas`` the lowest mean task alignment score on unlabeled
validation images (004 Eq. 2). The test split is evaluated for the record but never selects.

**Adaptation** (:func:`adapt_on_bench`): one adaptive run of :data:`mergelab.adaptation.ADAPTERS` on
the benchmark's unlabeled val batches, then its evaluation; published as the study
``adapt-<method>-<taskset>`` (history under ``adapt/<method>``).

The one-off jobs with the user's adapters that run them (load, merge or adapt, write) are
:mod:`mergelab.onbench`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from mergelab.bench import Bench, BenchSpec, MicroSpec
from mergelab.cards import SCORE_METRICS
from mergelab.checkpoints import peft_template
from mergelab.adaptive_spec import AdaptiveSpec
from mergelab.config import MAX_CONFIGS, MethodSpec, StudySpec, checked_spec, config_label, load_study
from mergelab.errors import InputError
from mergelab.merging import METHODS
from mergelab.selection import SELECTION_RULES
from mergelab.study.graph import local_submit, run_graph
from mergelab.study.results import grid_edges, hyper_parameters
from mergelab.study.run import AdaptJob, NodeResult, Run, adapt_jobs, merge_jobs
from mergelab.taskset import MergedUpdate, TaskSet

__all__ = ["Adapted", "Selection", "adapt_on_bench", "bench_for", "evaluation_bench", "module_map", "select_hyper_parameters",
           "swept_grid"]


@dataclass(frozen=True)
class Selection:
    """The chosen configuration, the criterion of every candidate and the results artifact."""

    config: dict[str, Any]
    rule: str
    criterion: xr.DataArray
    results: str
    name: str
    scores: dict[str, dict[str, float]]  # the chosen configuration's: task -> metric -> value
    intervals: dict[str, tuple[float, float]]  # versus -> 95 % interval of its gain in mean normalised test accuracy
    candidates: xr.DataArray  # every configuration's mean over tasks: (config, metric)
    edges: list[str]  # the chosen configuration's hyper-parameters at an end of their grid (the optimum may lie beyond)

    @property
    def label(self) -> str:
        return config_label(self.config)


def module_map(ours: Sequence[str], theirs: Sequence[str]) -> dict[str, str]:
    """Each of ``ours`` (the bench backbone's parameter names) -> its name among ``theirs`` (the
    user's checkpoint, whose names may carry a prefix such as ``visual.``); missing ones left out."""
    out = {}
    for name in ours:
        match = [k for k in theirs if k == name or k.endswith(f".{name}")]
        if len(match) == 1:
            out[name] = match[0]
    return out


def bench_for(bench: Bench, taskset: TaskSet, base: Mapping[str, Tensor]) -> Bench:
    """``bench`` evaluating ``taskset``'s adapters: its tasks by name, in ``taskset``'s order.

    The adapters are re-read against the bench's backbone (whose parameter names may lack the
    prefix of the full checkpoint ``base``); every merged parameter of ``base`` must equal the
    backbone's, so the bench evaluates the model the user merges.
    """
    unknown = [n for n in taskset.names if n not in bench.tasks]
    if unknown:
        raise InputError(f"task {unknown[0]!r} is not a task of the {bench.name} benchmark (tasks: {', '.join(bench.tasks)}); "
                         "name each adapter NAME=PATH after a benchmark task")
    chosen = replace(bench, tasks={n: bench.tasks[n] for n in taskset.names},
                     sources=[(t.name, Path(t.source)) for t in taskset])
    own = bench.backbone.base_state()
    try:
        modules = chosen.taskset.module_names
    except InputError as err:
        raise InputError(f"the adapters do not fit the {bench.name} benchmark's model ({err}); "
                         "--bench a study of the model they were trained on") from None
    names = module_map(modules, taskset.module_names)
    for module in modules:
        if module not in names or not torch.equal(base[names[module]].to(own[module].dtype), own[module]):
            raise InputError(f"--base differs from the {bench.name} benchmark's pre-trained model at {module}; "
                             "pass the benchmark's base weights (or --bench a study of your model)")
    return chosen


def swept_grid(method: str, fixed: Mapping[str, Any], grid: Mapping[str, Sequence[Any]] | None = None) -> dict[str, list[Any]]:
    """The values swept per hyper-parameter: the registry grid, ``grid`` replacing some, ``fixed`` left out
    (a key both fixed and given a grid is refused, as a study refuses it)."""
    both = sorted(set(fixed) & set(grid or {}))
    if both:
        raise InputError(f"--set {both[0]}={fixed[both[0]]} fixes {both[0]!r} and --grid sweeps it; keep it in one of them")
    swept = {k: list(v) for k, v in {**METHODS[method].grid, **(grid or {})}.items() if k not in fixed and k != "seed"}
    count = math.prod(len(v) for v in swept.values())
    if count > MAX_CONFIGS:
        sizes = " x ".join(f"{len(v)} {k}" for k, v in swept.items())
        raise InputError(f"{method}: its grid has {count} configurations ({sizes}; at most {MAX_CONFIGS}); "
                         "narrow it with --grid KEY=V1,V2 or fix values with --set KEY=VALUE")
    return swept


def select_hyper_parameters(bench: Bench, bench_spec: BenchSpec, method: str, space: str, rule: str,
                            fixed: Mapping[str, Any], store_url: str, grid: Mapping[str, Sequence[Any]] | None = None,
                            progress: Callable[[NodeResult, int], None] | None = None) -> Selection:
    """Evaluate every configuration of ``method``'s grid in ``space`` on ``bench``; pick by ``rule``.

    The grid is the registry's (``METHODS[method].grid``) with ``grid`` replacing some of its
    values and the ``fixed`` hyper-parameters left out (``seed`` fixes a stochastic method's
    seed, default 0). ``bench_spec`` is the section ``bench`` was built from (it labels the
    results). ``progress(node, total)`` hears of every node as it finishes.

    It takes 9 parameters because it runs ``merge --select``: the bench and the section it came from, the method, space
    and rule, the fixed hyper-parameters, the store, the ``--grid`` overrides and a progress callback.
    """
    SELECTION_RULES.require(rule)
    fixed = dict(fixed)
    seeds = [int(fixed.pop("seed", 0))]
    swept = swept_grid(method, fixed, grid)
    name = f"select-{method}-{space}-{bench.taskset.content_hash[:8]}"
    entry = checked_spec(MethodSpec, "methods[0]", method=method, spaces=[space], grid=swept, fixed=fixed)
    spec = checked_spec(StudySpec, name, name=name, bench=bench_spec, selection=rule, seeds=seeds, methods=[entry])
    ctx = Run(spec, store_url, bench=bench)
    jobs = merge_jobs(spec)
    total = 1 + (1 + len(bench.tasks)) + 2 * len(jobs) + 1
    _, done = run_graph(ctx, local_submit(ctx, on_node=None if progress is None else lambda r: progress(r, total)))
    return _chosen(ctx, done.key, jobs, rule, seeds[0], name)


def _chosen(ctx: Run, key: str, jobs: Sequence[Any], rule: str, seed: int, name: str) -> Selection:
    ds = ctx.store.get_dataset(key)
    metric = SELECTION_RULES[rule].metric
    at = {"merge_method": jobs[0].method, "space": jobs[0].space, "seed": seed}
    selected = ds["selected"].sel(at)
    if not bool(selected.any()):
        raise InputError(f"no configuration of {jobs[0].method} had a finite {metric}; check the benchmark's val split")
    label = str(selected.config.values[int(np.argmax(selected.values))])
    config = hyper_parameters(ds, label)
    criterion = ds["score"].sel(at).sel(task=list(ds.attrs["tasks"]), metric=metric).mean("task")
    chosen = ds["score"].sel(at).sel(config=label)
    scores = {task: {m: float(chosen.sel(task=task, metric=m)) for m in SCORE_METRICS
                     if m in ds.metric.values and np.isfinite(chosen.sel(task=task, metric=m))} for task in ds.attrs["tasks"]}
    gains = ds["gain_ci"].sel(at) if "gain_ci" in ds else None
    intervals = {} if gains is None else {str(v): (float(gains.sel(versus=v, bound="low")), float(gains.sel(versus=v, bound="high")))
                                          for v in gains.versus.values if np.isfinite(gains.sel(versus=v)).all()}
    candidates = ds["score"].sel(at).sel(task=list(ds.attrs["tasks"])).mean("task")
    edges = grid_edges(ds).get((jobs[0].method, jobs[0].space, label), [])
    return Selection(config={**config, **({"seed": seed} if jobs[0].seed is not None else {})}, rule=rule,
                     criterion=criterion, results=key, name=name, scores=scores, intervals=intervals,
                     candidates=candidates, edges=edges)


@dataclass(frozen=True)
class Adapted:
    """An adaptive run on a benchmark: the merged update (in the user's parameter names), its
    scores ``score(task, metric)`` with normalised accuracies, the study it was published as, and
    where it started: ``start`` the starting merge's scores (same layout; ``None`` for a run cached
    before its start was recorded) and ``start_config`` the hyper-parameters that set it."""

    merged: MergedUpdate
    scores: xr.DataArray
    seconds_per_iter: float
    name: str
    computed: bool
    bench: str
    start: xr.DataArray | None = None
    start_config: dict[str, Any] = field(default_factory=dict)


def adapt_on_bench(bench: Bench, bench_spec: BenchSpec, taskset: TaskSet, adaptive: AdaptiveSpec, store_url: str, *,
                   seed: int = 0, allow_labels: bool = False, progress: Callable[[int, float], None] | None = None,
                   start_progress: Callable[[int, int], None] | None = None,
                   on_node: Callable[[NodeResult], None] | None = None) -> Adapted:
    """Adapt ``adaptive`` (a study's ``adaptive:`` entry: method, iters, lr, preference, …) on
    ``bench``'s unlabeled val batches, evaluate it and normalise by the fine-tuned references.

    ``taskset`` is the user's (its names and PEFT layout label the result); ``bench`` must come
    from :func:`bench_for` on it. ``progress(iteration, loss)`` hears of every step,
    ``start_progress(scored, total)`` of every starting point scored before step 1 (AdaRank-CART's λ
    search) and ``on_node`` of every node done (references, the run, its evaluation).

    It takes 10 parameters because it runs ``mergelab adapt``: the bench and the section it came from, the user's task
    set, the ``adaptive:`` entry and the store, then the command's seed and label permission and its three progress
    callbacks.
    """
    name = f"adapt-{adaptive.method}-{bench.taskset.content_hash[:8]}"
    spec = checked_spec(StudySpec, name, name=name, bench=bench_spec, adaptive=[adaptive], seeds=[seed], allow_labels=allow_labels)
    ctx = Run(spec, store_url, bench=bench)
    nodes, done = run_graph(ctx, local_submit(ctx, on_node=on_node, adapt_progress=progress, start_progress=start_progress))
    (job,), (produced,) = adapt_jobs(spec), [n for n in nodes if n.node == "adapt"]
    ds = ctx.store.get_dataset(done.key)
    scores = ds["score"].isel(merge_method=0, space=0, config=0, seed=0).sel(task=list(bench.tasks))
    info = ctx.store.info(produced.key).attrs
    names = module_map(ctx.taskset.module_names, taskset.module_names)
    own = MergedUpdate.from_tensors(ctx.store.get_tensors(produced.key))
    meta = {"method": job.spec.method, "space": info["space"], "hyper_parameters": {**job.spec.hp, "config": info["config"]},
            "tasks": list(taskset.names), "adaptive": True, "peft": peft_template(taskset), "seed": seed}
    merged = MergedUpdate({names[m]: u for m, u in own.modules.items()}, base=taskset.base, meta=meta)
    start, start_config = _start_point(ctx, job, info, ds["reference_score"].sel(reference="finetuned", task=list(bench.tasks)))
    return Adapted(merged, scores, float(info.get("seconds_per_iter", float("nan"))), name, not produced.hit, bench.name,
                   start, start_config)


def _start_point(ctx: Run, job: AdaptJob, info: Mapping[str, Any],
                 finetuned: xr.DataArray) -> tuple[xr.DataArray | None, dict[str, Any]]:
    """The run's starting merge scored (:func:`mergelab.study.nodes.start_scores`) and normalised by
    the ``finetuned`` references as the results are (``norm_acc`` = acc / fine-tuned acc, val
    likewise), and the hyper-parameters that set the start (the builder's starting coefficient, or
    what the start search chose)."""
    from mergelab.adaptation import ADAPTERS
    from mergelab.study.nodes import start_scores

    a, adapter = job.spec, ADAPTERS[job.spec.method]
    if "start" not in info and adapter.start_grid(a.hp):  # cached before the chosen start was recorded
        return None, {}
    started = dict(info.get("start", {}))
    name = adapter.start(a.hp)
    config = started or ({name: a.hp.get(name, adapter.settings.get(name))} if name else {})
    config = {k: v for k, v in config.items() if v is not None}  # None: the builder's own default (AdaMerging's 0.3)
    raw = start_scores(ctx, job, started)
    norm = xr.concat([raw.sel(metric="acc") / finetuned.sel(metric="acc"), raw.sel(metric="val_acc") / finetuned.sel(metric="val_acc")],
                     dim=xr.DataArray(["norm_acc", "val_norm_acc"], dims="metric"))
    return xr.concat([raw.sel(metric=["acc", "val_acc"]), norm], dim="metric"), config


def evaluation_bench(bench: str, taskset: TaskSet, base: str) -> tuple[BenchSpec, Bench]:
    """``--bench``: ``micro`` (the shipped benchmark) or a study YAML whose bench and tasks evaluate;
    returns its section and the bench set up to run ``taskset``'s adapters (:func:`bench_for`)."""
    from mergelab.bench import load_bench
    from mergelab.checkpoints import load_state_dict
    from mergelab.micro.benchmark import micro_root

    if bench == "micro":
        spec, tasks = MicroSpec(root=micro_root()), None
    else:
        if not Path(bench).is_file():
            raise InputError(f"--bench {bench!r} is neither 'micro' nor a study YAML file; pass micro or a study whose bench: and tasks: "
                             "evaluate")
        study = load_study(Path(bench))
        spec, tasks = study.bench, study.tasks
    return spec, bench_for(load_bench(spec, tasks), taskset, load_state_dict(base))
