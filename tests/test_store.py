"""Content keys, Zarr/safetensors round trips, atomic publish under SIGKILL, gc."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from mergelab.errors import InputError
from mergelab.store import Store
from mergelab.upkeep import gc, verify
from mergelab.taskset import LowRank, TaskUpdate


def _dataset() -> xr.Dataset:
    return xr.Dataset({"erank": (("task", "layer"), np.arange(6.0).reshape(2, 3))},
                      coords={"task": np.array(["mnist", "svhn"], dtype=object), "layer": [0, 1, 2]})


scalars = st.one_of(st.integers(-5, 5), st.floats(-2, 2, allow_nan=False), st.text(max_size=5), st.booleans(), st.none())


@given(st.dictionaries(st.text(min_size=1, max_size=4), scalars, min_size=1, max_size=4),
       st.sampled_from(["1", "2"]), st.integers(0, 3))
@settings(max_examples=60, deadline=None)
def test_key_changes_exactly_when_an_input_changes(inputs, version, which):
    store = Store("memory://keys")
    key = store.key("merge.ties", version, **inputs)
    assert key == store.key("merge.ties", version, **dict(reversed(list(inputs.items()))))  # order-free
    assert key != store.key("merge.ties", version + "b", **inputs)
    assert key != store.key("merge.tsv", version, **inputs)
    name = sorted(inputs)[which % len(inputs)]
    changed = {**inputs, name: ("x", inputs[name])}
    assert key != store.key("merge.ties", version, **changed)


@given(st.integers(0, 2**16), st.integers(0, 5), st.integers(0, 3))
@settings(max_examples=40, deadline=None)
def test_key_follows_tensor_content_and_config(seed, row, col):
    g = torch.Generator().manual_seed(seed)
    B, A = torch.randn(6, 4, generator=g), torch.randn(4, 4, generator=g)
    task = TaskUpdate("t", {"w": LowRank(B, A)}, meta={"adapter_config": {"r": 4}})
    store = Store("memory://keys")
    k = store.key("stats", "1", task=task)
    assert k == store.key("stats", "1", task=TaskUpdate("other-name", {"w": LowRank(B.clone(), A.clone())}, meta={"adapter_config": {"r": 4}}))
    B2 = B.clone()
    B2[row, col] += 1e-3
    assert k != store.key("stats", "1", task=TaskUpdate("t", {"w": LowRank(B2, A)}, meta={"adapter_config": {"r": 4}}))
    assert k != store.key("stats", "1", task=TaskUpdate("t", {"w": LowRank(B, A)}, meta={"adapter_config": {"r": 8}}))


#: One store per kind of URL: a plain path, an fsspec local URL and an in-memory filesystem.
URLS = ["local", "file", "memory"]


def _store(kind: str, tmp_path) -> Store:
    return {"local": lambda: Store(tmp_path / "s"), "file": lambda: Store(f"file://{tmp_path}/s"),
            "memory": lambda: Store(f"memory://{tmp_path.name}")}[kind]()


@pytest.mark.parametrize("url", URLS)
def test_dataset_and_tensors_round_trip_with_provenance(url, tmp_path):
    store = _store(url, tmp_path)
    key = store.key("coverage", "1", tol=1e-6)
    assert not store.exists(key)
    store.put_dataset(key, _dataset(), {"wall_time_s": 0.5})
    ds = store.get_dataset(key)
    xr.testing.assert_equal(ds.reset_coords(drop=True), _dataset())
    prov = ds.attrs["provenance"]
    assert prov["producer"] == "coverage" and prov["wall_time_s"] == 0.5 and prov["inputs"] == {"tol": "1e-06"}
    assert xr.open_zarr(store.dataset_url(key), consolidated=False)["erank"].shape == (2, 3)
    tkey = store.key("bases", "1", k=key)
    store.put_tensors(tkey, {"U": torch.eye(3)})
    torch.testing.assert_close(store.get_tensors(tkey)["U"], torch.eye(3))
    store.set_ref("study/bases", tkey)
    assert store.ref("study/bases") == tkey
    assert {a.key for a in store.ls()} == {key, tkey}


def test_unknown_protocol_is_an_input_error():
    with pytest.raises(InputError, match="unknown store protocol 'nope'"):
        Store("nope://bucket/prefix")


def test_missing_artifact_raises_keyerror(store):
    with pytest.raises(KeyError, match="no published artifact"):
        store.get_dataset("coverage-0000")


@pytest.mark.parametrize("url", URLS)
def test_gc_removes_leftovers_and_unreferenced(url, tmp_path):
    store = _store(url, tmp_path)
    keep = store.put_json(store.key("a", "1"), {"x": 1})
    drop = store.put_json(store.key("b", "1"), {"x": 2})
    named = store.put_json(store.key("c", "1"), {"x": 3})
    store.set_ref("kept-by-name", named)
    staged, half = f"{store.key('z', '1')}.{'0' * 12}", str(store.key("half", "1"))
    store.fs.makedirs(f"{store.root}/staging/{staged}", exist_ok=True)
    store.fs.makedirs(f"{store.root}/objects/{half}/abc", exist_ok=True)
    store.fs.makedirs(f"{store.root}/objects/{keep}/lost-race", exist_ok=True)  # a losing writer's payload
    store.fs.makedirs(f"{store.root}/objects/notes", exist_ok=True)  # not an artifact's name: not the store's
    assert gc(store) == []  # younger than the lease: possibly a live run's write in progress
    assert set(gc(store, lease_s=0)) == {f"staging/{staged}", half, f"{keep}/lost-race"}
    assert store.fs.exists(f"{store.root}/objects/notes")
    assert store.exists(drop) and store.get_json(keep) == {"x": 1}
    assert gc(store, {keep}) == [drop]
    assert store.exists(keep) and store.exists(named) and not store.exists(drop)


_RACE_SCRIPT = textwrap.dedent(
    """
    import sys, time, numpy as np, torch, xarray as xr
    from mergelab.store import Store
    s = Store(sys.argv[1])
    time.sleep(max(0.0, float(sys.argv[3]) - time.time()))  # every writer starts at the same instant
    for i in range(int(sys.argv[2])):
        s.put_json(s.key("race_json", "1", i=i), {"i": i})
        s.put_tensors(s.key("race_tensors", "1", i=i), {"w": torch.full((4,), float(i))})
        if i % 2 == 0:
            s.put_dataset(s.key("race_zarr", "1", i=i), xr.Dataset({"v": (("x",), np.full(3, float(i)))}))
    """
)


def test_many_processes_publishing_the_same_keys_leave_every_key_whole(tmp_path):
    root, n, start = tmp_path / "s", 100, time.time() + 20
    procs = [subprocess.Popen([sys.executable, "-c", _RACE_SCRIPT, str(root), str(n), str(start)], stderr=subprocess.PIPE)
             for _ in range(4)]
    errors = [p.communicate(timeout=300)[1].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    store = Store(root)
    for i in range(n):
        assert store.get_json(store.key("race_json", "1", i=i)) == {"i": i}
        assert store.get_tensors(store.key("race_tensors", "1", i=i))["w"].tolist() == [float(i)] * 4
        if i % 2 == 0:
            assert store.get_dataset(store.key("race_zarr", "1", i=i))["v"].values.tolist() == [float(i)] * 3
    published = {a.key for a in store.ls()}
    assert len(published) == 2 * n + n // 2
    leftovers = gc(store, dry_run=True, lease_s=0)  # only the payloads of writers whose marker was overwritten
    assert all("/" in r and r.split("/")[0] in published for r in leftovers)
    gc(store, lease_s=0)
    assert {a.key for a in store.ls()} == published and store.get_json(store.key("race_json", "1", i=0)) == {"i": 0}


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time, numpy as np, xarray as xr
    from mergelab.store import Store
    def hang(self, *args, **kwargs):  # stands in for the publish step: signal, then wait to be killed
        open(sys.argv[2], "w").close()
        time.sleep(600)
    setattr(Store, sys.argv[3], hang)
    s = Store(sys.argv[1])
    ds = xr.Dataset({"v": (("x",), np.arange(1000.0))})
    s.put_dataset(s.key("killed", "1"), ds)
    """
)


@pytest.mark.parametrize("stage", ["_write_marker"])
def test_sigkill_between_write_and_publish_leaves_nothing_trusted(tmp_path, stage):
    """Kill the writer after the payload is written but before it is published; the next run recomputes."""
    root, flag = tmp_path / "s", tmp_path / "reached"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(root), str(flag), stage])
    deadline = time.time() + 120
    while not flag.exists():
        assert proc.poll() is None, "writer died before reaching the publish step"
        assert time.time() < deadline
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = Store(root)
    key = store.key("killed", "1")
    assert store.fs.find(str(root))  # the payload is on disk ...
    assert not store.exists(key)  # ... but nothing trusts it
    with pytest.raises(KeyError):
        store.get_dataset(key)
    assert store.ls() == []
    store.put_dataset(key, xr.Dataset({"v": (("x",), np.arange(1000.0))}))
    assert store.exists(key) and store.get_dataset(key)["v"].sum() == 499500


def test_memo_computes_once_then_hits(store):
    calls = []
    key = store.key("stat", "1", x=1)
    value, hit = store.memo(key, "json", lambda: calls.append(1) or {"v": 3})
    assert (value, hit, len(calls)) == ({"v": 3}, False, 1)
    value, hit = store.memo(key, "json", lambda: calls.append(1) or {"v": 4})
    assert (value, hit, len(calls)) == ({"v": 3}, True, 1)
    assert store.info(key).attrs["compute_time_s"] >= 0


@pytest.mark.parametrize("name", ["../outside", "studies/../../x", "/abs", "a//b", "a\\b", ""])
def test_a_ref_name_cannot_point_outside_the_store(store, name):
    key = store.put_json(store.key("a", "1"), {"x": 1})
    with pytest.raises(ValueError, match="ref name"):
        store.set_ref(name, key)


@pytest.mark.parametrize("url", URLS)
def test_verify_finds_and_quarantines_corrupt_objects(tmp_path, url):
    import numpy as np
    import torch
    import xarray as xr

    store = _store(url, tmp_path)
    ok = store.put_json(store.key("ok", "1"), {"a": 1})
    flipped = store.put_tensors(store.key("flipped", "1"), {"w": torch.ones(4)})
    gone = store.put_dataset(store.key("gone", "1"), xr.Dataset({"v": ("x", np.arange(3.0))}))
    marker = store.put_json(store.key("marker", "1"), {"b": 2})
    assert verify(store) == []

    payload = store._payload(flipped, "tensors")
    store.fs.pipe_file(payload, store.fs.cat_file(payload)[:-4] + b"\0\0\0\0")
    store.fs.rm(store._payload(gone, "dataset"), recursive=True)
    store.fs.pipe_file(store._marker(marker), b"{not json")
    found = dict(verify(store))
    assert found == {flipped: "payload differs from its published digest", gone: "payload data.zarr is missing",
                     marker: "marker is not readable JSON"}
    assert dict(verify(store, quarantine=True)) == found
    assert verify(store) == [] and [a.key for a in store.ls()] == [ok]
    assert not store.exists(flipped)  # a rerun recomputes it
