"""Reproducibility records (issue 29 item 6): every merge and adaptation record names its environment
and seeds; ``mergelab store verify --recompute N`` re-runs merges from their records, finds nothing
on an intact store and flags a merge whose stored weights were changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mergelab_app.cli import app
from mergelab.config import load_study
from mergelab.provenance import reproducibility
from mergelab.store import Store
from mergelab.study import Run, local_submit, run_graph
from mergelab.study.recompute import RECORD_FIELDS, choose, recompute

REPO = Path(__file__).resolve().parents[1]
STUDY = {
    "name": "tiny-records",
    "bench": {"kind": "micro", "root": str(REPO / "data/micro"), "rank": "mixed"},
    "tasks": ["digits", "textures", "signs"],
    "methods": [{"method": "task_arithmetic", "spaces": ["full"], "grid": {"alpha": [0.3]}},
                {"method": "ties", "spaces": ["core"], "grid": {"alpha": [1.0], "density": [0.2]}},
                {"method": "tsv", "spaces": ["full"], "grid": {"alpha": [1.0]}},
                {"method": "dare_linear", "spaces": ["full"], "grid": {"alpha": [0.3], "p": [0.5]}}],
    "adaptive": [{"method": "adamerging", "iters": 1, "batch_size": 2}],
    "seeds": [3],
    "joint": False,
}
FIELDS = {"versions", "blas", "cpu_capability", "threads", "device", "dtype", "seeds"}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    """A store holding the tiny study's merges and its adaptive run, made on one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = Run(load_study(STUDY), str(tmp_path_factory.mktemp("records") / "store"))
        run_graph(run, local_submit(run), phases=["merge", "adapt"])
    finally:
        torch.set_num_threads(threads)
    return Store(run.store.url)


def _keys(store: Store, producer: str) -> list[str]:
    return [a.key for a in store.ls() if a.producer == producer]


def test_the_record_names_versions_blas_threads_device_dtype_and_seeds():
    record = reproducibility(device="cpu", dtype=torch.float64, seeds={"merge": 7})
    assert set(record) == FIELDS
    assert set(record["versions"]) == {"python", "mergelab", "torch", "numpy", "peft", "open_clip"}
    assert record["versions"]["torch"] == torch.__version__ and set(record["blas"]) == {"torch", "numpy"}
    assert (record["device"], record["dtype"], record["seeds"], record["threads"]) == ("cpu", "float64", {"merge": 7}, torch.get_num_threads())


def test_every_merge_and_adaptation_record_carries_it(store):
    merges, adapts = _keys(store, "merge"), _keys(store, "adapt")
    assert len(merges) == 4 and len(adapts) == 1  # every merge node and the adapt node of the study
    for key in merges:
        attrs = store.info(key).attrs
        assert set(RECORD_FIELDS) <= set(attrs) and set(attrs["reproducibility"]) == FIELDS
        assert (attrs["reproducibility"]["device"], attrs["reproducibility"]["threads"]) == ("cpu", 1)
    seeded = [store.info(k).attrs for k in merges if store.info(k).attrs["method"] == "dare_linear"]
    assert seeded[0]["reproducibility"]["seeds"] == {"merge": 3} and seeded[0]["hyper_parameters"]["seed"] == 3
    adapted = store.info(adapts[0]).attrs["reproducibility"]
    assert set(adapted) == FIELDS and adapted["seeds"] == {"adapt": 3} and adapted["dtype"] == "float32"


def test_merge_json_carries_it(tiny_vit, vit_adapters, tmp_path):
    from mergelab.checkpoints import load_taskset, save_merged
    from mergelab.merging import merge

    merged = merge(load_taskset(tiny_vit, vit_adapters), "dare_linear", "full", p=0.5, seed=4)
    out = save_merged(merged, tmp_path / "out", format="weights", base=tiny_vit.state_dict())
    record = json.loads((out / "merge.json").read_text())["reproducibility"]
    assert set(record) == FIELDS and record["seeds"] == {"merge": 4} and record["dtype"] == "float32"


def test_the_draw_is_seeded():
    keys = [f"merge-{i}" for i in range(10)]
    assert choose(keys, 3, seed=1) == choose(list(reversed(keys)), 3, seed=1) and len(set(choose(keys, 3, seed=1))) == 3
    assert choose(keys, 3, seed=1) != choose(keys, 3, seed=2) and sorted(choose(keys, 20, seed=0)) == keys


def test_recompute_finds_nothing_on_an_intact_store_and_flags_tampered_weights(store, tmp_path):
    found = recompute(store, 10)
    assert len(found) == 4 and all(r.problem is None and r.difference <= 1e-6 for r in found)
    assert _cli("store", "verify", "--store", store.url, "--recompute", "10").exit_code == 0

    # a copy of the store with one merge's weights changed and published again with a fresh digest:
    # the digest check passes, the recomputation does not
    copy = Store(tmp_path / "store")
    key = next(k for k in _keys(store, "merge") if store.info(k).attrs["method"] == "ties")
    for other in _keys(store, "merge"):
        tensors, attrs = store.get_tensors(other), store.info(other).attrs
        if other == key:
            name = next(iter(tensors))
            tensors[name] = tensors[name] * (1 + 1e-4)
        copy.put_tensors(other, tensors, attrs)
    result = _cli("store", "verify", "--store", copy.url, "--recompute", "4", "--seed", "5")
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if "differ from a recomputation" in line]
    assert len(lines) == 1 and lines[0].startswith(f"{key} (ties/core/") and "0 corrupt artifacts" in result.output
    assert "1 differ beyond 1e-06" in result.output


def test_a_record_without_what_recompute_needs_is_one_line(store, tmp_path):
    copy = Store(tmp_path / "store")
    key = _keys(store, "merge")[0]
    attrs = {k: v for k, v in store.info(key).attrs.items() if k not in ("taskset_source", "reproducibility")}
    copy.put_tensors(key, store.get_tensors(key), attrs)
    result = _cli("store", "verify", "--store", copy.url, "--recompute", "1")
    assert result.exit_code == 0, result.output
    assert f"{key} (" in result.output and "its record lacks taskset_source, reproducibility" in result.output
    assert "recomputed 0 of 1 merges drawn (seed 0): 0 differ beyond 1e-06, 1 could not be recomputed" in result.output


def test_a_negative_count_is_one_line(tmp_path):
    result = _cli("store", "verify", "--store", tmp_path / "s", "--recompute", "-1")
    assert result.exit_code == 2 and "give a number of merges >= 0" in result.output


def _cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "240"})
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result
