"""Figures of the Core Space Datasets of 003 Sec. 5.2 (:mod:`mergelab.analysis.core_space`: the
``truncation`` and ``reference_bases`` analyses; their accuracy columns from
:mod:`mergelab.experiments.core_space_accuracy`: ``truncation_accuracy`` and
``reference_basis_accuracy``): truncating a merge in full vs Core space (Fig. 4, by weights and by
accuracy) and the choice of the reference basis (Tab. 5). The SAR and merged-rank Datasets per
space draw in :mod:`mergelab_figures.spectra_figures`.

Figures start from :func:`mergelab_figures.style.paper_figure`; tables are DataFrames whose
``attrs["dataset"]`` carries the dataset label. Nothing here computes a statistic: the numbers come
from the Dataset.
"""

from __future__ import annotations

import pandas as pd
import xarray as xr
from matplotlib.figure import Figure

from mergelab_figures.style import dataset_label, paper_figure, strings, unique_legend

__all__ = ["core_truncation_curves", "reference_basis_accuracy_table", "reference_basis_errors", "reference_basis_table",
           "truncation_accuracy_curves"]


# 003: truncation in full vs Core space ------------------------------------------------------------


def core_truncation_curves(ds: xr.Dataset) -> Figure:
    """Truncating the merged update in full vs Core space (003 Fig. 4, weight-space version).

    Left: relative error of the merge after truncating the fraction ``p`` of its least significant
    singular values, averaged over modules (Fig. 4 plots the accuracy of that merge); right: the
    same against the kept rank. From :func:`~mergelab.analysis.core_space.truncation_curves`.
    """
    fig, axes = paper_figure(ds, f"Truncation of the {ds.attrs.get('method', 'merged')} update, full vs Core space",
                             "003 Sec. 5.2, Fig. 4", ncols=2)
    error_by_rank = ds.relative_error.mean("module", skipna=True)
    for i, space in enumerate(strings(ds.space.values)):
        # where the spaces agree (truncating in Core space is lossless up to the core's rank) the later
        # curve's open, wider rings leave the earlier filled markers in sight
        style = {"marker": "o", "markersize": 5 + 3 * i, "markerfacecolor": "none" if i else None, "linestyle": "-" if i == 0 else "--"}
        axes[0].plot(ds["fraction"], ds.truncation_error_mean.sel(space=space), label=f"{space} space", **style)
        axes[1].plot(ds["rank"], error_by_rank.sel(space=space), label=f"{space} space", **style)
    axes[0].set(xlabel="truncated fraction p of dim(Σ)", ylabel="‖ΔW − ΔW_trunc‖_F / ‖ΔW‖_F", ylim=(-0.02, 1.02))
    axes[1].set(xlabel="kept rank k", ylabel="mean relative error", ylim=(-0.02, 1.02))
    unique_legend(fig, axes)  # both panels draw the same spaces
    return fig


def truncation_accuracy_curves(ds: xr.Dataset) -> Figure:
    """Mean normalised accuracy of the merge truncated by the fraction ``p`` of its least significant
    singular values, full vs Core space (003 Fig. 4), from
    :func:`mergelab.experiments.core_space_accuracy.truncation_accuracy`; the task range shaded."""
    fig, axes = paper_figure(ds, f"Accuracy of the truncated {ds.attrs.get('method', 'merged')} merge by space",
                             "003 Sec. 5.2, Fig. 4", panel=(7.2, 3.6))
    ax = axes[0]
    for space in strings(ds.space.values):
        per_task = 100 * ds.normalized_accuracy.sel(space=space)
        ax.plot(ds["fraction"], 100 * ds.normalized_accuracy_mean.sel(space=space), marker="o", label=f"{space} space")
        ax.fill_between(ds["fraction"], per_task.min("task"), per_task.max("task"), alpha=0.15)
    ax.set(xlabel="truncated fraction p of dim(Σ)", ylabel=f"normalised accuracy (%, {ds.attrs.get('split', 'test')})")
    ax.legend(fontsize=8, title="mean over tasks\n(band: their range)", title_fontsize=7)
    return fig


# 003: the reference basis -------------------------------------------------------------------------


_BASIS_LABELS = {"first_task": "(1) first task", "random_orthonormal": "(2) random orthonormal",
                 "concatenation": "(3) concatenation (Eq. 3)"}


def _basis_shape(side: str, dims: xr.DataArray) -> str:
    low, high = int(dims.min()), int(dims.max())
    return f"{side} × {low}" if low == high else f"{side} × {low}–{high}"


def reference_basis_table(ds: xr.Dataset) -> pd.DataFrame:
    """003 Tab. 5 as a DataFrame, one row per reference basis, without the accuracy column (it needs an evaluation).

    Columns: the basis shapes (``m`` = out, ``n`` = in; the column count, or its range over
    modules), Avg. ε_U and ε_V (over modules and tasks) and the mean relative round-trip errors
    of the task updates and of their Task Arithmetic sum. From
    :func:`~mergelab.analysis.basis_ablation.reference_basis_ablation`; ``frame.attrs`` carries the
    dataset label.
    """
    bases = strings(ds.basis.values)
    frame = pd.DataFrame({
        "Shape U": [_basis_shape("m", ds.basis_dim_U.sel(basis=b)) for b in bases],
        "Shape V": [_basis_shape("n", ds.basis_dim_V.sel(basis=b)) for b in bases],
        "Avg. ε_U": ds.eps_U_mean.values,
        "Avg. ε_V": ds.eps_V_mean.values,
        "Avg. round-trip error": ds.roundtrip_error.mean(("task", "module")).values,
        "TA round-trip error": ds.ta_roundtrip_error.mean("module").values,
    }, index=pd.Index([_BASIS_LABELS.get(b, b) for b in bases], name="reference basis"))
    frame.attrs = {"dataset": dataset_label(ds), "paper": "003 Sec. 5.2 (Tab. 5)"}
    return frame


def reference_basis_errors(ds: xr.Dataset) -> Figure:
    """Alignment errors ε_U, ε_V (003 Eq. 13) and round-trip errors per reference basis (003 Tab. 5 as a figure)."""
    frame = reference_basis_table(ds)
    fig, axes = paper_figure(ds, "Choice of the reference basis", "003 Sec. 5.2, Tab. 5", ncols=2, panel=(4.6, 3.4))
    frame[["Avg. ε_U", "Avg. ε_V"]].plot.bar(ax=axes[0], rot=20)
    axes[0].set(xlabel="", ylabel="mean alignment error (r_t − ‖U_tᵀ U‖²)")
    frame[["Avg. round-trip error", "TA round-trip error"]].plot.bar(ax=axes[1], rot=20)
    axes[1].set(xlabel="", ylabel="relative error through the core", ylim=(0, 1.02))
    for ax in axes:
        for bars in ax.containers:
            ax.bar_label(bars, fmt="%.2g", fontsize=6)  # so that the zeros of the concatenation show
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=7)
    return fig


def reference_basis_accuracy_table(ds: xr.Dataset, errors: xr.Dataset | None = None) -> pd.DataFrame:
    """003 Tab. 5: one row per reference basis, the mean normalised accuracy (%) of the method merged in
    its Core space (:func:`mergelab.experiments.core_space_accuracy.reference_basis_accuracy`) and each
    task's; with ``errors`` (the ``reference_bases`` analysis of the same bases), the basis shapes and
    Avg. ε_U / ε_V before them, as the paper lays the table out."""
    bases = strings(ds.basis.values)
    labels = [_BASIS_LABELS.get(b, b) for b in bases]
    frame = pd.DataFrame({"Avg. norm. acc. (%)": 100 * ds.normalized_accuracy_mean.values}, index=pd.Index(labels, name="reference basis"))
    for task in strings(ds.task.values):
        frame[task] = 100 * ds.normalized_accuracy.sel(task=task).values
    if errors is not None:
        weights = reference_basis_table(errors.sel(basis=bases))
        frame = pd.concat([weights[["Shape U", "Shape V"]], frame, weights[["Avg. ε_U", "Avg. ε_V"]]], axis=1)
    frame.attrs = {"dataset": dataset_label(ds), "paper": "003 Sec. 5.2 (Tab. 5)", "method": ds.attrs.get("method"),
                   "split": ds.attrs.get("split")}
    return frame.round(2)
