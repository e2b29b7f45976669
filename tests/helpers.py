"""Test helpers shared across test modules (import as ``from helpers import ...``; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import hashlib
import inspect
import io
import tarfile

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from mergelab.bench import BenchSession
from mergelab.experiments.registry import ANALYSES
from mergelab.store import Store
from mergelab.taskset import MergedUpdate, TaskSet
from mergelab.textbench.sources import DebPackage, TaskSource

MICRO_LABEL = "micro benchmark (test store)"

#: Tiny budgets for the model-dependent (``needs="bench"``) analyses in tests: 8 validation images
#: per task (16 for the second TAS batch count), ΔL(r) on two layers, five values of λ.
BENCH_PARAMS: dict[str, dict[str, Any]] = {
    "anisotropy": {"batch_size": 8, "batches": 1},
    "components": {"components": 0.5, "layers": [0, 3], "batch_size": 8, "batches": 1},
    "tas_sweep": {"lams": [0.1, 0.3, 0.5, 0.7, 1.0], "batch_counts": [1, 2], "batch_size": 8},
    "embedding_interference": {"batch_size": 8, "batches": 1},
    "truncation_accuracy": {"fractions": [0.0, 0.5, 0.9]},
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


def synthetic_results(runs: Mapping[tuple[str, str], Iterable[float]], tasks: Iterable[str] = ("a", "b"), *,
                      finetuned: Iterable[float] | None = None, joint: bool = True, seeds: int = 1) -> xr.Dataset:
    """A hand-made study results Dataset (docs/store.md §9) with one configuration per method × space.

    ``runs[(method, space)]`` are the per-task test accuracies (fractions) of that merge; the
    Dataset's ``merge_method`` and ``space`` follow the order of ``runs`` and a method × space not
    in it is NaN. ``finetuned`` are the experts' accuracies (default 0.8 each), ``norm_acc`` the
    ratio, ``tas`` one minus the accuracy; zero-shot scores half the experts'. With ``joint``, Hits@k
    of a merge are its accuracy minus 0.1, plus 0.05 per rank (1, 3, 5), per task and on ``joint``
    (there from the mean accuracy); the references' likewise. ``seeds`` copies every score to that
    many seeds; ``selected`` marks the one configuration.
    """
    tasks = list(tasks)
    methods, spaces = list(dict.fromkeys(m for m, _ in runs)), list(dict.fromkeys(s for _, s in runs))
    expert = np.array(list(finetuned) if finetuned is not None else [0.8] * len(tasks))
    metrics = ["acc", "norm_acc", "val_acc", "val_norm_acc", "tas", "hits@1", "hits@3", "hits@5"]
    names = tasks + (["joint"] if joint else [])
    score = np.full((len(methods), len(spaces), 1, len(names), len(metrics), seeds), np.nan)
    seconds = np.full((len(methods), len(spaces), 1, seeds), np.nan)

    def fill(out: np.ndarray, acc: np.ndarray) -> None:  # out: (task, metric) of one run or reference
        out[:len(tasks), 0] = out[:len(tasks), 2] = acc
        out[:len(tasks), 1] = out[:len(tasks), 3] = acc / expert
        out[:len(tasks), 4] = 1 - acc
        if joint:
            out[:len(tasks), 5:] = acc[:, None] - 0.1 + 0.05 * np.arange(3)
            out[-1, 5:] = acc.mean() - 0.1 + 0.05 * np.arange(3)

    for (method, space), acc in runs.items():
        i, j = methods.index(method), spaces.index(space)
        view = np.full((len(names), len(metrics)), np.nan)
        fill(view, np.asarray(list(acc), dtype=float))
        score[i, j, 0] = view[..., None]
        seconds[i, j, 0] = 0.1 * (i + 1)
    reference = np.full((2, len(names), len(metrics)), np.nan)
    fill(reference[0], expert / 2)
    fill(reference[1], expert)
    dims = ("merge_method", "space", "config", "seed")
    ds = xr.Dataset({"score": (("merge_method", "space", "config", "task", "metric", "seed"), score),
                     "merge_seconds": (dims, seconds), "peak_memory_mb": (dims, 10 * seconds),
                     "selected": (dims, ~np.isnan(seconds)),
                     "reference_score": (("reference", "task", "metric"), reference)},
                    coords={"merge_method": methods, "space": spaces, "config": ["alpha=0.5"], "task": names, "metric": metrics,
                            "seed": list(range(seeds)), "reference": ["zeroshot", "finetuned"]},
                    attrs={"tasks": tasks, "note": "hand-made test numbers", "study": "synthetic", "selection": "val"})
    return ds


# A synthetic text benchmark's sources (mergelab build-text without the network) -----------------------

TEXT_WORDS = {"weather": ("sun", "rain", "snow"), "animals": ("cat", "dog")}
TEXT_FILLER = ("the", "a", "is", "it", "this", "here", "now", "very")


def deb_archive(path, files: dict[str, bytes]) -> str:
    """A minimal ``.deb`` (ar archive: debian-binary, control.tar.gz, data.tar.gz) holding ``files``; returns its SHA-256."""
    def tar(members: dict[str, bytes]) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
            for name, data in members.items():
                info = tarfile.TarInfo(f"./{name}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        return buffer.getvalue()

    members = {"debian-binary": b"2.0\n", "control.tar.gz": tar({"control": b"Package: rows\n"}), "data.tar.gz": tar(files)}
    blob = b"!<arch>\n" + b"".join(f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode() + data + b"\n" * (len(data) % 2)
                                   for name, data in members.items())
    path.write_bytes(blob)
    return hashlib.sha256(blob).hexdigest()


def text_sources(debs) -> dict[str, TaskSource]:
    """Two tasks read from one synthetic package: ``label<TAB>text`` lines, each text its label's word among filler."""
    lines = []
    for task, names in TEXT_WORDS.items():
        for i in range(60):
            words = [TEXT_FILLER[(i * 3 + k) % len(TEXT_FILLER)] for k in range(3 + i % 4)]
            words.insert(i % 3, names[i % len(names)])
            lines.append(f"{task}.{names[i % len(names)]}\t{' '.join(words)} {i}")
    files = {"usr/share/rows/rows.tsv": "\n".join(lines).encode()}
    debs.mkdir()
    sha = deb_archive(debs / "rows_1.0_all.deb", files)
    package = DebPackage("rows", "1.0", sha, "CC0-1.0", "Synthetic rows.")

    def parse(found):
        return [tuple(line.split("\t")[::-1]) for data in found.values() for line in data.decode().splitlines()]

    return {task: TaskSource(package, tuple(files), parse, {f"{task}.{n}": n for n in names}, ("about {}.", "it is {}."), f"synthetic {task}")
            for task, names in TEXT_WORDS.items()}
