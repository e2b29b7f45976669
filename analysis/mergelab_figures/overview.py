"""Figures of a study's results Dataset (``studies/<name>/results``): the overview notebook's.

The results hold ``score(method, space, config, task, metric, seed)`` with the configuration the
study selected marked in ``selected`` (schema: docs/store.md, "Study results"). These functions
draw the selected configurations; nothing here computes a metric. The papers' tables of the same
numbers are :mod:`mergelab_figures.tables`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from mergelab_figures.style import PALETTE, PaperFigure, palette
from mergelab_figures.tables import selected_scores

from mergelab.study import results_table as _results_table

__all__ = ["accuracy_vs_merge_time", "gains_with_intervals", "has_intervals", "has_tas", "normalized_accuracy_by_task",
           "results_table", "tas_against_performance"]


def results_table(ds: xr.Dataset) -> pd.DataFrame:
    """The selected configuration of every method × space, with the zero-shot and fine-tuned rows."""
    return _results_table(ds)


def _selected(ds: xr.Dataset, metric: str) -> pd.DataFrame:
    """Tidy rows (method, space, task, value) of ``metric`` at the selected configurations (seed mean)."""
    tasks = list(ds.attrs["tasks"])
    picked = selected_scores(ds, tasks, metric)
    frame = picked.to_dataframe(name="value").reset_index().rename(columns={"merge_method": "method"})
    frame = frame[["method", "space", "task", "value"]].dropna()
    for column in ("method", "space", "task"):
        frame[column] = frame[column].astype(str)
    return frame


def _title(ds: xr.Dataset, what: str, paper: str) -> str:
    return f"{what} ({paper})\n{ds.attrs.get('note', '')}; study {ds.attrs.get('study', '?')}"


def normalized_accuracy_by_task(ds: xr.Dataset) -> Figure:
    """Per-task normalised test accuracy of each method's selected configuration, one panel per space."""
    frame = _selected(ds, "norm_acc")
    frame["value"] *= 100
    spaces = list(dict.fromkeys(frame["space"]))
    methods = sorted(frame["method"].unique())  # every panel has every row (blank where a method skips a space)
    fig = PaperFigure(figsize=(4.8 * len(spaces), 0.35 * len(methods) + 2.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(spaces), sharey=True, squeeze=False)).ravel()
    for ax, space in zip(axes, spaces, strict=True):
        table = frame[frame["space"] == space].pivot(index="method", columns="task", values="value").reindex(methods)
        sns.heatmap(table, ax=ax, annot=True, fmt=".0f", vmin=0, vmax=110, cmap="viridis", cbar=ax is axes[-1],
                    cbar_kws={"label": "normalised accuracy (%)"}, xticklabels=True, yticklabels=True)  # every row and column named
        ax.tick_params(axis="x", rotation=0)  # level, or turned by 40° by the figure style where they crowd (not upright)
        ax.tick_params(axis="y", rotation=0, left=ax is axes[0])
        ax.set_title(f"{space} space")
        ax.set(xlabel="", ylabel="method" if ax is axes[0] else "")
    fig.suptitle(_title(ds, "normalised accuracy per task", "003 Tab. 3 layout"), fontsize=10)
    return fig


#: Marker shapes crossed with the palette's hues: neighbouring methods differ in both.
MARKERS = "os^DvP<X>p"


def _method_style(methods: list[str]) -> tuple[dict[str, str], dict[str, tuple[float, float, float]]]:
    """A distinct (marker, colour) pair per method: marker and hue both step with the method's index
    (10 markers × 10 hues, 10 apart in the pairing so that no two of the first 100 methods share both)."""
    markers = {m: MARKERS[(i + i // len(MARKERS)) % len(MARKERS)] for i, m in enumerate(methods)}
    return markers, palette(methods)


def accuracy_vs_merge_time(ds: xr.Dataset) -> Figure:
    """Mean normalised accuracy against merge wall time on a log scale, one panel per space, each
    method a colour × marker pair (003 Fig. 1). Markers are open rings drawn a method at a time, so
    methods of nearly the same time and accuracy (the static merges of a small benchmark) stay
    visible where they overlap."""
    accuracy = _selected(ds, "norm_acc").groupby(["method", "space"], as_index=False)["value"].mean()
    seconds = ds["merge_seconds"].where(ds["selected"]).max("config").mean("seed")
    times = seconds.to_dataframe(name="seconds").reset_index().rename(columns={"merge_method": "method"})
    times = times[["method", "space", "seconds"]].dropna()
    times[["method", "space"]] = times[["method", "space"]].astype(str)
    frame = accuracy.merge(times, on=["method", "space"])
    frame["value"] *= 100
    spaces = list(dict.fromkeys(frame["space"]))
    methods = sorted(frame["method"].unique())
    markers, colours = _method_style(methods)
    fig = PaperFigure(figsize=(3.6 * len(spaces) + 2.4, 4.0), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(spaces), sharex=True, sharey=True, squeeze=False)).ravel()
    for ax, space in zip(axes, spaces, strict=True):
        for method, point in frame[frame["space"] == space].groupby("method", sort=True):
            ax.scatter(point["seconds"], point["value"], marker=markers[method], s=50, facecolors="none", edgecolors=[colours[method]],
                       linewidths=1.4, label=method)
        ax.set_xscale("log")
        ax.set(title=f"{space} space", xlabel="merge wall time (s, log scale)", ylabel="mean normalised accuracy (%)")
    handles = [Line2D([], [], linestyle="", marker=markers[m], markerfacecolor="none", markeredgewidth=1.4, color=colours[m], label=m)
               for m in methods]
    fig.legend(handles=handles, loc="outside right upper", fontsize=7, frameon=False, title="method")
    fig.suptitle(_title(ds, "accuracy against merge time", "003 Fig. 1"), fontsize=10)
    return fig


def has_intervals(ds: xr.Dataset) -> bool:
    """Whether the results carry paired bootstrap intervals (``gain_ci``, results version 7)."""
    return "gain_ci" in ds and bool(ds["gain_ci"].notnull().any())


def gains_with_intervals(ds: xr.Dataset) -> Figure:
    """Each selected method × space's gain in mean normalised test accuracy over task arithmetic and
    over the zero-shot model (points), with the 95 % paired bootstrap interval as an error bar
    (``gain_ci``, first seed); a bar that does not cross 0 is a significant gap."""
    tasks = list(ds.attrs["tasks"])
    seed = ds.seed.values[0]
    norm = ds["score"].sel(task=tasks, metric="norm_acc", seed=seed).where(ds["selected"].sel(seed=seed)).max("config").mean("task")
    zero = float((ds["reference_score"].sel(reference="zeroshot", metric="acc", task=tasks)
                  / ds["reference_score"].sel(reference="finetuned", metric="acc", task=tasks)).mean())
    ta = float(norm.sel(merge_method="task_arithmetic", space="full")) if "task_arithmetic" in ds.merge_method.values else np.nan
    rows = [(f"{m} ({sp})", float(norm.sel(merge_method=m, space=sp)), ds["gain_ci"].sel(merge_method=m, space=sp, seed=seed))
            for m in ds.merge_method.values for sp in ds.space.values if not np.isnan(float(norm.sel(merge_method=m, space=sp)))]
    rows.sort(key=lambda r: r[1])
    fig = PaperFigure(figsize=(9.0, 0.28 * len(rows) + 1.8), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, versus, baseline in zip(axes, ("task_arithmetic", "zeroshot"), (ta, zero), strict=True):
        y = np.arange(len(rows))
        gain = np.array([100 * (value - baseline) for _, value, _ in rows])
        low = np.array([100 * float(ci.sel(versus=versus, bound="low")) for *_, ci in rows])
        high = np.array([100 * float(ci.sel(versus=versus, bound="high")) for *_, ci in rows])
        significant = (low > 0) | (high < 0)
        ax.errorbar(gain, y, xerr=np.vstack([gain - low, high - gain]), fmt="none", ecolor="0.4", capsize=2, linewidth=1)
        ax.scatter(gain, y, c=[PALETTE[0] if s else "0.6" for s in significant], s=18, zorder=3)
        ax.axvline(0, color="0.3", linestyle=":", linewidth=1)
        ax.set(xlabel=f"gain over {'task arithmetic' if versus == 'task_arithmetic' else 'zero-shot'} (points)",
               title=f"vs {'task arithmetic' if versus == 'task_arithmetic' else 'zero-shot'}")
    axes[0].set_yticks(np.arange(len(rows)), [r[0] for r in rows], fontsize=7)
    fig.suptitle(_title(ds, "gains with 95 % paired bootstrap intervals (coloured: significant)", "test split"), fontsize=10)
    return fig


def _per_configuration(ds: xr.Dataset) -> pd.DataFrame:
    """Tidy rows (method, space, config, tas, value): every evaluated configuration's mean TAS over
    tasks (val, 004 Eq. 2) and mean normalised test accuracy (%), seed means; NaN rows dropped."""
    tasks = list(ds.attrs["tasks"])
    mean = ds["score"].sel(task=tasks).mean("task", skipna=False).mean("seed")
    frame = xr.Dataset({"tas": mean.sel(metric="tas", drop=True), "value": 100 * mean.sel(metric="norm_acc", drop=True)})
    frame = frame.to_dataframe().reset_index().rename(columns={"merge_method": "method"}).dropna(subset=["tas", "value"])
    frame[["method", "space", "config"]] = frame[["method", "space", "config"]].astype(str)
    frame["run"] = frame["method"] + " (" + frame["space"] + ")"
    return frame[["method", "space", "config", "run", "tas", "value"]]


def tas_against_performance(ds: xr.Dataset) -> Figure:
    """004 Fig. 4. Left: every evaluated configuration of every method × space, its mean
    normalised test accuracy against its mean TAS on val (Spearman ρ in the title). Right: the
    configuration of lowest mean TAS against the best one by test accuracy, per method × space with
    at least two configurations (on ``y = x``: TAS picked the best)."""
    frame = _per_configuration(ds)
    runs = list(dict.fromkeys(frame.sort_values(["method", "space"])["run"]))
    markers, colours = _method_style(runs)
    fig = PaperFigure(figsize=(10.5, 4.4), layout="constrained")
    left, right = fig.subplots(1, 2)
    sns.scatterplot(frame, x="tas", y="value", hue="run", style="run", palette=colours, markers=markers, hue_order=runs,
                    style_order=runs, s=28, ax=left, legend=False)
    rho = frame["tas"].corr(frame["value"], method="spearman")
    left.set(xlabel="mean TAS (val; lower: closer to the fine-tuned models)", ylabel="mean normalised accuracy (%, test)",
             title=f"every configuration (Spearman ρ = {rho:.2f})")
    picks = []
    for run, group in frame.groupby("run", sort=False):
        if len(group) > 1:
            picks.append({"run": run, "best": group["value"].max(), "tas": group.loc[group["tas"].idxmin(), "value"]})
    picks = pd.DataFrame(picks, columns=["run", "best", "tas"])
    for _, row in picks.iterrows():
        right.scatter(row["best"], row["tas"], marker=markers[row["run"]], color=colours[row["run"]], s=40)
    if len(picks):
        lo, hi = float(picks[["best", "tas"]].min().min()) - 2, float(picks[["best", "tas"]].max().max()) + 2
        right.plot([lo, hi], [lo, hi], color="0.5", linestyle=":", linewidth=1)
    right.set(xlabel="best configuration (%, test)", ylabel="TAS-selected configuration (%, test)",
              title="selected by TAS vs best")
    handles = [Line2D([], [], linestyle="", marker=markers[r], color=colours[r], label=r) for r in runs]
    fig.legend(handles=handles, loc="outside right upper", fontsize=7, frameon=False, title="method (space)")
    fig.suptitle(_title(ds, "TAS as a proxy of normalised accuracy", "004 Fig. 4"), fontsize=10)
    return fig


def has_tas(ds: xr.Dataset) -> bool:
    """Whether the study's evaluations recorded TAS (every evaluation since evaluate version 2)."""
    return "tas" in [str(m) for m in ds.metric.values] and bool(ds["score"].sel(metric="tas").notnull().any())
