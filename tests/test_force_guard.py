"""``--force`` deletes only a previous mergelab output (issue 30, item 1): a folder of user files,
the store, an input or the working directory is refused with one line and exit code 2, and left as
it was; leftovers of killed writes beside the output go with the next write to it."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from safetensors.torch import save_file
from typer.testing import CliRunner

from mergelab_app.cli import app

runner = CliRunner()


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (or ``root`` itself) with its bytes: what must survive a refused --force."""
    if root.is_file():
        return {".": root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def inputs(tmp_path, vit_adapters, tiny_vit):
    """Two adapters copied under ``tmp_path/adapters``, the base, a store holding one artifact in
    ``tmp_path/project/store``, and the working directory ``tmp_path/work``."""
    from mergelab.store import Store

    adapters = [shutil.copytree(a, tmp_path / "adapters" / a.name) for a in vit_adapters[:2]]
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vit.state_dict().items()}, str(base))
    store = Store(tmp_path / "project" / "store")
    store.put_json(store.key("kept", "1"), {"precious": True})
    (tmp_path / "work").mkdir()
    return {"adapters": adapters, "base": base, "store": tmp_path / "project" / "store"}


def _merge(paths, out, *extra):
    return ["merge", "--base", paths["base"], "--adapters", *paths["adapters"], "--method", "task_arithmetic", "--space", "core",
            "--store", paths["store"], "--out", out, "--force", *extra]


def _adapt(paths, out, *extra):
    return ["adapt", "--base", paths["base"], "--adapters", *paths["adapters"], "--method", "adamerging", "--iters", "1",
            "--store", paths["store"], "--out", out, "--force", *extra]


def _case_user_folder(tmp, paths):
    (tmp / "photos").mkdir()
    (tmp / "photos" / "holiday.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return _merge(paths, tmp / "photos"), tmp / "photos", "is not a previous mergelab output"


def _case_foreign_merge_json(tmp, paths):
    (tmp / "other").mkdir()
    (tmp / "other" / "merge.json").write_text(json.dumps({"models": ["a", "b"]}))  # another tool's file of that name
    return _merge(paths, tmp / "other"), tmp / "other", "is not a previous mergelab output"


def _case_a_file(tmp, paths):
    (tmp / "notes.txt").write_text("mine")
    return _merge(paths, tmp / "notes.txt"), tmp / "notes.txt", "is not a folder"


def _case_the_store(tmp, paths):
    return _merge(paths, paths["store"]), paths["store"], "is the store"


def _case_a_folder_holding_the_store(tmp, paths):
    return _merge(paths, tmp / "project"), tmp / "project", "contains the store"


def _case_inside_the_store(tmp, paths):
    return _merge(paths, paths["store"] / "objects"), paths["store"], "lies inside the store"


def _case_an_adapter(tmp, paths):
    return _merge(paths, paths["adapters"][0]), paths["adapters"][0], "is the adapter 'digits'"


def _case_the_adapters_folder(tmp, paths):
    return _merge(paths, paths["adapters"][0].parent), paths["adapters"][0].parent, "contains the adapter 'digits'"


def _case_the_base(tmp, paths):
    return _merge(paths, paths["base"]), paths["base"], "is the base model"


def _case_the_grams(tmp, paths):
    (tmp / "side").mkdir()
    grams = tmp / "side" / "grams.safetensors"
    grams.write_bytes(b"not read before the check")
    return (_merge(paths, grams.parent, "--grams", grams, "--method", "regmean"), grams.parent, "contains the --grams")


def _case_the_working_directory(tmp, paths):
    (tmp / "work" / "thesis.tex").write_text("chapter 1")
    return _merge(paths, "."), tmp / "work", "would delete the working directory"


def _case_above_the_working_directory(tmp, paths):
    return _merge(paths, ".."), tmp, "would delete a folder above the working directory"


def _case_a_symlink_to_the_store(tmp, paths):
    (tmp / "link").symlink_to(paths["store"], target_is_directory=True)
    return _merge(paths, tmp / "link"), paths["store"], "is the store"


def _case_adapt_onto_an_adapter(tmp, paths):
    return _adapt(paths, paths["adapters"][1]), paths["adapters"][1], "is the adapter 'textures'"


def _case_adapt_onto_the_study_file(tmp, paths):
    study = tmp / "work" / "study.yaml"
    study.write_text("name: s\n")
    return _adapt(paths, study, "--bench", study), study, "is the --bench"


def _case_adapt_onto_a_user_folder(tmp, paths):
    (tmp / "docs").mkdir()
    (tmp / "docs" / "keep.txt").write_text("mine")
    return _adapt(paths, tmp / "docs"), tmp / "docs", "is not a previous mergelab output"


CASES = [v for k, v in sorted(globals().items()) if k.startswith("_case_")]


@pytest.mark.parametrize("case", CASES, ids=lambda f: f.__name__.removeprefix("_case_"))
def test_force_refuses_what_is_not_a_previous_output(case, inputs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "work")
    args, victim, message = case(tmp_path, inputs)
    kept = {p: _files(p) for p in (victim, inputs["store"], *inputs["adapters"], inputs["base"])}
    assert kept[victim], "the case must put files at risk"
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), repr(result.exception)
    assert {p: _files(p) for p in kept} == kept, "a refused --force changed files"


def test_force_replaces_a_previous_output_and_removes_leftovers_of_killed_writes(inputs, tmp_path):
    """A previous output is replaced; a ``.out.*`` leftover of a killed write goes with the next write,
    one that a live writer holds stays."""
    import fcntl

    out = tmp_path / "merged"
    first = runner.invoke(app, [str(a) for a in _merge(inputs, out)])
    assert first.exit_code == 0, first.output
    (out / "stale.txt").write_text("from the first write")
    dead, live = tmp_path / ".merged.k1ll3d_x", tmp_path / ".merged.l1v3wr1t"
    for leftover in (dead, live):
        leftover.mkdir()
        (leftover / "adapter_model.safetensors").write_bytes(b"half")
        os.utime(leftover, (time.time() - 60, time.time() - 60))
    held = os.open(live, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        again = runner.invoke(app, [str(a) for a in _merge(inputs, out)])
    finally:
        os.close(held)
    assert again.exit_code == 0, again.output
    assert not (out / "stale.txt").exists() and (out / "merge.json").is_file()
    assert not dead.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")) == [live.name]


def test_store_gc_removes_leftover_output_writes_in_the_store(tmp_path):
    from mergelab.store import Store

    store = Store(tmp_path / "s")
    key = store.put_json(store.key("kept", "1"), {"a": 1})
    leftover = tmp_path / "s" / ".merged.abcd1234"
    leftover.mkdir()
    (leftover / "merge.json").write_text("{}")
    os.utime(leftover, (time.time() - 60, time.time() - 60))
    result = runner.invoke(app, ["store", "gc", "--store", str(tmp_path / "s")])
    assert result.exit_code == 0 and ".merged.abcd1234" in result.stdout, result.output
    assert not leftover.exists() and Store(tmp_path / "s").exists(key)
