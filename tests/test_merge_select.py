"""``mergelab merge --select val|tas``: hyper-parameters chosen on the micro benchmark's val split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import REPO
from mergelab_app.cli import app
from mergelab.store import Store

MICRO = REPO / "data" / "micro"
TASKS = ("digits", "textures")
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def select(tmp_path: Path, rule: str, *extra: str):
    args = ["merge", "--base", MICRO / "base", "--adapters", *(f"{t}={MICRO / 'adapters' / 'r4' / t}" for t in TASKS),
            "--method", "task_arithmetic", "--space", "core", "--select", rule, "--grid", "alpha=0.1,1.0",
            "--out", tmp_path / f"out-{rule}", "--force", "--store", tmp_path / "store", *extra]
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result


def record(tmp_path: Path, rule: str) -> dict:
    store = Store(str(tmp_path / "store"))
    configs = [store.get_json(a.key) for a in store.ls() if a.key.startswith("merge.config-")]
    return next(c for c in configs if c.get("selection", {}).get("rule") == rule)


def test_select_val_stores_every_candidate_and_picks_the_best_val_score(tmp_path):
    result = select(tmp_path, "val")
    rec = record(tmp_path, "val")
    store = Store(str(tmp_path / "store"))
    ds = store.get_dataset(store.ref(rec["selection"]["ref"]))
    assert set(ds.config.values) == {"alpha=0.1", "alpha=1.0"} and list(ds.attrs["tasks"]) == list(TASKS)
    val = ds["score"].sel(merge_method="task_arithmetic", space="core", seed=0).sel(task=list(TASKS), metric="val_norm_acc").mean("task")
    best = str(val.config.values[int(np.argmax(val.values))])
    assert rec["selection"]["chosen"] == best and f"({best}, selected by val)" in result.stdout
    # One table style (issue 34 item 5): %, test beside val, the choice marked, the grid's edge flagged.
    test = ds["score"].sel(merge_method="task_arithmetic", space="core", seed=0, config=best).sel(task=list(TASKS), metric="norm_acc")
    assert "val norm acc %" in result.stdout and "test norm acc %" in result.stdout
    assert f"{100 * float(val.sel(config=best)):.1f}" in result.stdout and f"{100 * float(test.mean()):.1f}" in result.stdout
    assert "✓ (edge)" in result.stdout and f"selected {best}, on the edge of its grid in alpha" in result.stdout
    assert rec["selection"]["criterion"] == pytest.approx({str(c): float(v) for c, v in zip(val.config.values, val.values)})
    assert rec["hyper_parameters"]["alpha"] == float(best.split("=")[1])
    assert np.isfinite(ds["score"].sel(task=list(TASKS), metric="acc")).all()  # test scores are recorded, never compared
    # The written adapter is the chosen configuration's merge.
    assert (tmp_path / "out-val" / "adapter_config.json").is_file()
    # Its record and card (issue 33 item 2) hold every candidate's criterion and the chosen one's scores with their interval.
    info = json.loads((tmp_path / "out-val" / "merge.json").read_text())
    card = (tmp_path / "out-val" / "README.md").read_text()
    chosen = ds["score"].sel(merge_method="task_arithmetic", space="core", seed=0, config=best)
    assert info["selection"] == rec["selection"] and info["scores"] == rec["scores"]
    assert info["scores"]["digits"]["acc"] == pytest.approx(float(chosen.sel(task="digits", metric="acc")))
    assert f"Rule `val` chose `{best}`" in card and all(f"| {t} | " in card for t in TASKS)
    assert "zeroshot" in info["intervals"] and "over zeroshot: 95 % paired bootstrap interval" in card
    # A second call evaluates nothing: every node of the selection is a cache hit.
    published = [a.key for a in store.ls()]
    select(tmp_path, "val")
    assert [a.key for a in store.ls()] == published


def test_select_tas_picks_the_lowest_task_alignment_score(tmp_path):
    select(tmp_path, "tas")
    rec = record(tmp_path, "tas")
    criterion = rec["selection"]["criterion"]
    assert rec["selection"]["chosen"] == min(criterion, key=criterion.get)
    assert all(np.isfinite(v) and v > 0 for v in criterion.values())
    meta = json.loads((tmp_path / "out-tas" / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA"


def test_a_study_and_the_commands_share_their_nodes(tmp_path):
    """Issue 34 item 3: a merge, reference, evaluation or adaptive run of the same inputs has the same
    content key whether a study, ``merge --select`` or ``adapt`` asks for it, so the second computes nothing."""
    from mergelab.config import load_study
    from mergelab.study import Run, local_submit, run_graph

    spec = load_study({"name": "shared", "bench": {"kind": "micro", "root": str(MICRO)}, "tasks": list(TASKS),
                       "methods": [{"method": "task_arithmetic", "spaces": ["core"], "grid": {"alpha": [0.1, 1.0]}}],
                       "adaptive": [{"method": "tara_a", "iters": 1, "batch_size": 4}]})
    run_graph(Run(spec, str(tmp_path / "store")), local_submit(Run(spec, str(tmp_path / "store"))))
    store = Store(str(tmp_path / "store"))
    computed = {a.key for a in store.ls()}

    def new() -> set[str]:
        return {k.split("-")[0] for k in {a.key for a in store.ls()} - computed}

    select(tmp_path, "val")
    assert new() == {"results", "merge.config"}  # published, never recomputed: stage, references, merges, evaluations
    adapt = ["adapt", "--base", MICRO / "base", "--adapters", *(f"{t}={MICRO / 'adapters' / 'r4' / t}" for t in TASKS),
             "--method", "tara_a", "--iters", "1", "--batch-size", "4", "--out", tmp_path / "adapted", "--store", tmp_path / "store"]
    result = CliRunner().invoke(app, [str(a) for a in adapt], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert new() == {"results", "merge.config"} and "cached run" in result.stdout
