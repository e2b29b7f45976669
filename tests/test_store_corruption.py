"""The store's tools on the corruption they exist to report (issue 30, item 4): ``verify`` reports
every damaged entry (exit 1), ``ls`` skips it with one warning line, ``gc`` removes it; an
unreadable ``objects/`` or a read-only store is one line, never a traceback; ``--lease`` is a
finite number of seconds."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import fsspec.implementations.local as local
import pytest
from typer.testing import CliRunner

from mergelab_app.cli import app
from mergelab.store import Store
from mergelab.store_format import MARKER
from mergelab.upkeep import verify

runner = CliRunner()


def run(*args):
    """The command's result, asserted free of tracebacks (CliRunner keeps an uncaught exception in
    ``result.exception`` with exit code 1, which ``verify`` also uses)."""
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    return result


def _marker(store: Store, key: str, value) -> str:
    Path(store._marker(key)).write_text(json.dumps(value))
    return key


def _damaged_object(store: Store, producer: str, marker) -> str:
    """A published JSON artifact whose marker is then replaced by ``marker``."""
    return _marker(store, store.put_json(store.key(producer, "1"), {"v": 1}), marker)


def _damage_unknown_kind(store):
    marker = json.loads(Path(store._marker(key := store.put_json(store.key("k", "1"), {"v": 1}))).read_text())
    return _marker(store, key, {**marker, "kind": "pickle"}), "unknown kind 'pickle'"


def _damage_marker_is_a_list(store):
    return _damaged_object(store, "l", ["json"]), "not a JSON object (a list)"


def _damage_marker_is_a_number(store):
    return _damaged_object(store, "n", 7), "not a JSON object (a int)"


def _damage_marker_is_a_string(store):
    return _damaged_object(store, "s", "json"), "not a JSON object (a str)"


def _damage_marker_without_kind(store):
    return _damaged_object(store, "w", {"token": "abc"}), "names no kind"


def _damage_token_leaves_the_object(store):
    marker = json.loads(Path(store._marker(key := store.put_json(store.key("t", "1"), {"v": 1}))).read_text())
    return _marker(store, key, {**marker, "token": "../../refs"}), "is not a payload folder name"


def _damage_attrs_not_a_mapping(store):
    marker = json.loads(Path(store._marker(key := store.put_json(store.key("a", "1"), {"v": 1}))).read_text())
    return _marker(store, key, {**marker, "attrs": [1, 2]}), "field 'attrs' has the wrong type"


def _damage_marker_not_utf8(store):
    key = store.put_json(store.key("u", "1"), {"v": 1})
    Path(store._marker(key)).write_bytes(b"\xff\xfe{")
    return key, "not readable JSON"


def _damage_object_is_a_file(store):
    (Path(store.root) / "objects" / f"json-{'0123' * 8}").write_text("not a folder")
    return f"json-{'0123' * 8}", "a file where an object's folder belongs"


def _damage_marker_is_a_fifo(store):
    """Reading it would block forever (issue 30 probe: ls and verify hung)."""
    key = store.put_json(store.key("f", "1"), {"v": 1})
    Path(store._marker(key)).unlink()
    os.mkfifo(store._marker(key))
    return key, "not a regular file"


OBJECT_DAMAGE = [v for k, v in sorted(globals().items()) if k.startswith("_damage_")]


def _damage_broken_ref(store):
    (Path(store.root) / "refs").mkdir(exist_ok=True)
    (Path(store.root) / "refs" / "studies-x.json").write_text("[1]")
    return "refs/studies-x.json", "not a ref"


def _damage_ref_links_to_an_endless_file(store):
    (Path(store.root) / "refs").mkdir(exist_ok=True)
    (Path(store.root) / "refs" / "studies-z.json").symlink_to("/dev/zero")
    return "refs/studies-z.json", "not a ref"


DAMAGE = [*OBJECT_DAMAGE, _damage_broken_ref, _damage_ref_links_to_an_endless_file]
ids = lambda f: f.__name__.removeprefix("_damage_")  # noqa: E731


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "s")
    s.put_json(s.key("good", "1"), {"ok": True})
    return s


def _good(store: Store) -> str:
    return store.key("good", "1")


@pytest.mark.parametrize("damage", DAMAGE, ids=ids)
def test_verify_reports_every_damaged_entry(damage, store):
    entry, problem = damage(store)
    result = run("store", "verify", "--store", store.url)
    assert result.exit_code == 1, result.output
    [line] = [ln for ln in result.stdout.splitlines() if ln.startswith(f"{entry}:")]
    assert problem in line
    assert result.stdout.strip().endswith("1 corrupt artifacts")


@pytest.mark.parametrize("damage", OBJECT_DAMAGE, ids=ids)
def test_verify_quarantine_moves_a_damaged_object_out_of_the_way(damage, store):
    entry, _ = damage(store)
    assert run("store", "verify", "--store", store.url, "--quarantine").exit_code == 1
    assert not (Path(store.root) / "objects" / entry).exists()
    again = run("store", "verify", "--store", store.url)
    assert again.exit_code == 0, again.output
    assert Store(store.url).get_json(_good(store)) == {"ok": True}


def test_verify_reports_a_ref_whose_artifact_is_gone_and_the_refs_of_what_it_quarantines(store):
    """A ref naming a key that is no longer published (its object deleted by hand, or quarantined by
    verify itself) is reported: loading the name fails until its study runs again (issue 30, probe 652)."""
    gone = store.put_json(store.key("gone", "1"), {"x": 1})
    store.set_ref("studies/s/gone", gone)
    store.set_ref("studies/s/good", _good(store))
    shutil.rmtree(Path(store.root) / "objects" / gone)
    result = run("store", "verify", "--store", store.url)
    assert result.exit_code == 1, result.output
    assert f"refs/studies/s/gone.json: names {gone}, which is not published" in result.stdout
    assert "studies/s/good" not in result.stdout and result.stdout.strip().endswith("1 corrupt artifacts")

    flipped = store.put_json(store.key("flipped", "1"), {"y": 2})
    store.set_ref("studies/t/flipped", flipped)
    (Path(store.root) / "objects" / flipped / MARKER).write_text("{not json")
    assert [entry for entry, _ in verify(store)] == [flipped, "refs/studies/s/gone.json"]  # the damaged key once
    assert [entry for entry, _ in verify(store, quarantine=True)] == [flipped, "refs/studies/s/gone.json", "refs/studies/t/flipped.json"]


@pytest.mark.parametrize("damage", DAMAGE, ids=ids)
def test_ls_skips_a_damaged_entry_with_one_warning(damage, store):
    entry, problem = damage(store)
    result = run("store", "ls", "--store", store.url, "--json")
    assert result.exit_code == 0, result.output
    assert [a["key"] for a in json.loads(result.stdout)] == [_good(store)]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: skipped {entry}: ") and problem in lines[0], result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("damage", OBJECT_DAMAGE, ids=ids)
def test_gc_removes_a_damaged_object(damage, store):
    entry, _ = damage(store)
    kept = run("store", "gc", "--store", store.url)  # younger than the lease: kept (it may be a live write)
    assert kept.exit_code == 0 and (Path(store.root) / "objects" / entry).exists(), kept.output
    result = run("store", "gc", "--store", store.url, "--lease", "0")
    assert result.exit_code == 0, result.output
    assert entry in result.stdout.split() and not (Path(store.root) / "objects" / entry).exists()
    assert Store(store.url).get_json(_good(store)) == {"ok": True}
    assert "Traceback" not in result.output


def _unreadable_objects(monkeypatch, store):
    objects = f"{store.root}/objects"
    real = local.LocalFileSystem.ls

    def ls(self, path, detail=False, **kwargs):
        if str(path).rstrip("/") == objects:
            raise PermissionError(13, "Permission denied", objects)
        return real(self, path, detail=detail, **kwargs)

    monkeypatch.setattr(local.LocalFileSystem, "ls", ls)


@pytest.mark.parametrize("command", [["ls"], ["ls", "--json"], ["gc"], ["gc", "--lease", "0"], ["verify"], ["verify", "--quarantine"]])
def test_an_unreadable_objects_folder_is_one_line(command, store, monkeypatch):
    _unreadable_objects(monkeypatch, store)
    result = run("store", *command, "--store", store.url)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "objects cannot be read (Permission denied)" in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_gc_on_a_read_only_store_reports_what_it_could_not_remove(store, monkeypatch):
    doomed = _damaged_object(store, "doomed", ["json"])
    leftover = f"{store.key('left', '1')}.{'0' * 12}"
    (Path(store.root) / "staging" / leftover).mkdir(parents=True)

    def rm(self, path, recursive=False, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(local.LocalFileSystem, "rm", rm)
    result = run("store", "gc", "--store", store.url, "--lease", "0")
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not remove 2 entries") and "Permission denied" in lines[0], result.stderr
    assert "Traceback" not in result.output and "removed 0 entries" in result.stdout
    assert (Path(store.root) / "objects" / doomed / MARKER).exists() and (Path(store.root) / "staging" / leftover).exists()


def test_an_unreadable_object_folder_is_reported_by_every_tool(store, monkeypatch):
    """What ``chmod 000 objects/<key>`` does (simulated: the tests may run as root, whom permissions do not stop)."""
    key = store.put_json(store.key("locked", "1"), {"v": 1})
    inside = f"{store.root}/objects/{key}/"

    def refuse(name):
        real = getattr(local.LocalFileSystem, name)

        def method(self, path, *args, **kwargs):
            if str(path).startswith(inside):
                raise PermissionError(13, "Permission denied", path)
            if name in ("find", "ls", "rm") and str(path).rstrip("/") == inside.rstrip("/"):  # listing it is refused
                raise PermissionError(13, "Permission denied", path)
            return real(self, path, *args, **kwargs)

        monkeypatch.setattr(local.LocalFileSystem, name, method)

    for name in ("cat_file", "find", "ls", "info", "rm"):
        refuse(name)
    listed = run("store", "ls", "--store", store.url, "--json")
    assert listed.exit_code == 0 and [a["key"] for a in json.loads(listed.stdout)] == [_good(store)]
    assert listed.stderr.strip() == f"warning: skipped {key}: marker cannot be read (Permission denied) (mergelab store verify reports it)"
    checked = run("store", "verify", "--store", store.url)
    assert checked.exit_code == 1 and f"{key}: marker cannot be read (Permission denied)" in checked.stdout
    cleaned = run("store", "gc", "--store", store.url, "--lease", "0")
    assert cleaned.exit_code == 1 and cleaned.stderr.startswith(f"error: could not remove 1 entries of {store.url} (first: {key}: Permission denied)")
    monkeypatch.undo()
    assert Store(store.url).get_json(key) == {"v": 1} and Store(store.url).get_json(_good(store)) == {"ok": True}


@pytest.mark.parametrize("lease", ["nan", "inf", "-inf", "-1"])
def test_lease_must_be_a_finite_number_of_seconds(lease, store):
    result = run("store", "gc", "--store", store.url, f"--lease={lease}")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --lease {float(lease)} is not a number of seconds"), result.stderr
    assert Store(store.url).exists(_good(store))


@pytest.mark.parametrize("entries", [["45/0123abcd", "pack/pack-1.idx", "info/packs"], ["thesis/chapter1.tex"]],
                         ids=["git-objects", "a-user-folder"])
@pytest.mark.parametrize("keep", [False, True])
def test_gc_refuses_a_folder_that_is_not_a_store(entries, keep, tmp_path):
    """A folder whose ``objects/`` holds no artifact (a git repository's ``.git``, a user's folder) is
    not a store: gc removes nothing there, even with --lease 0 and an empty --keep (issue 30 probe)."""
    for entry in entries:
        (tmp_path / "objects" / entry).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "objects" / entry).write_text("precious")
    (tmp_path / "keep.txt").write_text("")
    result = run("store", "gc", "--store", tmp_path, "--lease", "0", *(["--keep", tmp_path / "keep.txt"] if keep else []))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not a mergelab store" in lines[0] and "Traceback" not in result.output
    assert all((tmp_path / "objects" / entry).read_text() == "precious" for entry in entries)
