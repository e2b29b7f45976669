"""Figures of the spectra Datasets (:mod:`mergelab.analysis.spectra`: the ``spectra``, ``sar`` and
``merged_rank`` analyses, and the same variables stacked along ``space`` / ``merge_method`` by
:mod:`mergelab.analysis.core_space`'s ``sar_spaces`` and ``merged_rank_spaces``): singular spectra of
task updates (002 Sec. 4), subspace alignment ratios (003 Sec. 5.2, Fig. 5) and the rank of merged
updates (003 App. C.2, Tab. 6).

Figures start from :func:`mergelab_figures.style.paper_figure`; tables are DataFrames whose
``attrs["dataset"]`` carries the dataset label. Nothing here computes a statistic: the numbers come
from the Dataset.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mergelab_figures.style import dataset_label, heatmap, module_label, paper_figure, per_layer, strings, turned, unique_legend

__all__ = ["merged_rank_summary", "merged_rank_table", "sar_bars", "sar_heatmap", "singular_spectra"]


# 002 / 003: spectra, SAR, merged rank -------------------------------------------------------------


def singular_spectra(ds: xr.Dataset, module: str | None = None) -> Figure:
    """Per-task singular values and cumulative energy of one module's updates (002 Sec. 4, energy threshold 95 %)."""
    module = module or str(ds.module.values[0])
    sub = ds.sel(module=module)
    fig, axes = paper_figure(ds, f"Singular spectra of task updates, {module_label(ds, module)}", "002 Sec. 4", ncols=2)
    for task in sub.task.values:
        s = sub.sel(task=task)
        axes[0].semilogy(s.component, s.singular_value, marker=".", label=str(task))
        axes[1].plot(s.component, s.cumulative_energy, marker=".", label=str(task))
    axes[1].axhline(0.95, color="grey", ls="--", lw=0.8, label="95 %")
    axes[0].set(xlabel="component k", ylabel="σ_k")
    axes[1].set(xlabel="component k", ylabel="cumulative energy fraction", ylim=(0, 1.02))
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    unique_legend(fig, axes)  # both panels draw the same tasks
    return fig


def sar_heatmap(ds: xr.Dataset) -> Figure:
    """Mean SAR between each pair of task updates (003 Sec. 5.2; the pairwise map of Marczak et al. 2025, Fig. 3b).

    One panel per space when ``ds`` has a ``space`` dim (:func:`~mergelab.analysis.core_space.sar_by_space`),
    else one panel labelled by the ``space`` attr.
    """
    stacked = "space" in ds.sar_mean.dims
    spaces = strings(ds.space.values) if stacked else [str(ds.attrs.get("space", "full"))]
    n = ds.sizes["task"]
    fig, axes = paper_figure(ds, f"Subspace alignment ratio (retained {ds.attrs.get('retained', 0.95)})", "003 Sec. 5.2",
                             ncols=len(spaces), panel=(max(3.6, 0.6 * n + 2.2), max(3.0, 0.5 * n + 1.4) + turned(strings(ds.task.values))))
    for ax, space in zip(axes, spaces):
        frame = (ds.sar_mean.sel(space=space) if stacked else ds.sar_mean).to_pandas()
        frame.index, frame.columns = strings(frame.index), strings(frame.columns)
        heatmap(ax, frame, 0.0, 1.0, "rocket_r", "SAR(task | reference)")
        ax.set(title=f"{space} space", xlabel="reference task (subspace)", ylabel="task (projected)")
    return fig


def sar_bars(ds: xr.Dataset, by: str = "space") -> Figure:
    """Average SAR over pairs of distinct tasks, one bar per space (003 Fig. 5).

    ``ds`` is one :func:`~mergelab.analysis.spectra.pairwise_sar` Dataset (one bar, labelled by
    its ``space`` attr) or several concatenated along ``by``.
    """
    da = ds.sar_offdiag_mean
    labels = strings(da[by].values) if by in da.dims else [str(ds.attrs.get(by, "full"))]
    fig, (ax,) = paper_figure(ds, "Average SAR between task updates", "003 Fig. 5", panel=(max(3.0, 1.0 * len(labels) + 2.0), 3.2))
    sns.barplot(x=labels, y=np.atleast_1d(da.values), ax=ax, color="C0")
    ax.set(xlabel=by, ylabel="mean SAR (task ≠ reference)", ylim=(0, 1))
    return fig


def merged_rank_summary(ds: xr.Dataset) -> Figure:
    """Rank of merged updates (003 App. C.2, Tab. 6 as a figure).

    A single :func:`~mergelab.analysis.spectra.merged_rank` Dataset is drawn per layer and module
    kind against ``min(out, in)``; Datasets stacked along extra dims (``method``, ``space``) as the
    mean rank over modules per combination, as in Tab. 6.
    """
    extra = [d for d in ds.merged_rank.dims if d != "module"]
    if not extra:
        fig, (ax,) = paper_figure(ds, "Rank of the merged update", "003 App. C.2 (Tab. 6)", panel=(5.0, 3.4))
        frame = per_layer(ds.merged_rank)
        curves: dict[tuple, list[str]] = {}  # kinds of the same rank in every layer are one line (none hides another)
        for kind, part in frame.groupby("kind", sort=False):
            curves.setdefault((tuple(part["layer"]), tuple(part["value"])), []).append(str(kind))
        for (layers, values), kinds in curves.items():
            ax.plot(layers, values, marker="o", label=", ".join(kinds))
        bound = per_layer(ds.max_rank.reset_coords("kind", drop=True))
        ax.plot(bound["layer"], bound["value"], "k--", lw=0.8, label="min(out, in)")
        ax.set(xlabel="layer", ylabel="r_ΔW")
        ax.legend(fontsize=7)
        return fig
    mean = ds.merged_rank.mean("module").to_dataframe(name="rank").reset_index()
    fig, (ax,) = paper_figure(ds, "Average rank of merged updates", "003 App. C.2 (Tab. 6)", panel=(5.0, 3.4))
    sns.barplot(data=mean, x=extra[0], y="rank", hue=extra[1] if len(extra) > 1 else None, ax=ax)
    ax.axhline(float(ds.max_rank.mean()), color="k", ls="--", lw=0.8, label="min(out, in)")
    if "total_lora_rank" in ds:
        ax.axhline(float(ds.total_lora_rank.mean()), color="grey", ls=":", lw=1.0, label="Σ_t r_t")
    ax.set(ylabel="mean r_ΔW over modules")
    ax.legend(fontsize=7)
    return fig


def merged_rank_table(ds: xr.Dataset) -> pd.DataFrame:
    """003 Tab. 6 as a DataFrame: mean rank of the merged update over modules, rows = space, columns = method.

    From :func:`~mergelab.analysis.core_space.merged_rank_grid`; ``frame.attrs`` carries the
    dataset label, the paper reference and ``Σ_t r_t`` / ``min(out, in)`` (averaged over modules).
    """
    frame = ds.merged_rank.mean("module").transpose("space", "merge_method").to_pandas()
    frame.index, frame.columns = strings(frame.index), strings(frame.columns)
    frame.index.name, frame.columns.name = "space", "method"
    frame.attrs = {"dataset": dataset_label(ds), "paper": "003 App. C.2 (Tab. 6)",
                   "total_lora_rank": float(ds.total_lora_rank.mean()), "max_rank": float(ds.max_rank.mean())}
    return frame
