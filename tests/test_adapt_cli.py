"""``mergelab adapt``: one adaptive run on the micro benchmark's unlabeled val split, cached, written as an adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import REPO
from mergelab.checkpoints import load_taskset
from mergelab_app.cli import app
from mergelab.store import Store

MICRO = REPO / "data" / "micro"
TASKS = ("digits", "textures")
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def adapt(tmp_path: Path, *extra: str):
    args = ["adapt", "--base", MICRO / "base", "--adapters", *(f"{t}={MICRO / 'adapters' / 'r4' / t}" for t in TASKS),
            "--iters", "3", "--batch-size", "4", "--store", tmp_path / "store", *extra]
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def test_adapt_writes_the_adapted_merge_and_caches_the_run(tmp_path):
    result = adapt(tmp_path, "--method", "tara_a", "--preference", "0.7,0.3", "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    assert "adapted now" in result.stdout and "mean" in result.stdout and "(PEFT adapter)" in result.stdout
    store = Store(str(tmp_path / "store"))
    (ref,) = [r for r in store.refs() if "/adapt/" in r]
    history = store.get_dataset(store.ref(ref))
    assert history.sizes["iteration"] == 3 and history.attrs["method"] == "tara_a"
    results = store.get_dataset(store.ref(ref.replace("adapt/tara_a", "results")))
    assert list(results.merge_method.values) == ["tara_a"] and list(results.attrs["tasks"]) == list(TASKS)
    # The written adapter is the adapted update, in the user's parameter names (loadable like the inputs).
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    written = load_taskset(MICRO / "base", [tmp_path / "a"]).tasks[0]
    inputs = load_taskset(MICRO / "base", [MICRO / "adapters" / "r4" / t for t in TASKS])
    assert set(written.modules) == set(inputs.module_names)
    # Its card (issue 33 item 2): the inputs' hashes, the settings, the scores per task and the command.
    card = (tmp_path / "a" / "README.md").read_text()
    assert all(f"`{t.content_hash}`" in card for t in inputs) and "adaptive method: `tara_a`" in card
    assert all(f"| {t} | " in card for t in TASKS) and "mergelab adapt " in card and "--preference 0.7,0.3" in card
    # Rerunning the same command computes nothing and writes the same update.
    again = adapt(tmp_path, "--method", "tara_a", "--preference", "0.7,0.3", "--out", tmp_path / "a", "--force")
    assert again.exit_code == 0 and "cached run" in again.stdout
    assert load_taskset(MICRO / "base", [tmp_path / "a"]).tasks[0].content_hash == written.content_hash


def test_adapt_shows_where_it_started(tmp_path):
    """Issue 34 item 5: the table puts each score beside its starting merge's. TARA-A starts at
    φ = 0.4 on every direction, which is task arithmetic with λ = 0.4 (001 Eq. 7), evaluated alike."""
    from mergelab.onbench import adapt_adapters, merge_adapters

    sources = [f"{t}={MICRO / 'adapters' / 'r4' / t}" for t in TASKS]
    result = adapt(tmp_path, "--method", "tara_a", "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    assert "start init=0.4 → adapted" in result.stdout and " → " in result.stdout.split("mean")[-1]
    adapted, _, _ = adapt_adapters(sources, str(MICRO / "base"), {"method": "tara_a", "iters": 3, "batch_size": 4},
                                   out=tmp_path / "b", store=str(tmp_path / "store"))
    assert not adapted.computed and adapted.start_config == {"init": 0.4}
    ta = merge_adapters(sources, str(MICRO / "base"), "task_arithmetic", "core", out=tmp_path / "ta", select="val", grid={"alpha": [0.4]},
                        store=str(tmp_path / "store"))
    for task in TASKS:
        assert float(adapted.start.sel(task=task, metric="acc")) == pytest.approx(ta.selection.scores[task]["acc"], abs=1e-9)
        assert float(adapted.start.sel(task=task, metric="norm_acc")) == pytest.approx(ta.selection.scores[task]["norm_acc"], abs=1e-9)


def test_adapt_in_core_space_with_weights_output(tmp_path):
    result = adapt(tmp_path, "--method", "tara_b", "--set", "space=core", "--out", tmp_path / "w", "--format", "weights")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "w" / "model.safetensors").is_file() and "(merged weights)" in result.stdout


@pytest.mark.parametrize(("extra", "message"), [
    (["--method", "tara_c"], "unknown adaptive method 'tara_c'; allowed: adamerging"),
    (["--method", "tara_a", "--preference", "half,half"], "--preference 'half,half' is not comma-separated numbers"),
    (["--method", "tara_a", "--objective", "labels"], "set allow_labels: true"),
    (["--method", "tara_a", "--preference", "0.9,0.3"], "simplex"),
    (["--method", "tara_a", "--adapters", f"mnist={MICRO / 'adapters' / 'r4' / 'digits'}"], "'mnist' is not a task of the micro"),
])
def test_bad_adapt_input_is_one_line(tmp_path, extra, message):
    result = adapt(tmp_path, *extra, "--out", tmp_path / "x")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "x").exists()
