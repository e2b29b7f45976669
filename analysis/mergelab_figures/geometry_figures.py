"""Figures of the task-vector geometry Datasets (:mod:`mergelab.analysis.geometry`: the ``norms``,
``cosine``, ``lambda_similarity`` and ``merged_similarity`` analyses): norms per task and per layer
(004 Fig. 5 left, Figs. 12-13, Tab. 3), cosines between task vectors and with merges (004 Fig. 5
middle, Fig. 7), similarity of the merge across λ (004 Fig. 5 right).

Figures start from :func:`mergelab_figures.style.paper_figure`; tables are DataFrames whose
``attrs["dataset"]`` carries the dataset label. Nothing here computes a statistic beyond
concatenating a layer's parameters (the norm of a layer from its modules' norms, 004 App. G).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns
import xarray as xr
from matplotlib.figure import Figure

from mergelab_figures.style import dataset_label, heatmap, paper_figure, strings, turned

__all__ = ["cosine_heatmap", "merged_cosines", "similarity_across_lambda", "task_vector_norms", "task_vector_norms_per_layer",
           "task_vector_norms_per_layer_table"]


# 004: norms ---------------------------------------------------------------------------------------


def task_vector_norms(ds: xr.Dataset) -> Figure:
    """ℓ2 norm of each whole task vector (004 Fig. 5 left, Fig. 12)."""
    fig, (ax,) = paper_figure(ds, "Task vector norms", "004 Fig. 5 left, Fig. 12", panel=(max(3.0, 0.55 * ds.sizes["task"] + 1.5), 3.2))
    sns.barplot(x=strings(ds.task.values), y=ds.total_norm.values, ax=ax, color="C0")
    ax.set(xlabel="task", ylabel="‖τ_t‖₂")
    return fig


def _norms_per_layer(ds: xr.Dataset) -> xr.DataArray:
    """‖τ_t^l‖₂: the norm of all of a layer's parameters concatenated (004 App. G), dims (task, layer)."""
    return np.sqrt((ds.norm**2).groupby("layer").sum())


def task_vector_norms_per_layer(ds: xr.Dataset) -> Figure:
    """Task vector norm per layer (all parameters of a layer concatenated), per task and mean ± std (004 Fig. 13)."""
    per_layer = _norms_per_layer(ds)  # (task, layer)
    fig, (ax,) = paper_figure(ds, "Task vector norms per layer", "004 Fig. 13", panel=(5.5, 3.4))
    for task in per_layer.task.values:
        ax.plot(per_layer.layer, per_layer.sel(task=task), marker=".", alpha=0.7, label=str(task))
    ax.errorbar(per_layer.layer, per_layer.mean("task"), yerr=per_layer.std("task"), color="k", capsize=3, label="mean ± std")
    ax.set(xlabel="layer (-1: outside the blocks)", ylabel="‖τ_t^l‖₂")
    ax.legend(fontsize=7, ncols=2)
    return fig


def task_vector_norms_per_layer_table(ds: xr.Dataset) -> pd.DataFrame:
    """004 Tab. 3 as a DataFrame: task vector norm per layer, rows = task, columns = ``Layer-i`` and ``Avg.``.

    Block ``i`` (0-based ``layer`` coordinate) is column ``Layer-{i+1}`` as in the paper; parameters
    outside the numbered blocks (``layer = -1``) are one column ``outside blocks``. ``Avg.`` is
    the mean over the columns. From :func:`~mergelab.analysis.geometry.norms`.
    """
    per_layer = _norms_per_layer(ds).transpose("task", "layer")
    columns = ["outside blocks" if int(layer) < 0 else f"Layer-{int(layer) + 1}" for layer in per_layer.layer.values]
    frame = pd.DataFrame(per_layer.values, index=pd.Index(strings(per_layer.task.values), name="task"), columns=columns)
    frame["Avg."] = frame.mean(axis=1)
    frame.attrs = {"dataset": dataset_label(ds), "paper": "004 App. G, Tab. 3"}
    return frame


# 004: cosines -------------------------------------------------------------------------------------


def cosine_heatmap(ds: xr.Dataset) -> Figure:
    """Cosine similarity between whole task vectors and with their sum Σ (004 Fig. 5 middle)."""
    names = strings(ds.task.values) + ["Σ"]
    n = len(names)
    matrix = np.ones((n, n))
    matrix[:-1, :-1] = ds.cosine_total.values
    matrix[:-1, -1] = matrix[-1, :-1] = ds.cosine_to_sum_total.values
    fig, (ax,) = paper_figure(ds, "Cosine similarity of task vectors and their sum", "004 Fig. 5 middle",
                              panel=(max(3.6, 0.6 * n + 2.0), max(3.0, 0.5 * n + 1.2) + turned(names)))
    heatmap(ax, pd.DataFrame(matrix, index=names, columns=names), -1.0, 1.0, "vlag", "cosine")
    return fig


def similarity_across_lambda(ds: xr.Dataset) -> Figure:
    """Normalised weight-space similarity of the Task Arithmetic merge to each task across λ (004 Fig. 5 right)."""
    fig, (ax,) = paper_figure(ds, "Merged model vs task vectors across λ", "004 Fig. 5 right", panel=(5.0, 3.4))
    for task in ds.task.values:
        ax.plot(ds.lam, ds.normalized_similarity_total.sel(task=task), marker="o", label=str(task))
    ax.axhline(0.0, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="λ", ylabel="1 − ‖θ_merged − θ_t‖ / ‖τ_t‖")
    ax.legend(fontsize=8)
    return fig


def merged_cosines(ds: xr.Dataset, by: str | None = None) -> Figure:
    """Cosine similarity of merged models with each task vector (004 Fig. 7).

    ``ds`` is a :func:`~mergelab.analysis.geometry.merged_similarity` Dataset, or several
    stacked along further dimensions (a study stacks ``merge_method`` and ``space``): one row per
    merge that exists, labelled ``method/space``, ``by`` first; a single merge is one row
    labelled by its method.
    """
    cos = ds.cosine_total
    extra = sorted((d for d in cos.dims if d != "task"), key=lambda d: (d != by, d != "merge_method"))
    if not extra:
        rows = [str(ds.attrs.get("merge_meta", {}).get("method", "merged"))]
        values = cos.values[None, :]
    else:
        stacked = cos.stack(row=extra).transpose("row", "task").dropna("row", how="all")
        rows = ["/".join(map(str, r)) if isinstance(r, tuple) else str(r) for r in stacked.row.values]
        values = stacked.values
    frame = pd.DataFrame(values, index=rows, columns=strings(ds.task.values))
    fig, (ax,) = paper_figure(ds, "Cosine similarity of merged models and task vectors", "004 Fig. 7",
                              panel=(max(3.6, 0.6 * frame.shape[1] + 0.07 * max(map(len, rows)) + 1.6),
                                     max(2.2, 0.5 * frame.shape[0] + 1.4) + turned(frame.columns)))
    heatmap(ax, frame, -1.0, 1.0, "vlag", "cosine")
    ax.set(xlabel="task", ylabel="/".join(extra))
    return fig
