"""Progress outside a terminal (issue 34, item 4): with stderr redirected, ``merge --select`` and
``adapt`` print plain progress lines, ``adapt`` also for the starting point it searches before step 1."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from conftest import REPO
from mergelab_app.cli import app
from mergelab_app.cli.app import milestone

MICRO = REPO / "data" / "micro"
ADAPTERS = [f"{t}={MICRO / 'adapters' / 'r4' / t}" for t in ("digits", "textures")]
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_a_milestone_is_printed_at_every_tenth_and_at_the_end(capsys):
    for done in range(1, 26):
        milestone("merge", done, 25, " nodes")
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"merge: {n}/25 nodes" for n in (*range(2, 25, 2), 25)]


def _run(*args) -> tuple[list[str], str]:
    """``mergelab ARGS`` with stderr captured (not a terminal): its stderr lines and stdout."""
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.stderr.splitlines(), result.stdout


def test_merge_select_prints_plain_progress_lines(tmp_path):
    lines, _ = _run("merge", "--base", MICRO / "base", "--adapters", *ADAPTERS, "--method", "task_arithmetic", "--space", "core",
                    "--select", "val", "--grid", "alpha=0.1,1.0", "--out", tmp_path / "out", "--store", tmp_path / "store")
    progress = [line for line in lines if line.startswith("select task_arithmetic/core: ")]
    assert progress and re.fullmatch(r"select task_arithmetic/core: (\d+)/\1 nodes done \(0 cached\)", progress[-1]), lines


def test_adapt_prints_the_start_search_the_nodes_and_the_steps(tmp_path):
    lines, _ = _run("adapt", "--base", MICRO / "base", "--adapters", *ADAPTERS, "--method", "adarank", "--set", "origin=cart",
                    "--set", "lam=1.0", "--iters", "4", "--batch-size", "4", "--out", tmp_path / "out", "--store", tmp_path / "store")
    start = lines.index("adapt adarank: 4/4 starting points scored on val")  # the rank ratios of 002 App. A, before step 1
    first_step = next(i for i, line in enumerate(lines) if re.fullmatch(r"adapt adarank: 1/4 steps, loss \S+", line))
    assert start < first_step and re.fullmatch(r"adapt adarank: 4/4 steps, loss \S+", lines[first_step + 3])
    assert "adapt adarank: reference zeroshot done" in lines[:start] and any(l.startswith("adapt adarank: adapt ") for l in lines)


def test_a_build_reports_plain_steps_when_its_output_is_not_a_terminal(capsys):
    """build-micro / build-text run for hours: redirected, they print milestone lines (a live bar
    printed nothing until the end)."""
    from mergelab_app.cli.app import PlainProgress, build_progress, console
    from mergelab.micro.build import ticker

    assert isinstance(build_progress(console), PlainProgress)  # pytest captures the output: not a terminal
    tick = ticker(PlainProgress(), "LoRA r4 on digits", 20)
    for _ in range(20):
        tick()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10 and lines[0] == "LoRA r4 on digits: 2/20 steps" and lines[-1] == "LoRA r4 on digits: 20/20 steps"
