"""Re-run stored merges from their records and compare (``mergelab store verify --recompute N``).

A study's ``merge`` artifact records what it was made from (:func:`mergelab.study.nodes._merge_record`):
the resolved hyper-parameters, the task set's content hash, the ``bench:`` / ``tasks:`` sections that
load that task set, and the environment (:func:`mergelab.provenance.reproducibility`). :func:`recompute`
draws merges with a seeded generator, loads their task sets again, merges again on this machine and
compares the stored update with the new one, module by module: ``‖ΔW_stored − ΔW_new‖_F / ‖ΔW_new‖_F``
from the factors (a Gram identity, never ``B @ A``), the largest over modules.

The digest check of ``store verify`` catches a payload changed after publishing; this check catches a
merge that is not what its record reproduces (a tampered payload published with a fresh digest, a
method that depends on round-off, another machine's libraries).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import TypeAdapter, ValidationError

from mergelab.bench import BENCHES, TaskSource, bench_spec, load_bench
from mergelab.bench.kinds import DEFAULT_KIND
from mergelab.errors import InputError
from mergelab.merging import METHODS, merge
from mergelab.store import Store
from mergelab.taskset import Dense, LowRank, MergedUpdate, TaskSet, Update

__all__ = ["RECORD_FIELDS", "Recomputed", "choose", "recompute", "relative_difference"]

#: The attrs of a ``merge`` artifact that a recomputation needs.
RECORD_FIELDS = ("method", "space", "hyper_parameters", "taskset", "taskset_source", "reproducibility")
_TASKS = TypeAdapter(list[str] | list[TaskSource] | None)


@dataclass(frozen=True)
class Recomputed:
    """One merge re-run: its key and label, the largest relative difference (``None`` when it could
    not be re-run) and, when it differs or could not be re-run, why (one line)."""

    key: str
    label: str
    difference: float | None
    problem: str | None


def choose(keys: Sequence[str], n: int, seed: int) -> list[str]:
    """``n`` of ``keys`` (all when fewer) drawn by ``random.Random(seed)`` from their sorted order:
    the same store and seed choose the same merges."""
    ordered = sorted(keys)
    return random.Random(seed).sample(ordered, min(n, len(ordered)))


def _difference(a: Update, b: Update) -> Update:
    """``a − b`` as an update: stacked factors when both are low rank, dense otherwise (float64)."""
    if isinstance(a, LowRank) and isinstance(b, LowRank):
        return LowRank(torch.cat([a.B.double(), -b.B.double()], 1), torch.cat([a.A.double(), b.A.double()], 0))
    return Dense(a.dense(torch.float64) - b.dense(torch.float64))


def relative_difference(stored: MergedUpdate, again: MergedUpdate) -> float:
    """The largest ``‖ΔW_stored − ΔW_again‖_F / ‖ΔW_again‖_F`` over modules (``inf`` when the module
    sets differ; a module zero in both counts 0)."""
    if set(stored.modules) != set(again.modules):
        return float("inf")
    worst = 0.0
    for name, update in again.modules.items():
        gap, scale = _difference(stored.modules[name], update).norm(), update.norm()
        worst = max(worst, gap / scale if scale > 0 else (0.0 if gap == 0 else float("inf")))
    return worst


def _kind_fields(section: Mapping[str, Any]) -> dict[str, Any]:
    """A recorded ``bench:`` section less the fields its kind does not read: records written while
    every kind shared one settings model hold all kinds' fields (``arch: null``, ``max_length: 128``)."""
    fields = BENCHES[section.get("kind", DEFAULT_KIND)].spec.model_fields
    return {k: v for k, v in section.items() if k in fields}


def _taskset(source: Mapping[str, Any]) -> TaskSet:
    """The task set a study's ``bench:`` and ``tasks:`` sections load."""
    try:
        bench, tasks = bench_spec(_kind_fields(source["bench"])), _TASKS.validate_python(source.get("tasks"))
    except (ValidationError, KeyError, TypeError) as err:
        raise InputError(f"its bench section is not one this mergelab reads ({type(err).__name__})") from None
    return load_bench(bench, tasks).taskset


def _label(attrs: Mapping[str, Any]) -> str:
    return f"{attrs.get('method', '?')}/{attrs.get('space', '?')}/{attrs.get('config', '?')}"


def recompute(store: Store, n: int, *, seed: int = 0, rtol: float = 1e-6) -> list[Recomputed]:
    """Re-run ``n`` merges of ``store`` drawn by :func:`choose` from their records and compare them with
    what is stored (module docstring); a merge that differs by more than ``rtol`` relative, or that
    cannot be re-run (a record that lacks a field, a task set that no longer loads or has changed),
    has a ``problem``."""
    keys = [a.key for a in store.ls() if a.producer == "merge"]
    tasksets: dict[str, TaskSet | str] = {}
    out = []
    for key in choose(keys, n, seed):
        attrs = store.info(key).attrs
        label = _label(attrs)
        missing = [f for f in RECORD_FIELDS if f not in attrs]
        if missing:
            out.append(Recomputed(key, label, None, f"not recomputed: its record lacks {', '.join(missing)} (written before merge "
                                                    "records carried them); rerun its study into a fresh store to record them"))
            continue
        source = json.dumps(attrs["taskset_source"], sort_keys=True)
        if source not in tasksets:
            try:
                tasksets[source] = _taskset(attrs["taskset_source"])
            except InputError as err:
                tasksets[source] = f"not recomputed: its task set does not load: {err}"
        taskset = tasksets[source]
        if isinstance(taskset, str):
            out.append(Recomputed(key, label, None, taskset))
            continue
        if taskset.content_hash != attrs["taskset"]:
            out.append(Recomputed(key, label, None, f"not recomputed: its bench section now loads task set {taskset.content_hash[:12]}, "
                                                    f"not {attrs['taskset'][:12]} it was merged from (the adapters changed)"))
            continue
        try:
            again = merge(taskset, attrs["method"], attrs["space"], **METHODS[attrs["method"]].resolve(attrs["hyper_parameters"]))
        except InputError as err:
            out.append(Recomputed(key, label, None, f"not recomputed: this mergelab cannot run its record: {err}"))
            continue
        difference = relative_difference(MergedUpdate.from_tensors(store.get_tensors(key)), again)
        problem = None if difference <= rtol else (f"weights differ from a recomputation by {difference:.3g} relative "
                                                   f"(tolerance {rtol:g}; recorded on {_where(attrs['reproducibility'])})")
        out.append(Recomputed(key, label, difference, problem))
    return out


def _where(record: Mapping[str, Any]) -> str:
    """A short account of the environment a record names: device, dtype, threads, torch and its BLAS."""
    versions, blas = record.get("versions", {}), record.get("blas", {})
    return (f"{record.get('device')} {record.get('dtype')}, {record.get('threads')} threads, torch {versions.get('torch')} "
            f"with {blas.get('torch')}")
