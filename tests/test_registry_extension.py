"""A new entry of each registry is one registration and then appears everywhere (issue 14).

A toy merge method, space, adaptive method, analysis and selection rule are registered here (and
removed after); the CLI help lists them, a study naming them validates, the study graph runs them
and the notebooks' results table shows their rows, with no other edit anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import xarray as xr
from torch import Tensor
from typer.testing import CliRunner

from mergelab.config import load_study
from mergelab.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def toy_mean(deltas: Sequence[Tensor], *, alpha: float = 0.5) -> Tensor:
    """The toy merge: ``alpha`` times the mean update."""
    return alpha * torch.stack(list(deltas)).mean(dim=0)


def toy_count(taskset) -> xr.Dataset:
    """The toy analysis: the number of tasks."""
    return xr.Dataset({"tasks": len(taskset.names)})


@pytest.fixture
def toys():
    """Register one toy entry per registry; unregister after the test."""
    from mergelab.adaptation import ADAPTERS, Adapter, build_adamerging
    from mergelab.experiments.registry import ANALYSES, Analysis
    from mergelab.merging import METHODS, MergeMethod
    from mergelab.selection import SELECTION_RULES, SelectionRule
    from mergelab.spaces import SPACES, FullSpace

    @dataclass(frozen=True)
    class Full32(FullSpace):
        """The full space in float32."""

        name: ClassVar[str] = "full32"
        dtype: str = "float32"

    entries = [(METHODS, "toy_mean", MergeMethod(toy_mean, grid={"alpha": (0.5, 1.0)}, inputs="tensors", nonmatrix="self")),
               (SPACES, "full32", Full32()),
               (ADAPTERS, "toy_adapt", Adapter(build_adamerging)),
               (ANALYSES, "toy_count", Analysis("tests.toy_count", toy_count, "1")),
               (SELECTION_RULES, "toy_rule", SelectionRule("val_acc", True, "best mean raw val accuracy (a toy)"))]
    for registry, name, entry in entries:
        registry.register(name, entry)
    yield
    for registry, name, _ in entries:
        del registry[name]


STUDY = {
    "name": "toys",
    "bench": {"kind": "micro", "root": str(REPO / "data/micro"), "rank": 4},
    "tasks": ["digits", "textures"],
    "selection": "toy_rule",
    "methods": [{"method": "toy_mean", "spaces": ["full", "full32"]}, {"method": "toy_mean+iso_c", "spaces": ["full32"],
                                                                       "grid": {"toy_mean.alpha": [1.0]}}],
    "adaptive": [{"method": "toy_adapt", "iters": 1, "batch_size": 4}],
    "analyses": ["toy_count"],
    "joint": False,
}


def test_the_cli_help_lists_every_toy(toys):
    from mergelab_app.cli import app

    runner = CliRunner()

    def shown(*args: str) -> str:  # the help text with its line wrapping undone (where rich wraps depends on the text)
        return " ".join(runner.invoke(app, [*args, "--help"], terminal_width=400).output.replace("│", " ").split())

    merge = shown("merge")
    assert "toy_mean (alpha=0.5)" in merge and "full32" in merge and "toy_rule: best mean raw val accuracy" in merge
    assert "toy_adapt (" in shown("adapt")
    assert "toy_count" in shown("analyze")


def test_a_study_naming_the_toys_validates_and_a_misspelling_lists_them(toys):
    spec = load_study(STUDY)
    assert [m.method for m in spec.methods] == ["toy_mean", "toy_mean+iso_c"] and spec.selection == "toy_rule"
    with pytest.raises(InputError, match="unknown merge method 'toy_men'; allowed: .*toy_mean"):
        load_study({**STUDY, "methods": [{"method": "toy_men"}]})
    with pytest.raises(InputError, match="unknown space 'full23'; allowed: full, knots, core, full32"):
        load_study({**STUDY, "methods": [{"method": "toy_mean", "spaces": ["full23"]}]})
    with pytest.raises(InputError, match="toy_adapt"):
        load_study({**STUDY, "adaptive": [{"method": "toy_adpt"}]})
    with pytest.raises(InputError, match="toy_count"):
        load_study({**STUDY, "analyses": ["toy_cuont"]})
    with pytest.raises(InputError, match="toy_rule"):
        load_study({**STUDY, "selection": "toy_rul"})


def test_the_study_graph_runs_the_toys_and_the_results_table_shows_them(toys, tmp_path, one_thread):
    from mergelab_figures import tables

    from mergelab.store import Store
    from mergelab.study import Run, local_submit, run_graph

    ctx = Run(load_study(STUDY), str(tmp_path / "store"))
    nodes, done = run_graph(ctx, local_submit(ctx))
    store = Store(ctx.store.url)
    results = store.get_dataset(done.key)
    assert list(results.merge_method.values) == ["toy_mean", "toy_mean+iso_c", "toy_adapt"]
    assert {"full", "full32"} <= set(results.space.values) and results["selected"].attrs["rule"] == "toy_rule"
    assert int(store.get_dataset(store.ref("studies/toys/analysis/toy_count"))["tasks"]) == 2
    frame = tables.paper_table(results, delta=None).data
    assert {("toy_mean", "full"), ("toy_mean", "full32"), ("toy_mean+iso_c", "full32"), ("toy_adapt", "full")} <= set(frame.index)
