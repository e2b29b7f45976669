"""Bases as reusable artifacts (mergelab.bases): loaded bases give the same merges and banks as
in-process ones, bit for bit; knots and TARA-B share one SVD, core space and core banks one pair of
reference bases; a second study over the same adapters reads the bases instead of computing them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergelab.adaptation import build
from mergelab.bases import adaptation_bases, bases_key, space_bases, stored_format
from mergelab.merging import merge, project
from mergelab.store import Store
from mergelab.synthetic import random_taskset
from mergelab.taskset import MergedUpdate, TaskSet, TaskUpdate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one torch thread (tests/conftest.py ``one_thread``)."""


@pytest.fixture(scope="module")
def taskset() -> TaskSet:
    """Heterogeneous ranks, and a module where ``T·r > out`` (truncated, rank-deficient stacks), plus a
    duplicated adapter (the core reference bases are then truncated below ``T·r``)."""
    ts = random_taskset({"blk.q": (12, 10), "blk.v": (5, 16), "mlp": (9, 7)}, 3, rank=[2, 3, 4], seed=3)
    dup = TaskUpdate("dup", dict(ts.tasks[0].modules), source="synthetic", meta={"copy": 0})
    return TaskSet((*ts.tasks, dup), ts.base)


def assert_identical(a: MergedUpdate, b: MergedUpdate) -> None:
    ta, tb = a.to_tensors(), b.to_tensors()
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name


@pytest.mark.parametrize("method", ["ties", "tsv"])
@pytest.mark.parametrize(("space", "options"), [("knots", {}), ("knots", {"variant": "per_layer"}), ("knots", {"naive": True}),
                                                ("core", {}), ("core", {"scope": "model"})])
def test_merges_from_loaded_bases_are_bit_identical_to_in_process_ones(taskset, tmp_path, method, space, options):
    store = Store(tmp_path / "store")
    computed = space_bases(store, taskset, space, **options)
    loaded = space_bases(Store(tmp_path / "store"), taskset, space, **options)
    assert not computed.hit and loaded.hit and loaded.key == computed.key
    assert loaded.seconds == pytest.approx(computed.seconds, abs=1e-6) and loaded.seconds > 0
    hp = {"density": 0.3} if method == "ties" else {}
    in_process = merge(taskset, method, space, space_options=options, **hp)
    assert_identical(merge(project(taskset, space, bases=loaded.modules, **options), method, **hp), in_process)


def test_only_the_options_that_change_a_basis_key_it(taskset, tmp_path):
    store = Store(tmp_path)
    knots = space_bases(store, taskset, "knots")
    assert space_bases(store, taskset, "knots", variant="per_layer", scope="module").key == knots.key  # same SVD
    naive = space_bases(store, taskset, "knots", naive=True)
    assert not naive.hit and naive.key != knots.key  # same SVD in exact arithmetic only: keyed apart
    assert space_bases(store, taskset, "knots", rank_rtol=1e-6).key != knots.key
    core = space_bases(store, taskset, "core")
    assert space_bases(store, taskset, "core", scope="model").key == core.key
    assert space_bases(store, taskset, "full") is None
    assert core.key == bases_key(store, taskset, "core") and core.key.startswith("bases.core-")
    other = random_taskset({"blk.q": (12, 10), "blk.v": (5, 16), "mlp": (9, 7)}, 4, rank=3, seed=4)
    assert bases_key(store, other, "core") != core.key
    assert sorted(a.producer for a in store.ls()) == ["bases.core", "bases.knots", "bases.knots", "bases.knots"]


@pytest.mark.parametrize("duplicated", [True, False])
def test_stored_tensors_round_trip_exactly_with_their_layout(taskset, tmp_path, duplicated):
    """With the duplicated adapter every stack falls back to its SVD (``U_B_ref`` / ``V_A_ref`` stored); without it
    the sides whose stack is no wider than tall take the Gram route and store only ``s``, ``V``."""
    ts = taskset if duplicated else TaskSet(taskset.tasks[:3], taskset.base)
    store = Store(tmp_path)
    core = space_bases(store, ts, "core")
    loaded = space_bases(store, ts, "core")
    for m, basis in core.modules.items():
        for ours, theirs in zip((x for side in basis for x in side), (x for side in loaded.modules[m] for x in side), strict=True):
            assert (ours is None) == (theirs is None)
            if ours is not None:
                assert ours.dtype == torch.float64 and torch.equal(ours, theirs)
                assert ours.dim() == 1 or (ours.stride(0) < ours.stride(1)) == (theirs.stride(0) < theirs.stride(1))
    names = {name.removesuffix(".T") for name in store.get_tensors(core.key)}
    formed = {"blk.q": (duplicated, duplicated), "blk.v": (True, duplicated), "mlp": (duplicated, True)}  # T·r = 9
    assert names == {f"{m}::{f}" for m, (U_B, V_A) in formed.items()
                     for f in ("s_B", "V_B", "s_A", "U_A", *(["U_B_ref"] if U_B else []), *(["V_A_ref"] if V_A else []))}
    assert any(name.endswith(".T") for name in store.get_tensors(core.key))  # LAPACK's column-major factors
    knots = space_bases(store, ts, "knots")
    assert {name.removesuffix(".T").split("::")[1] for name in store.get_tensors(knots.key)} == {
        "U", "s", *(f"V.{i}" for i in range(len(ts.tasks)))}
    assert len(core.modules) == 3 and stored_format("core").version == "3"


def test_a_space_with_a_stored_basis_is_one_module(taskset, tmp_path, monkeypatch):
    """A new space declares its basis and how it is stored on itself; mergelab.bases keys, writes and
    reads it back with no edit (a space owns its stored basis)."""
    from dataclasses import dataclass
    from typing import ClassVar

    from mergelab.spaces import SPACES, KnotsSpace
    from mergelab.spaces.base import StoredBasis

    @dataclass(frozen=True)
    class ColumnMeans(KnotsSpace):
        name: ClassVar[str] = "column_means"
        basis_options: ClassVar = ()
        stored_basis: ClassVar = StoredBasis("1", {}, lambda b: {"m": b}, lambda t: t["m"])

        def basis(self, updates):
            return torch.stack([u.dense(torch.float64).mean(0) for u in updates])

    monkeypatch.setitem(SPACES, "column_means", ColumnMeans())
    computed = space_bases(Store(tmp_path), taskset, "column_means")
    loaded = space_bases(Store(tmp_path), taskset, "column_means")
    assert not computed.hit and loaded.hit and str(loaded.key).startswith("bases.column_means") and stored_format("column_means").version == "1"
    assert all(torch.equal(loaded.modules[m], computed.modules[m]) for m in computed.modules)


@pytest.mark.parametrize(("method", "hp"), [("tara_b", {}), ("tara_b", {"space": "core", "rank": 2}), ("adarank", {}),
                                            ("adarank", {"origin": "cart"}), ("adarank", {"space": "core", "origin": "cart"})])
def test_banks_from_stored_bases_are_bit_identical_to_in_process_ones(taskset, tmp_path, method, hp):
    store = Store(tmp_path)
    adaptation_bases(store, taskset, method, hp)  # compute and publish
    bases, used = adaptation_bases(store, taskset, method, hp)
    assert all(b.hit for b in used) and len(used) == (2 if hp.get("space") == "core" else 1)
    ours, theirs = build(method, taskset, bases=bases, **hp), build(method, taskset, **hp)
    for a, b in zip(ours.banks, theirs.banks, strict=True):
        for name in ("owner", "B", "A", "dense", "left", "right"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None and y is None) or torch.equal(x, y), name
        assert (a.offset is None) == (b.offset is None)
        if a.offset is not None:
            assert torch.equal(a.offset.dense(), b.offset.dense())


def test_tara_b_shares_the_knots_svd_and_core_banks_the_core_reference_bases(taskset, tmp_path):
    store = Store(tmp_path)
    knots, core = space_bases(store, taskset, "knots"), space_bases(store, taskset, "core")
    _, (shared,) = adaptation_bases(store, taskset, "tara_b", {"rank": 1})
    assert shared.hit and shared.key == knots.key
    _, (reference, in_core) = adaptation_bases(store, taskset, "adarank", {"space": "core"})
    assert reference.hit and reference.key == core.key and not in_core.hit
    assert adaptation_bases(store, taskset, "adamerging", {}) is None
    _, (per_task,) = adaptation_bases(store, taskset, "adarank", {"origin": "cart", "lam": 0.5})
    assert not per_task.hit and per_task.key != adaptation_bases(store, taskset, "adarank", {"lam": 0.5})[1][0].key


# Two studies over the same adapters ----------------------------------------------------------------

MICRO = {"bench": {"kind": "micro", "root": str(REPO / "data/micro"), "rank": 4}, "tasks": ["digits", "textures"], "joint": False}
STUDY_A = {"name": "a", **MICRO, "methods": [{"method": "ties", "spaces": ["knots", "core"], "grid": {"density": [0.3], "alpha": [1.0]}}]}
STUDY_B = {"name": "b", **MICRO, "methods": [{"method": "tsv", "spaces": ["knots", "core"], "grid": {"alpha": [1.0]}}],
           "adaptive": [{"method": "tara_b", "iters": 1, "batch_size": 4}]}


def run_study(spec: dict, store: str):
    from mergelab.config import load_study
    from mergelab.study import NODES, Run, run_graph

    ctx = Run(load_study(spec), store)
    nodes, done = run_graph(ctx, lambda kind, batch: [NODES[kind](ctx, *args) for args in batch])
    return ctx, nodes, done


def test_a_second_study_over_the_same_adapters_reads_the_bases_instead_of_computing_them(tmp_path, monkeypatch):
    import mergelab.adaptation.bank as bank
    import mergelab.spaces.core as core
    import mergelab.spaces.knots as knots
    from mergelab.study import NODES, AdaptJob, Run

    store_url = str(tmp_path / "store")
    ctx_a, _, _ = run_study(STUDY_A, store_url)
    store = Store(store_url)
    published = {a.key: a for a in store.ls() if a.producer.startswith("bases.")}
    assert sorted(a.producer for a in published.values()) == ["bases.core", "bases.knots"]

    calls = {"knots_svd": 0, "core_basis": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    for module in (knots, bank):
        monkeypatch.setattr(module, "knots_svd", counting("knots_svd", knots.knots_svd))
    for module in (core, bank):
        monkeypatch.setattr(module, "core_basis", counting("core_basis", core.core_basis))

    ctx_b, nodes, done = run_study(STUDY_B, store_url)
    assert ctx_b.taskset.content_hash == ctx_a.taskset.content_hash
    assert {n.node for n in nodes if not n.hit} >= {"merge", "adapt"}  # study B did merge and adapt
    assert calls == {"knots_svd": 0, "core_basis": 0}  # ... but decomposed nothing
    assert {a.key for a in store.ls() if a.producer.startswith("bases.")} == set(published)

    # B's merges equal a fresh in-process computation, and their time includes the bases' recorded cost
    results = store.get_dataset(done.key)
    for n in nodes:
        if n.node != "merge":
            continue
        method, space, _ = n.label.split("/")
        stored = MergedUpdate.from_tensors(store.get_tensors(n.key), base=ctx_b.taskset.base)
        assert_identical(stored, merge(ctx_b.taskset, method, space, alpha=1.0))
        attrs = store.info(n.key).attrs
        (used,) = attrs["bases"]
        assert used in published and published[used].producer == f"bases.{space}"
        assert attrs["bases_seconds"] == published[used].attrs["compute_time_s"] > 0
        assert attrs["merge_seconds"] > attrs["bases_seconds"]
        recorded = results["merge_seconds"].sel(merge_method=method, space=space).max()
        assert float(recorded) == pytest.approx(attrs["merge_seconds"])

    # TARA-B took the KnOTS space's SVD from the store; a fresh run on an empty store adapts to the same merge
    (adapted,) = [n for n in nodes if n.node == "adapt"]
    attrs = store.info(adapted.key).attrs
    assert [published[k].producer for k in attrs["bases"]] == ["bases.knots"]
    monkeypatch.undo()
    fresh_ctx = Run(ctx_b.spec, str(tmp_path / "fresh"))
    fresh = NODES["adapt"](fresh_ctx, AdaptJob(ctx_b.spec.adaptive[0], ctx_b.spec.seeds[0]))
    assert not fresh.hit and fresh.key == adapted.key
    assert_identical(MergedUpdate.from_tensors(Store(tmp_path / "fresh").get_tensors(fresh.key), base=ctx_b.taskset.base),
                     MergedUpdate.from_tensors(store.get_tensors(adapted.key), base=ctx_b.taskset.base))
