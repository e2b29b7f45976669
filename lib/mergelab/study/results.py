"""The results node (every evaluation in one Dataset, the selection rule applied) and the table read from it."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from mergelab.config import config_label
from mergelab.errors import InputError
from mergelab.evaluation.bootstrap import LEVEL, RESAMPLES, paired_interval, resample_counts
from mergelab.merging import METHODS
from mergelab.store_format import Key
from mergelab.selection import select
from mergelab.study.run import JOINT, AdaptJob, Run, MergeJob, Node, NodeResult

# Results -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One merged model of the study: where it sits in the results and its nodes' keys."""

    method: str
    space: str
    config: str  # the configuration's label (display, and the ``config`` coordinate's value)
    seed: int
    produced: str
    evaluated: str
    hyper_parameters: dict[str, Any]  # the configuration itself


def merge_row(job: MergeJob, produced: NodeResult, evaluated: NodeResult, seed: int) -> Row:
    return Row(job.method, job.space, config_label(job.config), job.seed if job.seed is not None else seed,
               produced.key, evaluated.key, dict(job.config))


def adapt_row(ctx: Run, job: AdaptJob, produced: NodeResult, evaluated: NodeResult) -> Row:
    from mergelab.study.nodes import adapt_hyper_parameters

    attrs = ctx.store.info(produced.key).attrs
    hyper_parameters = adapt_hyper_parameters(job.spec, attrs.get("start", {}))
    return Row(job.spec.name, attrs["space"], config_label(hyper_parameters), job.seed, produced.key, evaluated.key,
               hyper_parameters)


def hyper_parameters(ds: xr.Dataset, config: str) -> dict[str, Any]:
    """The hyper-parameters of configuration ``config`` of a results Dataset (its ``hyper_parameters``
    coordinate: one JSON object per configuration; the ``config`` label is for display only)."""
    if "hyper_parameters" not in ds.coords:
        raise InputError(f"the results of study {ds.attrs.get('study', '?')!r} were written before they recorded each "
                         "configuration's hyper-parameters; rerun the study (mergelab run) to refresh them")
    return json.loads(str(ds["hyper_parameters"].sel(config=config).values))


def selected_merges(ctx: Run, results: NodeResult, jobs: Sequence[MergeJob],
                    produced: Sequence[NodeResult]) -> list[tuple[MergeJob, NodeResult]]:
    """The static merges the selection chose (first seed), for analyses of merged models."""
    selected = ctx.store.get_dataset(results.key)["selected"]
    seed = ctx.spec.seeds[0]
    return [(j, p) for j, p in zip(jobs, produced, strict=True)
            if (j.seed is None or j.seed == seed) and bool(selected.sel(merge_method=j.method, space=j.space, config=config_label(j.config), seed=seed))]


def _results_key(ctx: Run, rows: Sequence[Row], references: Sequence[NodeResult]) -> Key:
    return ctx.store.key("results", RESULTS.version, study=ctx.spec.name, rows=[r.__dict__ for r in rows],
                         references=[r.key for r in references], selection=ctx.spec.selection)


def _results(ctx: Run, key: Key, rows: Sequence[Row], references: Sequence[NodeResult]) -> tuple[xr.Dataset, dict[str, Any]]:
    """The study's results Dataset with the selected configurations (named ``studies/<name>/results``)."""
    return _assemble(ctx, rows, references), {}


# results 2: mean_abs_delta_coef; 3: zero-shot joint Hits@k; 4: dimension merge_method (``method`` is a keyword of
# DataArray.sel); 5: the fine-tuned experts' joint Hits@k; 7: gain_ci, paired bootstrap intervals, and the selected
# merges' per-image outcomes they come from; 8: the hyper_parameters coordinate (each configuration as a value).
RESULTS = Node("results", "8", "dataset", _results_key, _results, lambda ctx, rows, references: ctx.spec.name,
               lambda ctx, key, rows, references: {f"studies/{ctx.spec.name}/results": key})


#: The baselines every selected merge's gain is measured against (``gain_ci``'s ``versus``).
VERSUS = ("task_arithmetic", "zeroshot")


def selected_hits(ds: xr.Dataset, hits: Mapping[tuple[str, str, str, int], xr.DataArray], zeroshot: xr.DataArray) -> xr.Dataset:
    """``selected_hit(merge_method, space, seed, example)``: the per-image test outcomes (1 / 0) of each
    selected configuration (a deterministic merge, run under the first seed only, stands for every
    seed), and ``reference_hit(example)``: the zero-shot model's; what paired intervals resample."""
    out = np.full((ds.sizes["merge_method"], ds.sizes["space"], ds.sizes["seed"], zeroshot.sizes["example"]), np.nan)
    index = {d: list(ds[d].values) for d in ("merge_method", "space", "seed")}
    for (method, space, config, seed), hit in hits.items():
        if bool(ds["selected"].sel(merge_method=method, space=space, config=config, seed=seed)):
            at = (index["merge_method"].index(method), index["space"].index(space))
            out[at][index["seed"].index(seed)] = hit.values
    ran = ~np.isnan(out).all(-1)
    for at in zip(*np.nonzero(ran.sum(-1) == 1)):  # once, under the first seed: the same model for every seed
        out[at] = out[at][ran[at]][0]
    coords = {"example_task": ("example", zeroshot["example_task"].values)}
    return xr.Dataset({"selected_hit": (("merge_method", "space", "seed", "example"), out),
                       "reference_hit": ("example", zeroshot.values.astype(float))}, coords=coords)


def _by_task(hit: xr.DataArray, tasks: Sequence[str]) -> dict[str, np.ndarray]:
    labels = hit["example_task"].values
    return {t: hit.values[labels == t] for t in tasks}


def paired_gain_interval(ds: xr.Dataset, a: tuple[str, str], b: tuple[str, str] | None, seed: int | None = None) -> tuple[float, float]:
    """The 95 % paired bootstrap interval of ``(method, space)`` ``a``'s mean normalised test accuracy
    minus ``b``'s (``None``: the zero-shot model), both at their selected configuration and ``seed``
    (default: the first), resampling test images per task (:mod:`mergelab.evaluation.bootstrap`);
    ``(nan, nan)`` where either did not run or a task's fine-tuned accuracy is 0."""
    tasks = list(ds.attrs["tasks"])
    seed = ds.seed.values[0] if seed is None else seed
    finetuned = ds["reference_score"].sel(reference="finetuned", metric="acc")
    normaliser = {t: float(finetuned.sel(task=t)) for t in tasks}
    outcomes = []
    for side in (a, b):
        if side is not None and (side[0] not in ds.merge_method.values or side[1] not in ds.space.values):
            return math.nan, math.nan
        hit = ds["reference_hit"] if side is None else ds["selected_hit"].sel(merge_method=side[0], space=side[1], seed=seed)
        outcomes.append(_by_task(hit, tasks))
    if any(np.isnan(v).any() for o in outcomes for v in o.values()) or not all(v > 0 for v in normaliser.values()):
        return math.nan, math.nan
    return paired_interval(outcomes[0], outcomes[1], normaliser, _resamples(tuple((t, len(v)) for t, v in outcomes[1].items())))


@functools.lru_cache(maxsize=8)
def _resamples(sizes: tuple[tuple[str, int], ...]) -> dict[str, np.ndarray]:
    """:func:`resample_counts` of these task sizes, drawn once per process (the same for every comparison)."""
    return resample_counts(dict(sizes))


def gain_intervals(ds: xr.Dataset) -> xr.DataArray:
    """``gain_ci(merge_method, space, seed, versus, bound)``: :func:`paired_gain_interval` of each selected
    merge against task arithmetic (full space, same seed) and against the zero-shot model; the same
    resamples for every merge (seed 0 of :func:`~mergelab.evaluation.bootstrap.resample_counts`)."""
    out = np.full((ds.sizes["merge_method"], ds.sizes["space"], ds.sizes["seed"], len(VERSUS), 2), np.nan)
    for i, method in enumerate(ds.merge_method.values):
        for j, space in enumerate(ds.space.values):
            for k, seed in enumerate(ds.seed.values):
                for v, baseline in enumerate((("task_arithmetic", "full"), None)):
                    out[i, j, k, v] = paired_gain_interval(ds, (method, space), baseline, seed)
    return xr.DataArray(out, dims=("merge_method", "space", "seed", "versus", "bound"),
                        coords={"versus": np.array(VERSUS, dtype=object), "bound": np.array(["low", "high"], dtype=object)},
                        attrs={"long_name": f"{LEVEL:.0%} paired bootstrap interval of the gain in mean normalised test accuracy",
                               "resamples": RESAMPLES, "units": "1"})


def _unique(values: Sequence[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def _assemble(ctx: Run, rows: Sequence[Row], references: Sequence[NodeResult]) -> xr.Dataset:
    store = ctx.store
    names = ctx.eval_session.names  # the study's tasks, then its unseen ones
    seen = list(ctx.bench.tasks)
    zeroshot = store.get_dataset(references[0].key)["score"]
    experts = [store.get_dataset(r.key)["score"] for r in references[1:]]
    finetuned = xr.concat([e.sel(task=[t]) for e, t in zip(experts, names, strict=True)], dim="task")
    if JOINT in experts[0].task.values:  # the experts on the joint task: micro average over every test image
        sizes = xr.DataArray([len(ctx.eval_session.tensors(t, "test")[1]) for t in names], dims="expert")
        joint = (xr.concat([e.sel(task=JOINT) for e in experts], dim="expert") * sizes).sum("expert", skipna=False) / sizes.sum()
        finetuned = xr.concat([finetuned, joint.expand_dims(task=[JOINT])], dim="task")
    dims = {"merge_method": _unique([r.method for r in rows]), "space": _unique([r.space for r in rows]),
            "config": _unique([r.config for r in rows]), "seed": _unique([r.seed for r in rows])}
    first = store.get_dataset(rows[0].evaluated)["score"]
    tasks, metrics = list(first.task.values), list(first.metric.values)
    score = np.full([len(dims["merge_method"]), len(dims["space"]), len(dims["config"]), len(tasks), len(metrics), len(dims["seed"])],
                    np.nan)
    per_merge = {v: np.full([len(values) for values in dims.values()], np.nan)
                 for v in ("merge_seconds", "peak_memory_mb", "mean_abs_delta_coef")}
    ft = finetuned.sel(task=names)
    hits: dict[tuple[str, str, str, int], xr.DataArray] = {}
    for r in rows:
        at = tuple(values.index(v) for values, v in zip(dims.values(), (r.method, r.space, r.config, r.seed), strict=True))
        evaluated = store.get_dataset(r.evaluated)
        hits[(r.method, r.space, r.config, r.seed)] = evaluated["test_hit"]
        s = evaluated["score"].copy()
        s.loc[names, "norm_acc"] = s.sel(task=names, metric="acc") / ft.sel(metric="acc")
        s.loc[names, "val_norm_acc"] = s.sel(task=names, metric="val_acc") / ft.sel(metric="val_acc")
        score[at[:3] + (slice(None), slice(None), at[3])] = s.sel(task=tasks, metric=metrics).values
        attrs = store.info(r.produced).attrs
        for v in per_merge:
            per_merge[v][at] = attrs.get(v, np.nan)
    coords = {d: np.array(v, dtype=object) if d != "seed" else np.array(v) for d, v in dims.items()}
    coords |= {"task": np.array(tasks, dtype=object), "metric": np.array(metrics, dtype=object)}
    configs = {r.config: json.dumps(r.hyper_parameters, sort_keys=True, default=str) for r in reversed(rows)}
    coords["hyper_parameters"] = ("config", np.array([configs[c] for c in dims["config"]], dtype=object))
    ds = xr.Dataset({"score": (("merge_method", "space", "config", "task", "metric", "seed"), score),
                     **{v: (tuple(dims), a) for v, a in per_merge.items()}}, coords=coords)
    reference = xr.concat([zeroshot.reindex(task=tasks), finetuned.reindex(task=tasks)],
                          dim=xr.DataArray(["zeroshot", "finetuned"], dims="reference"))
    ds["reference_score"] = reference.assign_coords(reference=np.array(["zeroshot", "finetuned"], dtype=object),
                                              task=np.array(tasks, dtype=object), metric=np.array(metrics, dtype=object))
    ds["selected"] = select(ds, ctx.spec.selection, seen)  # never on the unseen tasks
    unseen = {"unseen": names[len(seen):]} if len(names) > len(seen) else {}
    ds.attrs.update({"study": ctx.spec.name, "bench": ctx.bench.name, "taskset": ctx.taskset.content_hash,
                     "selection": ctx.spec.selection, "tasks": seen, **unseen,
                     "note": f"{ctx.bench.name} benchmark numbers" + (f" (the embedded {ctx.spec.bench.embedded}, not the papers')"
                                                                      if ctx.spec.bench.embedded else "")})
    ds = ds.merge(selected_hits(ds, hits, store.get_dataset(references[0].key)["test_hit"]))
    ds["gain_ci"] = gain_intervals(ds)
    return ds


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
            per_seed = score.sel(task=tasks, metric="norm_acc").mean("task").max("config")
            if int(per_seed.notnull().sum()) > 1:
                row["sd"] = 100 * float(per_seed.std("seed"))
            if "gain_ci" in sel and sel.sizes["seed"] == 1:
                low, high = sel["gain_ci"].sel(merge_method=method, space=space, versus="task_arithmetic").isel(seed=0).values
                row["vs TA 95%"] = interval_label(low, high)
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


def interval_label(low: float, high: float) -> str:
    """A gain's interval in percentage points, ``*`` when it excludes 0 (significant); ``—`` when undefined."""
    if np.isnan(low) or np.isnan(high):
        return "—"
    return f"[{100 * low:+.1f},{100 * high:+.1f}]" + ("*" if low > 0 or high < 0 else "")


def _number(value: Any) -> float | None:
    """``value`` as a grid's numeric value (``None``: a string, list or flag, which has no ends)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _at_bound(method: str, name: str, value: float) -> bool:
    """Whether ``value`` is an end of the hyper-parameter's allowed range (TIES' density 1: no trim),
    beyond which no grid can go."""
    try:
        interval = METHODS[method].params[name].interval
    except (InputError, KeyError):
        return False
    return interval is not None and value in (interval.low, interval.high)


def unselected(ds: xr.Dataset) -> list[tuple[str, str]]:
    """``(method, space)`` pairs that merged but had no configuration selected: the selection
    metric was undefined for every configuration (normalised accuracy when a task's fine-tuned
    model scores 0 on val), so the results table has no row for them."""
    merged = ds["merge_seconds"].notnull().any(("config", "seed"))
    chosen = ds["selected"].any(("config", "seed"))
    return [(str(m), str(sp)) for m in ds.merge_method.values for sp in ds.space.values
            if bool(merged.sel(merge_method=m, space=sp)) and not bool(chosen.sel(merge_method=m, space=sp))]


def grid_edges(ds: xr.Dataset) -> dict[tuple[str, str, str], list[str]]:
    """``{(method, space, config): [hyper-parameters]}`` of selected configurations whose value of a
    swept numeric hyper-parameter is the smallest or largest of the grid that was swept (the
    optimum may lie outside it: widen that grid), unless it is an end of the allowed range (TIES'
    density 1). Adaptive runs (one configuration) never are; nor is anything in results written before
    they recorded each configuration's hyper-parameters (version 8)."""
    out: dict[tuple[str, str, str], list[str]] = {}
    if "hyper_parameters" not in ds.coords:
        return out
    for method in ds.merge_method.values:
        for space in ds.space.values:
            present = ds["merge_seconds"].sel(merge_method=method, space=space).notnull().any("seed")
            configs = [str(c) for c in ds.config.values if bool(present.sel(config=c))]
            chosen = ds["selected"].sel(merge_method=method, space=space).any("seed")
            configured = {c: hyper_parameters(ds, c) for c in configs}
            for config in (c for c in configs if bool(chosen.sel(config=c))):
                flagged = []
                for name, value in configured[config].items():
                    values = {_number(p[name]) for p in configured.values() if name in p} - {None}
                    x = _number(value)
                    if len(values) > 1 and x in (min(values), max(values)) and not _at_bound(str(method), name, x):
                        flagged.append(name)
                if flagged:
                    out[(str(method), str(space), config)] = flagged
    return out
