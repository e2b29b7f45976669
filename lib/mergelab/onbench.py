"""One-off jobs with the user's adapters, outside a study: merging, hyper-parameter selection, adaptation.

:func:`merge_adapters` is what ``mergelab merge`` runs (load, optionally select on a benchmark,
merge, cap the rank, write, record the configuration in the store); :func:`adapt_adapters` what
``mergelab adapt`` runs.

Both run a one-method study through the graph of every study (:func:`mergelab.study.run_graph`,
its cached nodes, in this process) on a benchmark whose tasks the adapters are named after
(:func:`bench_for`).

**Selection** (``mergelab merge --select val|tas``, :func:`select_hyper_parameters`): the study
sweeps the method's grid (its registry grid, less the hyper-parameters the user fixed) on the
given adapters: every candidate's merge and evaluation land in the store under their content
keys, the same keys a study of these adapters on this bench uses (what either computed, the other
reuses; joint metrics included, as in a study), and the candidates with the choice are
published as the study ``select-<method>-<space>-<taskset>``'s results Dataset
(``studies/<name>/results``, schema in docs/store.md §9).

Rules (as in studies): ``val`` takes the best mean validation normalised accuracy (001 App. C.3,
003 App. D.2 select on validation data), ``tas`` the lowest mean task alignment score on unlabeled
validation images (004 Eq. 2). The test split is evaluated for the record but never selects.

**Adaptation** (``mergelab adapt``, :func:`adapt_on_bench`): one adaptive run of
:data:`mergelab.adaptation.ADAPTERS` on the benchmark's unlabeled val batches, then its evaluation;
published as the study ``adapt-<method>-<taskset>`` (history under ``adapt/<method>``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_type_hints

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from mergelab.bench import Bench
from mergelab.cards import SCORE_METRICS, inputs_of
from mergelab.checkpoints import peft_template
from mergelab.checkpoints.writing import DEFAULT_SHARD_SIZE
from mergelab.bench import BenchSpec, MicroSpec
from mergelab.config import MAX_CONFIGS, config_label, load_study
from mergelab.errors import InputError
from mergelab.merging import METHODS, merge
from mergelab.merging.registry import check_feasible
from mergelab.selection import SELECTION_RULES
from mergelab.study import AdaptJob, Run, NodeResult, adapt_jobs, local_submit, merge_jobs, run_graph
from mergelab.study.results import grid_edges, hyper_parameters
from mergelab.taskset import MergedUpdate, TaskSet

if TYPE_CHECKING:
    from mergelab.merging.registry import Composition, MergeMethod
    from mergelab.spaces import Space
    from mergelab.store import Store

__all__ = ["Adapted", "Merged", "Selection", "adapt_adapters", "adapt_on_bench", "bench_for", "evaluation_bench",
           "gives_dense", "merge_adapters", "module_map", "select_hyper_parameters", "swept_grid"]



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
    """
    SELECTION_RULES.require(rule)
    fixed = dict(fixed)
    seeds = [int(fixed.pop("seed", 0))]
    swept = swept_grid(method, fixed, grid)
    name = f"select-{method}-{space}-{bench.taskset.content_hash[:8]}"
    spec = load_study({"name": name, "bench": bench_spec.model_dump(), "selection": rule, "seeds": seeds,
                       "methods": [{"method": method, "spaces": [space], "grid": swept, "fixed": fixed}]})
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


def adapt_on_bench(bench: Bench, bench_spec: BenchSpec, taskset: TaskSet, adaptive: Mapping[str, Any], store_url: str, *,
                   seed: int = 0, allow_labels: bool = False, progress: Callable[[int, float], None] | None = None,
                   start_progress: Callable[[int, int], None] | None = None,
                   on_node: Callable[[NodeResult], None] | None = None) -> Adapted:
    """Adapt ``adaptive`` (an ``adaptive:`` entry of a study: method, iters, lr, preference, …) on
    ``bench``'s unlabeled val batches, evaluate it and normalise by the fine-tuned references.

    ``taskset`` is the user's (its names and PEFT layout label the result); ``bench`` must come
    from :func:`bench_for` on it. ``progress(iteration, loss)`` hears of every step,
    ``start_progress(scored, total)`` of every starting point scored before step 1 (AdaRank-CART's λ
    search) and ``on_node`` of every node done (references, the run, its evaluation).
    """
    name = f"adapt-{adaptive['method']}-{bench.taskset.content_hash[:8]}"
    spec = load_study({"name": name, "bench": bench_spec.model_dump(), "adaptive": [dict(adaptive)],
                       "seeds": [seed], "allow_labels": allow_labels})
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
            raise InputError(f"--bench {bench!r} is neither 'micro' nor a study YAML file; pass micro or a study whose bench: and tasks: evaluate")
        study = load_study(Path(bench))
        spec, tasks = study.bench, study.tasks
    return spec, bench_for(load_bench(spec, tasks), taskset, load_state_dict(base))


@dataclass(frozen=True)
class Merged:
    """What :func:`merge_adapters` wrote: the output, the stored configuration, the selection."""

    written: Path
    key: str
    store: str
    record: dict[str, Any]
    selection: Selection | None
    capped: dict[str, float]


def gives_dense(spec: MergeMethod | Composition, space: Space) -> bool:
    """Whether ``spec`` in ``space`` merges every matrix module into a dense update, known before it runs:
    the full space has no maps that carry a merged matrix back to factors, so a last stage that returns
    a matrix (annotated ``-> Tensor``) gives dense modules, which no LoRA adapter holds; stages that return
    factors (``-> LowRank``: svd, linear, lora_lego) stay low rank. The other spaces reconstruct factors,
    except where a stage completes the spectrum in the full space (KnOTS' ``spectral="update"``), which
    only the merge shows (:func:`~mergelab.checkpoints.save_merged` refuses it then)."""
    from mergelab.spaces.full import FullSpace

    _, last = spec.stages[-1]
    return isinstance(space, FullSpace) and get_type_hints(last.fn).get("return") is Tensor


def merge_adapters(sources: Sequence[str], base: str, method: str, space: str = "full", *, out: Path,
                   fixed: Mapping[str, str] | None = None, space_options: Mapping[str, str] | None = None, fmt: str = "peft",
                   max_rank: int | str | None = None, grams: Path | None = None, modules: Sequence[str] | None = None,
                   force: bool = False, select: str | None = None, grid: Mapping[str, Sequence[Any]] | None = None,
                   bench: str = "micro", store: str | None = None, base_module: str | None = None,
                   shard_size: int | str = DEFAULT_SHARD_SIZE, command: str | None = None,
                   on_selection: Callable[[str, str, Bench, Callable[..., Selection]], Selection] | None = None) -> Merged:
    """Merge ``sources`` with ``method`` in ``space``; write a PEFT adapter or merged weights to ``out``.

    The configuration (method, space, hyper-parameters with defaults filled in, task hashes) and
    the result's provenance go to the store as a ``merge.config`` JSON artifact. With ``select``
    (a rule of :data:`~mergelab.selection.SELECTION_RULES`) every configuration of the method's grid (``grid`` replacing some
    values, ``fixed`` left out) is merged and evaluated on ``bench``'s val split first
    (:func:`select_hyper_parameters`); ``on_selection(method, space, bench, run)`` may wrap that
    run (the CLI shows progress: ``run(progress=…)``). ``max_rank`` is ``--max-rank`` (an integer, or a
    serving engine's set: :func:`~mergelab.serving.parse_max_rank`); ``shard_size`` bounds a weights file
    (:func:`~mergelab.checkpoints.writing.parse_size`); ``command`` (the CLI's invocation) goes to the record
    and the card. Every argument is checked before anything loads.
    """
    import os
    import time

    from mergelab.checkpoints import cap_rank, load_grams, load_taskset, save_merged, task_heads
    from mergelab.checkpoints.writing import merged_rank, parse_size
    from mergelab.provenance import merge_reproducibility
    from mergelab.serving import parse_max_rank
    from mergelab.spaces import get_space
    from mergelab.store import Store

    if not sources:
        raise InputError("no adapters given; pass --adapters DIR [DIR ...]")
    if max_rank is not None and fmt != "peft":
        raise InputError(f"--max-rank {max_rank} caps a PEFT adapter's rank; use it with --format peft")
    cap = parse_max_rank(max_rank, warn=False) if max_rank is not None else None  # warns once the cap is known to bind
    size = parse_size(shard_size)
    s = Store(store)
    check_output(fmt, out, force, store=s, sources=sources, base=base, shard_size=size, grams=grams,
                 bench=None if bench == "micro" else bench)
    spec, fixed = METHODS[method], dict(fixed or {})
    hyper_parameters = spec.resolve(fixed)
    sp = get_space(space, **dict(space_options or {}))
    if grid and select is None:
        raise InputError("--grid lists values to select from; add --select val or --select tas")
    if bench != "micro" and select is None:
        raise InputError(f"--bench {bench} names the benchmark --select evaluates on; add --select val or --select tas, or drop --bench")
    if select is not None:
        SELECTION_RULES.require(select)
    if select is not None and (grams or modules or space_options):
        raise InputError("--select evaluates whole models merged with default space options; drop --grams, --modules and --space-option")
    if select is not None:
        swept_grid(spec.name, fixed, grid)  # a too-large grid fails before the benchmark loads
    taskset = load_taskset(base, sources, modules=modules, base_module=base_module)
    if select is None:  # a selection's study checks every candidate once the adapters are staged
        check_feasible(spec, taskset, hyper_parameters)
    if cap is not None and cap.engine is None:
        bound = max((min(u.shape) for t in taskset.tasks for u in t.modules.values() if len(u.shape) == 2), default=0)
        if cap.rank > bound:  # type: ignore[operator]
            raise InputError(f"--max-rank {cap.rank} is above every module's min(out, in) (at most {bound}), so it caps nothing; "
                             f"give a rank below {bound} or a serving engine (--max-rank vllm), or drop --max-rank")
        cap.warn_unservable()
    side_inputs = {"grams": load_grams(grams, taskset)} if grams is not None else None
    if select is not None:
        bench_spec, evaluating = evaluation_bench(bench, taskset, base)
    if fmt == "peft" and cap is None and gives_dense(spec, sp):
        raise InputError(f"{spec.name} in the {sp.name} space gives a dense update of every module, not a LoRA adapter; save with "
                         "format='weights' (CLI: --format weights), cap its rank (--max-rank: a truncated SVD per module) or "
                         "merge in a low-rank space (knots, core)")
    selection = None
    if select is not None:

        def run(progress: Callable[[NodeResult, int], None] | None = None) -> Selection:
            return select_hyper_parameters(evaluating, bench_spec, spec.name, sp.name, select, fixed, s.url, grid=grid,
                                           progress=progress)

        selection = on_selection(spec.name, sp.name, evaluating, run) if on_selection is not None else run()
        hyper_parameters = spec.resolve({**fixed, **selection.config})
    start = time.perf_counter()
    merged = merge(taskset, spec.name, sp, side_inputs=side_inputs, **hyper_parameters)
    merge_time = time.perf_counter() - start
    capped: dict[str, float] = {}
    if cap is not None:
        merged, capped = cap_rank(merged, cap.resolve(merged_rank(merged)))
    config = {"method": spec.name, "space": sp.name, "space_options": sp.options(), "hyper_parameters": merged.meta["hyper_parameters"],
              **({"max_rank": merged.meta["max_rank"]} if cap is not None else {})}
    key = s.key("merge.config", "1", taskset=taskset, **config, **({"selection": select} if select else {}))
    record = {**config, "tasks": inputs_of(taskset), "base": taskset.base.__dict__, "result_content_hash": merged.content_hash,
              "output": str(Path(out).resolve()), "format": fmt, "ranks": {m: getattr(u, "rank", None) for m, u in merged.modules.items()},
              "merge_time_s": round(merge_time, 4), "reproducibility": merge_reproducibility(merged),
              **({"max_rank_rule": cap.describe()} if cap is not None else {}),
              **({"serving": {"engine": cap.engine, "max_lora_rank": merged.meta["max_rank"]}} if cap is not None and cap.engine else {}),
              **({"command": command, "cwd": os.getcwd()} if command is not None else {})}
    if selection is not None:
        record["selection"] = {"rule": selection.rule, "chosen": selection.label, "results": str(selection.results),
                               "ref": f"studies/{selection.name}/results",
                               "criterion": dict(zip(map(str, selection.criterion.config.values), map(float, selection.criterion.values)))}
        record["scores"], record["intervals"] = selection.scores, selection.intervals
    written = save_merged(merged, out, format=fmt, base=base, overwrite=force, heads=task_heads(taskset), record=record,  # type: ignore[arg-type]
                          shard_size=size)
    if not s.exists(key):
        s.put_json(key, record)
    return Merged(written, str(key), s.url, record, selection, capped)


def adapt_adapters(sources: Sequence[str], base: str, adaptive: Mapping[str, Any], *, out: Path, fmt: str = "peft",
                   force: bool = False, seed: int = 0, allow_labels: bool = False, bench: str = "micro",
                   store: str | None = None, base_module: str | None = None, shard_size: int | str = DEFAULT_SHARD_SIZE,
                   command: str | None = None,
                   progress: Callable[[int, float], None] | None = None,
                   start_progress: Callable[[int, int], None] | None = None,
                   on_node: Callable[[NodeResult], None] | None = None) -> tuple[Adapted, Path, str]:
    """Adapt ``adaptive`` (an ``adaptive:`` entry of a study) for ``sources`` on ``bench``'s unlabeled
    val images (:func:`adapt_on_bench`, which the three callbacks go to) and write the merge to
    ``out`` with its scores and ``command`` in the record and card (``shard_size`` as :func:`merge_adapters`);
    returns the run, the written path and the store URL. Options are validated before anything loads."""
    import os

    from mergelab.adaptation.objectives import validate_preference
    from mergelab.checkpoints import load_taskset, save_merged, task_heads
    from mergelab.checkpoints.writing import parse_size
    from mergelab.store import Store

    if not sources:
        raise InputError("no adapters given; pass --adapters DIR [DIR ...]")
    size = parse_size(shard_size)
    check_output(fmt, out, force, store=Store(store), sources=sources, base=base, shard_size=size,
                 bench=None if bench == "micro" else bench)
    load_study({"name": "adapt", "adaptive": [dict(adaptive)], "allow_labels": allow_labels})  # bad options fail here
    validate_preference(adaptive.get("preference"), len(sources))
    taskset = load_taskset(base, sources, base_module=base_module)
    bench_spec, evaluating = evaluation_bench(bench, taskset, base)
    url = Store(store).url
    result = adapt_on_bench(evaluating, bench_spec, taskset, adaptive, url, seed=seed, allow_labels=allow_labels, progress=progress,
                            start_progress=start_progress, on_node=on_node)
    scores = {str(task): {m: float(result.scores.sel(task=task, metric=m)) for m in SCORE_METRICS if m in result.scores.metric.values}
              for task in result.scores.task.values}
    record = {"tasks": inputs_of(taskset), "adaptive": dict(adaptive), "scores": scores, "study": result.name,
              **({"command": command, "cwd": os.getcwd()} if command is not None else {})}
    written = save_merged(result.merged, out, format=fmt, base=base, overwrite=force, heads=task_heads(taskset), record=record,
                          shard_size=size)
    return result, written, url


def check_output(fmt: str, out: Path, force: bool, *, store: Store, sources: Sequence[str], base: str,
                 shard_size: int = DEFAULT_SHARD_SIZE, **inputs: str | Path | None) -> None:
    """``--format``, ``--shard-size`` (a bound of ``--format weights`` only: another one with ``peft`` is
    refused, as it would change nothing) and ``--out`` checked before any work (``save_merged`` checks again when writing):
    an existing ``--out`` needs ``--force`` and must be replaceable (:func:`~mergelab.outputs.check_replaceable`:
    a previous output, not the working directory, apart from ``store``, the ``sources``, the ``base``
    and the other named ``inputs`` such as ``grams=``)."""
    from mergelab.checkpoints.files import named_sources
    from mergelab.errors import check_writable
    from mergelab.outputs import check_apart, check_replaceable

    if fmt not in ("peft", "weights"):
        raise InputError(f"--format {fmt!r} is not one of peft, weights")
    if fmt != "weights" and shard_size != DEFAULT_SHARD_SIZE:
        raise InputError(f"--shard-size ({shard_size} bytes) bounds a weights file; use it with --format weights (a PEFT adapter is one file)")
    guarded = {f"adapter {name!r}": path for name, path in named_sources(sources, None)}
    guarded |= {"base model": base, **{f"--{k}": v for k, v in inputs.items() if v is not None}}
    if out.exists() or out.is_symlink():
        if not force:
            raise InputError(f"output {out} already exists; choose another path or pass --force")
        check_replaceable(out, store=store.local_root, inputs=guarded)
    else:
        check_apart(out, store=store.local_root, inputs=guarded)
    check_writable(out, "--out")