"""One store (issue 34, item 2): every command run from the checkout defaults to the demo's store,
``data/store``, wherever the working directory is, and says which store it uses in its first line."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import save_file
from typer.testing import CliRunner

import mergelab.store
from conftest import REPO
from mergelab_app.cli import app
from mergelab.config import load_study
from mergelab.store import checkout_store, default_store_url  # the real one: conftest points it away during tests

runner = CliRunner()


def test_the_commands_and_every_shipped_study_share_the_checkouts_store(tmp_path, monkeypatch):
    monkeypatch.setattr(mergelab.store, "checkout_store", checkout_store)
    monkeypatch.delenv("MERGELAB_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    demo = REPO / "data" / "store"
    assert default_store_url() == str(demo)
    studies = [REPO / "studies" / "micro.yaml", *sorted((REPO / "studies" / "papers").glob("*.yaml"))]
    assert {Path(load_study(path).store_url()).resolve() for path in studies} == {demo}
    monkeypatch.setenv("MERGELAB_STORE", "memory://mine")
    assert default_store_url() == "memory://mine" and load_study(studies[0]).store_url() == "memory://mine"


def test_outside_a_checkout_the_default_is_the_users_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("MERGELAB_STORE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert mergelab.store.checkout_store() is None  # what conftest makes of this process: an installed package
    assert default_store_url() == str(tmp_path / "cache" / "mergelab" / "store")


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A checkout store of this test's own, the default of every command below."""
    store = tmp_path / "checkout" / "data" / "store"
    monkeypatch.setattr(mergelab.store, "checkout_store", lambda: store)
    monkeypatch.delenv("MERGELAB_STORE", raising=False)
    return store


@pytest.mark.parametrize("args", [["store", "verify"], ["store", "gc", "--dry-run"], ["report", "--study", "nothing-run"]])
def test_a_command_names_its_default_store_in_its_first_line(checkout, args):
    result = runner.invoke(app, args)
    assert result.stdout.splitlines()[0] == f"store {checkout}", result.output


def test_merge_names_the_store_first_and_records_its_configuration_there(checkout, vit_adapters, tiny_vit, tmp_path):
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vit.state_dict().items()}, str(base))
    result = runner.invoke(app, ["merge", "--base", str(base), "--adapters", *map(str, vit_adapters[:2]), "--method",
                                 "task_arithmetic", "--space", "core", "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"store {checkout}" and lines[-1].endswith(f"in {checkout}")
    assert mergelab.store.Store(checkout).ls()[0].kind == "json"
