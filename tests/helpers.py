"""Test helpers shared across test modules (import as ``from helpers import ...``; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import inspect

from collections.abc import Iterable, Mapping
from typing import Any

import xarray as xr

from mergelab.bench import BenchSession
from mergelab.experiments.registry import ANALYSES
from mergelab.store import Store
from mergelab.taskset import MergedUpdate, TaskSet

MICRO_LABEL = "micro benchmark (test store)"

#: Tiny budgets for the model-dependent (``needs="bench"``) analyses in tests: 8 validation images
#: per task (16 for the second TAS batch count), ΔL(r) on two layers, five values of λ.
BENCH_PARAMS: dict[str, dict[str, Any]] = {
    "anisotropy": {"batch_size": 8, "batches": 1},
    "components": {"components": 0.5, "layers": [0, 3], "batch_size": 8, "batches": 1},
    "tas_sweep": {"lams": [0.1, 0.3, 0.5, 0.7, 1.0], "batch_counts": [1, 2], "batch_size": 8},
    "embedding_interference": {"batch_size": 8, "batches": 1},
}


def _bench_kwargs(name: str, params: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
    return {**ANALYSES[name].params, **BENCH_PARAMS.get(name, {}), **(params or {}).get(name, {})}


def bench_analyses(session: BenchSession, *, params: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, xr.Dataset]:
    """Every ``needs="bench"`` analysis of the registry on ``session`` with :data:`BENCH_PARAMS` (``params[name]`` overrides)."""
    return {name: entry.fn(session, **_bench_kwargs(name, params)) for name, entry in ANALYSES.items() if entry.needs == "bench"}


def publish_analyses(store: Store, study: str, taskset: TaskSet, *, merged: MergedUpdate | None = None,
                     bench: BenchSession | None = None, computed: Mapping[str, xr.Dataset] | None = None,
                     names: Iterable[str] | None = None, params: Mapping[str, Mapping[str, Any]] | None = None,
                     label: str = MICRO_LABEL) -> dict[str, str]:
    """Compute registry analyses and publish each under ``studies/<study>/analysis/<name>``, as a study flow does.

    ``names`` defaults to every ``needs="taskset"`` analysis, plus the ``needs="merged"`` ones when
    ``merged`` is given and the ``needs="bench"`` ones when ``bench`` is given; ``params[name]``
    overrides an analysis's parameters (bench analyses start from :data:`BENCH_PARAMS`). A bench
    analysis is taken from ``computed[name]`` when there (e.g. :func:`bench_analyses` of the same
    bench and params, computed once per session), else computed on ``bench``. Each Dataset is
    published labelled ``attrs["dataset"] = label`` (the caller's Datasets are not modified) and
    keyed ``store.key(producer, version, taskset=…, [merged=… | data=…,] **params)``.
    Returns ``{name: key}``.
    """
    names = list(names) if names is not None else [n for n, a in ANALYSES.items()
                                                   if a.needs == "taskset" or (a.needs == "merged" and merged is not None)
                                                   or (a.needs == "bench" and bench is not None)]
    keys: dict[str, str] = {}
    for name in names:
        entry = ANALYSES[name]
        kwargs = {**entry.params, **(params or {}).get(name, {})}
        if entry.needs == "taskset":
            ds = entry.fn(taskset, **kwargs)
            inputs = {"taskset": taskset.content_hash}
        elif entry.needs == "merged":
            assert merged is not None, f"analysis {name!r} needs a merged update"
            takes_taskset = next(iter(inspect.signature(entry.fn).parameters)) == "taskset"  # merged_similarity vs merged_rank
            ds = entry.fn(taskset, merged, **kwargs) if takes_taskset else entry.fn(merged, **kwargs)
            inputs = {"taskset": taskset.content_hash, "merged": merged.content_hash}
        else:
            assert bench is not None, f"analysis {name!r} needs a bench"
            kwargs = _bench_kwargs(name, params)
            ds = (computed or {}).get(name)
            ds = entry.fn(bench, **kwargs) if ds is None else ds
            inputs = {"taskset": bench.taskset.content_hash, "data": bench.bench.data_id}
        ds = ds.assign_attrs(dataset=label)
        key = store.key(entry.producer, entry.version, **inputs, **kwargs)
        store.put_dataset(key, ds)
        store.set_ref(f"studies/{study}/analysis/{name}", key)
        keys[name] = key
    return keys
