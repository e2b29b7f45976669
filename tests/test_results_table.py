"""The results table's grid-edge marks and adaptive |Δcoef| column, on a hand-made results Dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from mergelab.config import config_label
from mergelab.errors import InputError
from mergelab.study import grid_edges, results_table

TASKS = ["a", "b"]
METRICS = ["acc", "norm_acc", "val_acc", "val_norm_acc"]


def _results(val: dict[tuple[str, str], float], delta: dict[str, float] | None = None,
             configured: list[dict] | None = None) -> xr.Dataset:
    """Results of the methods and configurations named in ``val`` (full space), val scores as given;
    ``configured``: the configurations themselves, whose labels ``val`` names (the ``hyper_parameters``
    coordinate, as a study writes it)."""
    delta = delta or {}
    methods, configs = list(dict.fromkeys(m for m, _ in val)), list(dict.fromkeys(c for _, c in val))
    shape = (len(methods), 1, len(configs), len(TASKS), len(METRICS), 1)
    score = np.full(shape, np.nan)
    seconds = np.full((len(methods), 1, len(configs), 1), np.nan)
    change = np.full_like(seconds, np.nan)
    for (method, config), value in val.items():
        i, j = methods.index(method), configs.index(config)
        score[i, 0, j, :, :, 0] = value
        seconds[i, 0, j, 0] = 0.1
        change[i, 0, j, 0] = delta.get(method, np.nan)
    ds = xr.Dataset({"score": (("merge_method", "space", "config", "task", "metric", "seed"), score),
                     "merge_seconds": (("merge_method", "space", "config", "seed"), seconds),
                     "peak_memory_mb": (("merge_method", "space", "config", "seed"), seconds),
                     "mean_abs_delta_coef": (("merge_method", "space", "config", "seed"), change)},
                    coords={"merge_method": methods, "space": ["full"], "config": configs, "task": TASKS, "metric": METRICS, "seed": [0]})
    criterion = ds["score"].sel(metric="val_norm_acc").mean("task")
    ds["selected"] = criterion == criterion.max("config")
    reference = np.full((2, len(TASKS), len(METRICS)), 0.5)
    ds["reference_score"] = (("reference", "task", "metric"), reference)
    ds = ds.assign_coords(reference=["zeroshot", "finetuned"])
    ds.attrs["tasks"] = TASKS
    if configured is not None:
        by_label = {config_label(c): json.dumps(c, sort_keys=True) for c in configured}
        ds = ds.assign_coords(hyper_parameters=("config", [by_label[c] for c in configs]))
    return ds


def test_a_selection_on_the_edge_of_its_grid_is_flagged_and_an_interior_one_is_not():
    ds = _results({("ta", "alpha=0.1"): 0.9, ("ta", "alpha=0.3"): 0.8, ("ta", "alpha=0.5"): 0.7,
                   ("tta", "alpha=0.1"): 0.7, ("tta", "alpha=0.3"): 0.9, ("tta", "alpha=0.5"): 0.8,
                   ("adamerging", "iters=5,lr=0.1"): 0.85}, {"adamerging": 0.02},
                  [{"alpha": 0.1}, {"alpha": 0.3}, {"alpha": 0.5}, {"iters": 5, "lr": 0.1}])
    assert grid_edges(ds) == {("ta", "full", "alpha=0.1"): ["alpha"]}
    table = results_table(ds).set_index("method")
    assert table.loc["ta", "config"] == "alpha=0.1 (edge)"
    assert table.loc["tta", "config"] == "alpha=0.3"
    assert table.loc["adamerging", "|Δcoef|"] == 0.02
    assert np.isnan(table.loc["ta", "|Δcoef|"])


def test_the_edge_check_reads_the_configurations_themselves_not_their_labels():
    """Values whose label would not parse back (a list, a string with ``,`` and ``=``) are read as
    values: the numeric one is checked, the others have no ends; results without the coordinate
    (written before version 8) flag nothing."""
    from mergelab.study.results import hyper_parameters

    configured = [{"alpha": a, "clamp": [0, 1], "tag": "x=1,y=2"} for a in (0.1, 0.3)]
    ds = _results({("ta", config_label(configured[0])): 0.9, ("ta", config_label(configured[1])): 0.8}, configured=configured)
    assert hyper_parameters(ds, config_label(configured[0])) == configured[0]
    assert grid_edges(ds) == {("ta", "full", config_label(configured[0])): ["alpha"]}
    assert grid_edges(ds.drop_vars("hyper_parameters")) == {}
    with pytest.raises(InputError, match="rerun the study"):
        hyper_parameters(ds.drop_vars("hyper_parameters"), config_label(configured[0]))


def test_a_selection_at_the_end_of_the_allowed_range_is_not_an_edge():
    configured = [{"alpha": 1.0, "density": 0.5}, {"alpha": 1.0, "density": 1.0}, {"alpha": 1.5, "density": 1.0},
                  {"alpha": 0.5, "density": 1.0}]
    ds = _results({("ties", config_label(c)): v for c, v in zip(configured, (0.7, 0.9, 0.8, 0.6), strict=True)},
                  configured=configured)
    assert grid_edges(ds) == {}  # density 1 is TIES' upper bound (no trim), α 1.0 is interior


def _printed(ds: xr.Dataset, tmp_path, monkeypatch, width: int) -> str:
    """What ``mergelab run`` prints under a study whose results are ``ds``."""
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from mergelab_app.cli import studies as cli
    from mergelab.store import Store

    ds.attrs.update(note="hand-made numbers", selection="val")
    store = Store(tmp_path / "s")
    key = store.put_dataset(store.key("results", "test"), ds)
    out = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, width=width))
    cli._print_results(SimpleNamespace(name="t"), {"results": key, "store": store.url})
    return out.getvalue()


def test_the_printed_table_fits_80_columns_numbers_configs_and_marks_merges_below_zero_shot(tmp_path, monkeypatch):
    ds = _results({("task_arithmetic", "alpha=0.1,lam=0.25,rank_ratio=0.16,iters=300"): 0.9, ("ties", "alpha=1.0,density=0.5"): 0.3})
    ds["reference_score"].loc[{"reference": "finetuned"}] = 1.0  # zero-shot: 50 % normalised; ties (30 %) is below it
    text = _printed(ds, tmp_path, monkeypatch, width=80)
    assert max(map(len, text.splitlines())) <= 80
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith((" task_arithmetic", " ties"))}
    assert "↓" in rows["ties"] and "↓" not in rows["task_arithmetic"]
    assert "cfg 1: alpha=0.1,lam=0.25,rank_ratio=0.16,iters=300" in text and "cfg 2: alpha=1.0,density=0.5" in text


def test_a_method_whose_selection_metric_is_undefined_is_named_not_silently_dropped(tmp_path, monkeypatch):
    from mergelab.study import unselected

    ds = _results({("task_arithmetic", "alpha=0.3"): 0.9, ("ties", "alpha=1.0"): 0.7})
    ds["score"].loc[{"merge_method": "ties", "metric": "val_norm_acc"}] = np.nan  # a task's fine-tuned val accuracy was 0
    ds["selected"] = ds["selected"] & ds["score"].sel(metric="val_norm_acc").mean("task").notnull()
    ds["reference_score"].loc[{"reference": "finetuned", "task": "b", "metric": "val_acc"}] = 0.0
    assert unselected(ds) == [("ties", "full")]
    assert ("warning: ties/full merged but no configuration could be selected on val (b: fine-tuned val accuracy 0, so "
            "normalised accuracy is undefined)") in _printed(ds, tmp_path, monkeypatch, width=200)


def test_a_method_run_under_several_seeds_reports_its_spread_and_a_deterministic_one_does_not():
    tasks = ["a", "b"]
    score = np.full((2, 1, 1, 2, 2, 3), np.nan)
    score[0, 0, 0, :, :, 0] = 0.7                                         # TA: deterministic, merged under the first seed only
    score[1, 0, 0, :, :, :] = np.array([0.6, 0.7, 0.8])[None, None, :]   # DARE-TIES under seeds 0, 1, 2
    ds = xr.Dataset({"score": (("merge_method", "space", "config", "task", "metric", "seed"), score),
                     "merge_seconds": (("merge_method", "space", "config", "seed"), np.ones((2, 1, 1, 3))),
                     "peak_memory_mb": (("merge_method", "space", "config", "seed"), np.ones((2, 1, 1, 3)))},
                    coords={"merge_method": ["task_arithmetic", "dare_ties"], "space": ["full"], "config": ["alpha=1.0"],
                            "task": tasks, "metric": ["norm_acc", "acc"], "seed": [0, 1, 2]})
    ds["selected"] = ds["score"].sel(metric="norm_acc").mean("task").notnull()
    ds["reference_score"] = (("reference", "task", "metric"), np.full((2, 2, 2), 0.5))
    ds = ds.assign_coords(reference=["zeroshot", "finetuned"])
    ds.attrs["tasks"] = tasks
    table = results_table(ds).set_index("method")
    assert table.loc["dare_ties", "norm_acc"] == pytest.approx(70.0) and table.loc["dare_ties", "sd"] == pytest.approx(100 * np.std([0.6, 0.7, 0.8]))
    assert np.isnan(table.loc["task_arithmetic", "sd"])
