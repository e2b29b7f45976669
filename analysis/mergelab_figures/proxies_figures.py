"""Figures of the Datasets of final-embedding distances between a merge and the fine-tuned models
(:mod:`mergelab.analysis.proxies`; ``needs="bench"``, docs/store.md §7–8): TAS and AdaMMS* across the
merge coefficient (:func:`mergelab.experiments.model_analyses.tas_sweep`, the ``tas_sweep`` analysis;
004 Sec. 3.2 Fig. 3, App. D Fig. 9, App. E Figs. 10–11) and the final-embedding L1 interference (TAS
with ``distance="l1"``: :func:`mergelab.experiments.model_analyses.embedding_interference_by_space`,
the ``embedding_interference`` analysis; 003 App. C.1, Fig. 6).

Every figure starts from :func:`mergelab_figures.style.paper_figure`; tables are DataFrames whose
``attrs["dataset"]`` carries the dataset label. The statistics come from the Dataset; the builders
only rescale curves for display (stated on the axis) and, for the TAS tables, correlate two of the
Dataset's curves over λ.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from mergelab_figures.style import dataset_label, hide_unused, panel_grid, paper_figure, strings

__all__ = ["adamms_vs_tas", "embedding_interference_bars", "tas_correlation_table", "tas_robustness", "tas_selection_table",
           "tas_vs_lambda"]


# 004: TAS and AdaMMS* across λ --------------------------------------------------------------------


def _proxy_coords(ds: xr.Dataset, distance: str | None, n_batches: int | None) -> tuple[str, int]:
    """The distance (default ``l2``, 004's default, else the first) and batch count (default the largest)."""
    distances = strings(ds.distance.values)
    distance = distance or ("l2" if "l2" in distances else distances[0])
    return distance, int(n_batches if n_batches is not None else ds.n_batches.values.max())


def _performance(ds: xr.Dataset) -> tuple[xr.DataArray, str]:
    """Normalised accuracy in % when the fine-tuned accuracies are there (004 plots normalised performance),
    else accuracy in %, with its axis label."""
    eval_split = ds.attrs.get("eval_split", "test")
    if np.isfinite(ds.normalized_accuracy.values).any():
        return 100 * ds.normalized_accuracy, f"normalised accuracy (%, {eval_split})"
    return 100 * ds.accuracy, f"accuracy (%, {eval_split})"


def _has(da: xr.DataArray) -> bool:
    return bool(np.isfinite(da.values).any())


def _corr(x: np.ndarray, y: np.ndarray, method: str = "pearson") -> float:
    """Correlation over the λ grid of two curves (finite points only; NaN below 3 points or for a flat curve)."""
    frame = pd.DataFrame({"x": x, "y": y}).dropna()
    if len(frame) < 3 or frame["x"].nunique() < 2 or frame["y"].nunique() < 2:
        return np.nan
    return float(frame["x"].corr(frame["y"], method=method))


def _scaled(values: np.ndarray) -> np.ndarray:
    """Min-max scaling to [0, 1] (004 App. E, Fig. 11), NaN kept; a flat curve maps to 0."""
    v = np.asarray(values, dtype=np.float64)
    low, high = np.nanmin(v) if np.isfinite(v).any() else 0.0, np.nanmax(v) if np.isfinite(v).any() else 0.0
    return (v - low) / (high - low) if high > low else np.where(np.isfinite(v), 0.0, np.nan)


def _panels(ds: xr.Dataset) -> list[str]:
    return [*strings(ds.task.values), "mean"]


def _task_curve(da: xr.DataArray, panel: str) -> np.ndarray:
    return (da.mean("task") if panel == "mean" else da.sel(task=panel)).values


def tas_correlation_table(ds: xr.Dataset, distance: str | None = None, n_batches: int | None = None) -> pd.DataFrame:
    """How well TAS and AdaMMS* track performance over λ, per task and on average (004 Fig. 3, App. D Fig. 9).

    Rows: each task and ``mean`` (the proxy's task mean against the mean performance); columns:
    Pearson and Spearman correlations of TAS with performance and of AdaMMS* with performance over
    the λ grid (AdaMMS*: interior λ only). Lower TAS is better, so a good proxy correlates
    *negatively*. ``frame.attrs`` carries the dataset label, the distance and the batch count.
    """
    distance, n_batches = _proxy_coords(ds, distance, n_batches)
    perf, perf_label = _performance(ds)
    at = {"distance": distance, "n_batches": n_batches}
    rows = {}
    for panel in _panels(ds):
        y = _task_curve(perf, panel)
        tas = _task_curve(ds.tas.sel(at), panel)
        adamms = _task_curve(ds.adamms.sel(at), panel)
        rows[panel] = {"Pearson r(TAS, perf)": _corr(tas, y), "Spearman ρ(TAS, perf)": _corr(tas, y, "spearman"),
                       "Pearson r(AdaMMS*, perf)": _corr(adamms, y), "Spearman ρ(AdaMMS*, perf)": _corr(adamms, y, "spearman")}
    frame = pd.DataFrame.from_dict(rows, orient="index").rename_axis("task")
    frame.attrs = {"dataset": dataset_label(ds), "paper": "004 Sec. 3.2 (Fig. 3), App. D (Fig. 9)", "distance": distance,
                   "n_batches": n_batches, "performance": perf_label}
    return frame


def tas_selection_table(ds: xr.Dataset) -> pd.DataFrame:
    """λ chosen by TAS and by AdaMMS* against the best λ on evaluation, per distance and batch count (004 Fig. 4 right, App. D–E).

    Columns: the two label-free choices (``selected_lam_*`` of the Dataset), the λ with the best
    mean performance (the evaluation oracle: it reads ``eval_split`` and is a reference, never a
    selection), the mean performance at each (%), and the Pearson correlation of the mean TAS with the
    mean performance over λ. ``frame.attrs`` carries the dataset label.
    """
    perf, perf_label = _performance(ds)
    mean_perf = perf.mean("task")
    has_perf = _has(mean_perf)
    best = float(mean_perf.lam[int(np.nanargmax(mean_perf.values))]) if has_perf else np.nan
    at_lam = lambda lam: float(mean_perf.sel(lam=lam)) if has_perf else np.nan  # noqa: E731
    rows = {}
    for distance in strings(ds.distance.values):
        for n_batches in ds.n_batches.values:
            at = {"distance": distance, "n_batches": n_batches}
            by_tas, by_adamms = float(ds.selected_lam_tas.sel(at)), float(ds.selected_lam_adamms.sel(at))
            rows[(distance, int(n_batches))] = {
                "λ (TAS)": by_tas, "λ (AdaMMS*)": by_adamms, "λ (best on eval)": best,
                "perf @ TAS": at_lam(by_tas), "perf @ AdaMMS*": at_lam(by_adamms), "best perf": at_lam(best) if has_perf else np.nan,
                "Pearson r(TAS, perf)": _corr(ds.tas_mean.sel(at).values, mean_perf.values)}
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index = pd.MultiIndex.from_tuples(frame.index, names=["distance", "n_batches"])
    frame.attrs = {"dataset": dataset_label(ds), "paper": "004 Sec. 3.2 (Fig. 4 right), App. D (Eq. (5)), App. E",
                   "performance": perf_label, "method": ds.attrs.get("method")}
    return frame


def tas_vs_lambda(ds: xr.Dataset, distance: str | None = None, n_batches: int | None = None) -> Figure:
    """TAS and performance against the merge coefficient λ, per task and averaged (004 Sec. 3.2, Fig. 3).

    Left axis: performance (normalised accuracy when available); right axis: TAS (lower is
    better). The dashed line is the λ selected by TAS (``argmin_λ`` of the mean TAS); panel titles
    give the Pearson correlation of TAS with performance over λ (:func:`tas_correlation_table`).
    """
    distance, n_batches = _proxy_coords(ds, distance, n_batches)
    at = {"distance": distance, "n_batches": n_batches}
    perf, perf_label = _performance(ds)
    corr = tas_correlation_table(ds, distance, n_batches)["Pearson r(TAS, perf)"]
    selected = float(ds.selected_lam_tas.sel(at))
    panels = _panels(ds)
    nrows, ncols = panel_grid(len(panels), 4)
    method = ds.attrs.get("method", "merge")
    fig, axes = paper_figure(ds, f"TAS ({distance}, {n_batches} batch(es)) and performance of {method} across λ", "004 Sec. 3.2, Fig. 3",
                             nrows=nrows, ncols=ncols, panel=(3.4, 2.8))
    lam = ds.lam.values
    for ax, panel in zip(axes, panels):
        twin = ax.twinx()
        twin.plot(lam, _task_curve(ds.tas.sel(at), panel), marker="s", color="C1", label="TAS")
        twin.set_ylabel(f"TAS ({distance}), lower = better", color="C1", fontsize=8)
        if _has(perf):
            ax.plot(lam, _task_curve(perf, panel), marker="o", color="C0", label="performance")
        ax.set_ylabel(perf_label, color="C0", fontsize=8)
        ax.axvline(selected, color="k", ls="--", lw=1.0)
        r = corr.loc[panel]
        ax.set_title(f"{panel}" + (f" (r = {r:+.2f})" if np.isfinite(r) else ""), fontsize=9)
        ax.set_xlabel("λ")
    hide_unused(axes, len(panels))
    return fig


def adamms_vs_tas(ds: xr.Dataset, distance: str | None = None, n_batches: int | None = None) -> Figure:
    """AdaMMS* and TAS against λ with the performance they stand in for (004 App. D, Eq. (5), Fig. 9).

    Right axis: TAS and AdaMMS* (no score at the two ends of the grid), each min-max scaled to
    [0, 1] per panel so that their shapes compare; left axis: performance. Vertical lines: the λ
    chosen by TAS (dashed) and by AdaMMS* (dash-dotted), and on the mean panel the best λ on
    evaluation (dotted, the oracle). 004 finds AdaMMS* curves alike across tasks (no task
    information), so it tracks the mean performance better than each task's.
    """
    distance, n_batches = _proxy_coords(ds, distance, n_batches)
    at = {"distance": distance, "n_batches": n_batches}
    perf, perf_label = _performance(ds)
    by_tas, by_adamms = float(ds.selected_lam_tas.sel(at)), float(ds.selected_lam_adamms.sel(at))
    panels = _panels(ds)
    nrows, ncols = panel_grid(len(panels), 4)
    fig, axes = paper_figure(ds, f"AdaMMS* vs TAS ({distance}, {n_batches} batch(es)) across λ", "004 App. D, Fig. 9",
                             nrows=nrows, ncols=ncols, panel=(3.4, 2.8))
    lam = ds.lam.values
    for ax, panel in zip(axes, panels):
        twin = ax.twinx()
        twin.plot(lam, _scaled(_task_curve(ds.tas.sel(at), panel)), marker="s", color="C1", label="TAS")
        twin.plot(lam, _scaled(_task_curve(ds.adamms.sel(at), panel)), marker="^", color="C2", label="AdaMMS*")
        twin.set(ylim=(-0.05, 1.05))
        twin.set_ylabel("proxy, min-max scaled", fontsize=8)
        if _has(perf):
            y = _task_curve(perf, panel)
            ax.plot(lam, y, marker="o", color="k", label="performance")
            if panel == "mean" and np.isfinite(y).any():
                ax.axvline(lam[int(np.nanargmax(y))], color="k", ls=":", lw=1.0, label="best on eval")
        ax.axvline(by_tas, color="C1", ls="--", lw=1.0, label="λ (TAS)")
        ax.axvline(by_adamms, color="C2", ls="-.", lw=1.0, label="λ (AdaMMS*)")
        ax.set_ylabel(perf_label, fontsize=8)
        ax.set(title=panel, xlabel="λ")
        ax.set_zorder(twin.get_zorder() + 1)  # the performance axes (and the legend) above the twin's curves
        ax.patch.set_visible(False)
    ax.legend(handles=ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0], fontsize=6)  # on the mean panel
    hide_unused(axes, len(panels))
    return fig


def tas_robustness(ds: xr.Dataset, distance: str | None = None, n_batches: int | None = None) -> Figure:
    """Mean performance against min-max scaled TAS for each batch count (004 App. E, Fig. 10) and each distance (Fig. 11).

    Left: one curve per batch count at ``distance`` (default ``l2``); right: one curve per distance
    at ``n_batches`` (default the largest). Each point is one λ; 004 finds the curves nearly
    identical, so each later curve's markers are smaller than the one before: coinciding curves
    show as nested markers instead of hiding each other. Without an evaluation axis the scaled TAS
    is drawn against λ instead.
    """
    distance, n_batches = _proxy_coords(ds, distance, n_batches)
    perf, perf_label = _performance(ds)
    mean_perf = perf.mean("task").values
    has_perf = np.isfinite(mean_perf).any()
    fig, axes = paper_figure(ds, "Robustness of TAS to the number of batches and to the distance", "004 App. E, Figs. 10-11",
                             ncols=2, panel=(4.2, 3.2))

    def draw(ax: Axes, curve: np.ndarray, label: str, index: int) -> None:
        scaled = _scaled(curve)
        style = {"marker": "o", "markersize": max(3.0, 9.0 - 3.0 * index), "label": label}
        if has_perf:
            ax.plot(scaled, mean_perf, **style)
        else:
            ax.plot(ds.lam.values, scaled, **style)

    for i, b in enumerate(ds.n_batches.values):
        draw(axes[0], ds.tas_mean.sel(distance=distance, n_batches=b).values, f"{int(b)} batch(es)", i)
    for i, d in enumerate(strings(ds.distance.values)):
        draw(axes[1], ds.tas_mean.sel(distance=d, n_batches=n_batches).values, d, i)
    for ax, title in zip(axes, (f"distance {distance}", f"{n_batches} batch(es)")):
        if has_perf:
            ax.set(xlabel="mean TAS, min-max scaled", ylabel=f"mean {perf_label}".replace(" (", "\n(", 1))
        else:
            ax.set(xlabel="λ", ylabel="mean TAS, min-max scaled")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    return fig


# 003: final-embedding interference ----------------------------------------------------------------


def _merge_label(ds: xr.Dataset) -> str:
    meta = ds.attrs.get("merge_meta") or {}
    method, space = ds.attrs.get("method", meta.get("method", "merged")), ds.attrs.get("space", meta.get("space", "full"))
    return f"{method} ({space} space)"


def embedding_interference_bars(ds: xr.Dataset) -> Figure:
    """Mean L1 distance between the final embeddings of each fine-tuned model and the merged one (003 App. C.1, Fig. 6).

    One group of bars per task plus the task mean; one bar per merge: a single
    :func:`~mergelab.experiments.model_analyses.merged_embedding_interference` Dataset is one bar labelled
    by its method and space, Datasets stacked along ``method`` / ``space`` one bar per combination
    (003 Fig. 6 compares TSV + Iso in full vs Core space). Lower = less interference.
    """
    extra = [d for d in ds.l1_distance.dims if d != "task"]
    per_task = ds.l1_distance.to_dataframe(name="l1").reset_index()
    mean = ds.l1_distance_mean.to_dataframe(name="l1").reset_index() if extra else pd.DataFrame({"l1": [float(ds.l1_distance_mean)]})
    mean["task"] = "mean"
    frame = pd.concat([per_task, mean], ignore_index=True)
    if extra:
        frame["merge"] = frame[extra].astype(str).agg(" / ".join, axis=1)
    else:
        frame["merge"] = _merge_label(ds)
    frame["task"] = frame["task"].astype(str)
    n_groups = ds.sizes["task"] + 1
    fig, (ax,) = paper_figure(ds, "Final-embedding L1 interference", "003 App. C.1, Fig. 6",
                              panel=(max(5.0, 0.5 * n_groups * max(1, frame["merge"].nunique()) + 2.0), 3.4))
    sns.barplot(data=frame, x="task", y="l1", hue="merge", ax=ax)
    ax.set(xlabel="task", ylabel="mean ‖f(x; θ_merged) − f(x; θ_t)‖₁")
    ax.legend(fontsize=7, title=" / ".join(extra) if extra else None)
    return fig
