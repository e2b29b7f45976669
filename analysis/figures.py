"""Figure builders for the weight-only analyses: one function per paper figure (a figure is a function of Datasets).

Each function takes a Dataset produced by :mod:`mergelab.analysis` (read back from the store or
computed in place) and returns a :class:`matplotlib.figure.Figure` built without pyplot state,
titled with what it shows, the paper figure it redraws and the dataset it was computed on
(``ds.attrs["dataset"]``: the micro benchmark, real checkpoints, …). Paper tables are
``*_table`` functions returning a :class:`pandas.DataFrame` whose ``attrs["dataset"]`` carries
that label. Nothing here computes a statistic: the numbers come from the Dataset.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import seaborn as sns
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mergelab_figures.style import PaperFigure, palette

__all__ = [
    "core_truncation_curves",
    "cosine_heatmap",
    "coverage_erank",
    "energy_rank_per_task",
    "energy_rank_table",
    "merged_cosines",
    "merged_rank_summary",
    "merged_rank_table",
    "operation_count_curves",
    "reference_basis_errors",
    "reference_basis_table",
    "sar_bars",
    "sar_heatmap",
    "similarity_across_lambda",
    "singular_spectra",
    "task_vector_norms",
    "task_vector_norms_per_layer",
    "task_vector_norms_per_layer_table",
    "uniform_energy_rank",
]

UNLABELLED = "unlabelled data"


#: How a model-dependent analysis' loss ``attrs["objective"]`` reads in a caption.
OBJECTIVES = {"labels": "loss: cross-entropy on val labels", "entropy": "loss: prediction entropy (label-free)"}


def dataset_label(ds: xr.Dataset) -> str:
    """What the figure was computed on: ``ds.attrs["dataset"]`` (set by the producer or the flow),
    and the loss it was measured with where the analysis has one (``attrs["objective"]``)."""
    label = str(ds.attrs.get("dataset") or UNLABELLED)
    objective = OBJECTIVES.get(str(ds.attrs.get("objective", "")))
    return f"{label}; {objective}" if objective else label


def _strings(values) -> list[str]:
    """Labels as Python strings (coords read back from Zarr v3 are numpy StringDType)."""
    return [str(v) for v in np.asarray(values).ravel()]


def _figure(ds: xr.Dataset, title: str, paper: str, *, ncols: int = 1, nrows: int = 1,
            panel: tuple[float, float] = (4.2, 3.2)) -> tuple[Figure, np.ndarray]:
    fig = PaperFigure(figsize=(panel[0] * ncols, panel[1] * nrows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    fig.suptitle(f"{title} ({paper})\ncomputed on: {dataset_label(ds)}", fontsize=10)
    return fig, axes


def _note(fig: Figure, text: str) -> None:
    """Add a last line to the figure's title: what the reader must know to read it (a degenerate case)."""
    title = fig._suptitle  # the Text matplotlib keeps; get_suptitle() gives only its string
    fig.suptitle(f"{title.get_text()}\nnote: {text}", fontsize=title.get_fontsize())


def _unique_legend(fig: Figure, axes, **where) -> None:
    """One legend, outside the panels (``where``: ``fig.legend`` placement, default to the right of
    the panels, centred beside them, clear of the figure title), for panels that share their series
    (the first handle of each label wins)."""
    seen: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    fig.legend(list(seen.values()), list(seen), **{"loc": "outside right center", **where}, fontsize=7, frameon=False)


def _module_label(ds: xr.Dataset, module: str) -> str:
    row = ds.sel(module=module)
    return f"layer {int(row.layer)} {row.kind.item()}"


def _per_layer(da: xr.DataArray) -> pd.DataFrame:
    """A module-indexed DataArray as a tidy frame with ``layer`` and ``kind`` columns (mean over duplicates)."""
    frame = da.to_dataframe(name="value").reset_index()
    keys = [c for c in frame.columns if c not in ("value", "module")]
    return frame.groupby(keys, as_index=False)["value"].mean()


# 001: subspace coverage -----------------------------------------------------------------------


def coverage_erank(ds: xr.Dataset, kinds: Sequence[str] | None = None) -> Figure:
    """Effective rank across layers, one panel per module kind (001 Fig. 1 for one kind, Fig. 5 for all).

    Three curves per panel: the per-task sum, the Rank-1 stack (LoRA-aware) and the ΔW stack
    (LoRA-agnostic), from :func:`mergelab.analysis.coverage.subspace_coverage`.
    """
    kinds = list(kinds) if kinds is not None else list(dict.fromkeys(ds.kind.values.tolist()))
    fig, axes = _figure(ds, "Effective rank across layers", "001 Figs. 1, 5", ncols=len(kinds))
    curves = {"per-task sum": "erank_per_task_sum", "Rank-1 stack (LoRA-aware)": "erank_aware",
              "ΔW stack (LoRA-agnostic)": "erank_agnostic"}
    for ax, kind in zip(axes, kinds):
        sub = ds.isel(module=np.flatnonzero(np.array(_strings(ds.kind.values)) == kind))
        for label, var in curves.items():
            frame = _per_layer(sub[var].reset_coords("kind", drop=True))
            ax.plot(frame["layer"], frame["value"], marker="o", label=label)
        ax.set(title=kind, xlabel="layer", ylabel="erank")
    _unique_legend(fig, axes)  # the panels share their three curves
    return fig


# 002: energy ranks -------------------------------------------------------------------------------


def _default_mlp_modules(ds: xr.Dataset) -> list[str]:
    """The first and the last MLP module (002 Fig. 3 uses the first and last MLP layer), else first/last module."""
    modules = pd.DataFrame({"module": _strings(ds.module.values), "layer": ds.layer.values, "kind": _strings(ds.kind.values)})
    mlp = modules[modules["kind"].str.startswith("mlp")]
    pool = (mlp if len(mlp) else modules).sort_values("layer", kind="stable")
    return list(dict.fromkeys([pool["module"].iloc[0], pool["module"].iloc[-1]]))


def uniform_energy_rank(ds: xr.Dataset, modules: Sequence[str] | None = None) -> int | None:
    """The one 95 %-energy rank every task has in ``modules`` (default: the two 002 Fig. 3 draws), or
    None when they differ. On low-rank LoRA updates (the demo's rank 4) every component carries
    energy, so every bar of 002 Fig. 3 is the rank and the figure shows nothing to compare."""
    modules = list(modules) if modules is not None else _default_mlp_modules(ds)
    values = np.unique(ds.energy_rank.sel(module=modules).values)
    return int(values[0]) if values.size == 1 else None


def energy_rank_per_task(ds: xr.Dataset, modules: Sequence[str] | None = None) -> Figure:
    """Rank keeping 95 % of each task vector's energy, per task, for selected modules (002 Fig. 3).

    When every bar has the same height (:func:`uniform_energy_rank`) the title says so: the figure
    then cannot show 002's finding that the rank differs across tasks and layers.
    """
    modules = list(modules) if modules is not None else _default_mlp_modules(ds)
    fig, axes = _figure(ds, f"Rank capturing {ds.attrs.get('energy', 0.95):.0%} of the energy", "002 Fig. 3",
                        ncols=len(modules), panel=(max(3.0, 0.55 * ds.sizes["task"] + 1.5), 3.2))
    for ax, module in zip(axes, modules):
        values = ds.energy_rank.sel(module=module)
        sns.barplot(x=_strings(values.task.values), y=values.values, ax=ax, color="C0")
        ax.set(title=_module_label(ds, module), xlabel="task", ylabel="energy rank")
    same = uniform_energy_rank(ds, modules)
    if same is not None:
        _note(fig, f"every task's energy rank is {same} here: each update needs all its components, so there is no spread "
                   "to compare (higher-rank updates show it)")
    return fig


def energy_rank_table(ds: xr.Dataset) -> pd.DataFrame:
    """002 Fig. 3 for every module as a DataFrame: the 95 %-energy rank, rows = module (layer, kind), columns = task.

    From :func:`~mergelab.analysis.coverage.subspace_coverage`; ``frame.attrs`` carries the dataset
    label, the paper reference and the energy threshold.
    """
    frame = ds.energy_rank.transpose("module", "task").to_pandas()
    frame.index = pd.Index([_module_label(ds, m) for m in _strings(frame.index)], name="module")
    frame.columns = pd.Index(_strings(frame.columns), name="task")
    frame.attrs = {"dataset": dataset_label(ds), "paper": "002 Sec. 4, Fig. 3", "energy": float(ds.attrs.get("energy", 0.95))}
    return frame


# 004: norms and cosines --------------------------------------------------------------------------


def task_vector_norms(ds: xr.Dataset) -> Figure:
    """ℓ2 norm of each whole task vector (004 Fig. 5 left, Fig. 12)."""
    fig, (ax,) = _figure(ds, "Task vector norms", "004 Fig. 5 left, Fig. 12", panel=(max(3.0, 0.55 * ds.sizes["task"] + 1.5), 3.2))
    sns.barplot(x=_strings(ds.task.values), y=ds.total_norm.values, ax=ax, color="C0")
    ax.set(xlabel="task", ylabel="‖τ_t‖₂")
    return fig


def _norms_per_layer(ds: xr.Dataset) -> xr.DataArray:
    """‖τ_t^l‖₂: the norm of all of a layer's parameters concatenated (004 App. G), dims (task, layer)."""
    return np.sqrt((ds.norm**2).groupby("layer").sum())


def task_vector_norms_per_layer(ds: xr.Dataset) -> Figure:
    """Task vector norm per layer (all parameters of a layer concatenated), per task and mean ± std (004 Fig. 13)."""
    per_layer = _norms_per_layer(ds)  # (task, layer)
    fig, (ax,) = _figure(ds, "Task vector norms per layer", "004 Fig. 13", panel=(5.5, 3.4))
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
    frame = pd.DataFrame(per_layer.values, index=pd.Index(_strings(per_layer.task.values), name="task"), columns=columns)
    frame["Avg."] = frame.mean(axis=1)
    frame.attrs = {"dataset": dataset_label(ds), "paper": "004 App. G, Tab. 3"}
    return frame


def _turned(labels: Sequence[str]) -> float:
    """Inches of height that column labels turned by 40° under a heatmap take beyond level ones."""
    return 0.06 * max(map(len, labels), default=0)


def _heatmap(ax: Axes, frame: pd.DataFrame, vmin: float, vmax: float, cmap: str, label: str) -> None:
    """A seaborn heatmap with every row and column labelled, row labels level and column labels
    level unless they crowd (then :func:`~mergelab_figures.style.tidy` turns them; seaborn's
    vertical labels ran into the axis label and the figure title)."""
    sns.heatmap(frame, ax=ax, vmin=vmin, vmax=vmax, cmap=cmap, annot=frame.shape[0] * frame.shape[1] <= 144,
                fmt=".2f", square=True, cbar_kws={"label": label}, annot_kws={"fontsize": 7}, xticklabels=True, yticklabels=True)
    ax.tick_params(axis="x", rotation=0)
    ax.tick_params(axis="y", rotation=0)


def cosine_heatmap(ds: xr.Dataset) -> Figure:
    """Cosine similarity between whole task vectors and with their sum Σ (004 Fig. 5 middle)."""
    names = _strings(ds.task.values) + ["Σ"]
    n = len(names)
    matrix = np.ones((n, n))
    matrix[:-1, :-1] = ds.cosine_total.values
    matrix[:-1, -1] = matrix[-1, :-1] = ds.cosine_to_sum_total.values
    fig, (ax,) = _figure(ds, "Cosine similarity of task vectors and their sum", "004 Fig. 5 middle",
                         panel=(max(3.6, 0.6 * n + 2.0), max(3.0, 0.5 * n + 1.2) + _turned(names)))
    _heatmap(ax, pd.DataFrame(matrix, index=names, columns=names), -1.0, 1.0, "vlag", "cosine")
    return fig


def similarity_across_lambda(ds: xr.Dataset) -> Figure:
    """Normalised weight-space similarity of the Task Arithmetic merge to each task across λ (004 Fig. 5 right)."""
    fig, (ax,) = _figure(ds, "Merged model vs task vectors across λ", "004 Fig. 5 right", panel=(5.0, 3.4))
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
    frame = pd.DataFrame(values, index=rows, columns=_strings(ds.task.values))
    fig, (ax,) = _figure(ds, "Cosine similarity of merged models and task vectors", "004 Fig. 7",
                         panel=(max(3.6, 0.6 * frame.shape[1] + 0.07 * max(map(len, rows)) + 1.6),
                                max(2.2, 0.5 * frame.shape[0] + 1.4) + _turned(frame.columns)))
    _heatmap(ax, frame, -1.0, 1.0, "vlag", "cosine")
    ax.set(xlabel="task", ylabel="/".join(extra))
    return fig


# 002 / 003: spectra, SAR, merged rank -----------------------------------------------------------


def singular_spectra(ds: xr.Dataset, module: str | None = None) -> Figure:
    """Per-task singular values and cumulative energy of one module's updates (002 Sec. 4, energy threshold 95 %)."""
    module = module or str(ds.module.values[0])
    sub = ds.sel(module=module)
    fig, axes = _figure(ds, f"Singular spectra of task updates, {_module_label(ds, module)}", "002 Sec. 4", ncols=2)
    for task in sub.task.values:
        s = sub.sel(task=task)
        axes[0].semilogy(s.component, s.singular_value, marker=".", label=str(task))
        axes[1].plot(s.component, s.cumulative_energy, marker=".", label=str(task))
    axes[1].axhline(0.95, color="grey", ls="--", lw=0.8, label="95 %")
    axes[0].set(xlabel="component k", ylabel="σ_k")
    axes[1].set(xlabel="component k", ylabel="cumulative energy fraction", ylim=(0, 1.02))
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _unique_legend(fig, axes)  # both panels draw the same tasks
    return fig


def sar_heatmap(ds: xr.Dataset) -> Figure:
    """Mean SAR between each pair of task updates (003 Sec. 5.2; the pairwise map of Marczak et al. 2025, Fig. 3b).

    One panel per space when ``ds`` has a ``space`` dim (:func:`~mergelab.analysis.core_space.sar_by_space`),
    else one panel labelled by the ``space`` attr.
    """
    stacked = "space" in ds.sar_mean.dims
    spaces = _strings(ds.space.values) if stacked else [str(ds.attrs.get("space", "full"))]
    n = ds.sizes["task"]
    fig, axes = _figure(ds, f"Subspace alignment ratio (retained {ds.attrs.get('retained', 0.95)})", "003 Sec. 5.2",
                        ncols=len(spaces), panel=(max(3.6, 0.6 * n + 2.2), max(3.0, 0.5 * n + 1.4) + _turned(_strings(ds.task.values))))
    for ax, space in zip(axes, spaces):
        frame = (ds.sar_mean.sel(space=space) if stacked else ds.sar_mean).to_pandas()
        frame.index, frame.columns = _strings(frame.index), _strings(frame.columns)
        _heatmap(ax, frame, 0.0, 1.0, "rocket_r", "SAR(task | reference)")
        ax.set(title=f"{space} space", xlabel="reference task (subspace)", ylabel="task (projected)")
    return fig


def sar_bars(ds: xr.Dataset, by: str = "space") -> Figure:
    """Average SAR over pairs of distinct tasks, one bar per space (003 Fig. 5).

    ``ds`` is one :func:`~mergelab.analysis.spectra.pairwise_sar` Dataset (one bar, labelled by
    its ``space`` attr) or several concatenated along ``by``.
    """
    da = ds.sar_offdiag_mean
    labels = _strings(da[by].values) if by in da.dims else [str(ds.attrs.get(by, "full"))]
    fig, (ax,) = _figure(ds, "Average SAR between task updates", "003 Fig. 5", panel=(max(3.0, 1.0 * len(labels) + 2.0), 3.2))
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
        fig, (ax,) = _figure(ds, "Rank of the merged update", "003 App. C.2 (Tab. 6)", panel=(5.0, 3.4))
        frame = _per_layer(ds.merged_rank)
        curves: dict[tuple, list[str]] = {}  # kinds of the same rank in every layer are one line (none hides another)
        for kind, part in frame.groupby("kind", sort=False):
            curves.setdefault((tuple(part["layer"]), tuple(part["value"])), []).append(str(kind))
        for (layers, values), kinds in curves.items():
            ax.plot(layers, values, marker="o", label=", ".join(kinds))
        bound = _per_layer(ds.max_rank.reset_coords("kind", drop=True))
        ax.plot(bound["layer"], bound["value"], "k--", lw=0.8, label="min(out, in)")
        ax.set(xlabel="layer", ylabel="r_ΔW")
        ax.legend(fontsize=7)
        return fig
    mean = ds.merged_rank.mean("module").to_dataframe(name="rank").reset_index()
    fig, (ax,) = _figure(ds, "Average rank of merged updates", "003 App. C.2 (Tab. 6)", panel=(5.0, 3.4))
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
    frame.index, frame.columns = _strings(frame.index), _strings(frame.columns)
    frame.index.name, frame.columns.name = "space", "method"
    frame.attrs = {"dataset": dataset_label(ds), "paper": "003 App. C.2 (Tab. 6)",
                   "total_lora_rank": float(ds.total_lora_rank.mean()), "max_rank": float(ds.max_rank.mean())}
    return frame


# 003: Core Space analyses -----------------------------------------------------------------------


def core_truncation_curves(ds: xr.Dataset) -> Figure:
    """Truncating the merged update in full vs Core space (003 Fig. 4, weight-space version).

    Left: relative error of the merge after truncating the fraction ``p`` of its least significant
    singular values, averaged over modules (Fig. 4 plots the accuracy of that merge); right: the
    same against the kept rank. From :func:`~mergelab.analysis.core_space.truncation_curves`.
    """
    fig, axes = _figure(ds, f"Truncation of the {ds.attrs.get('method', 'merged')} update, full vs Core space",
                        "003 Sec. 5.2, Fig. 4", ncols=2)
    error_by_rank = ds.relative_error.mean("module", skipna=True)
    for i, space in enumerate(_strings(ds.space.values)):
        # where the spaces agree (truncating in Core space is lossless up to the core's rank) the later
        # curve's open, wider rings leave the earlier filled markers in sight
        style = {"marker": "o", "markersize": 5 + 3 * i, "markerfacecolor": "none" if i else None, "linestyle": "-" if i == 0 else "--"}
        axes[0].plot(ds["fraction"], ds.truncation_error_mean.sel(space=space), label=f"{space} space", **style)
        axes[1].plot(ds["rank"], error_by_rank.sel(space=space), label=f"{space} space", **style)
    axes[0].set(xlabel="truncated fraction p of dim(Σ)", ylabel="‖ΔW − ΔW_trunc‖_F / ‖ΔW‖_F", ylim=(-0.02, 1.02))
    axes[1].set(xlabel="kept rank k", ylabel="mean relative error", ylim=(-0.02, 1.02))
    _unique_legend(fig, axes)  # both panels draw the same spaces
    return fig


_SPACE_STYLE = {"full": ("-", "o"), "knots": ("--", "s"), "core": (":", "^")}


#: Curves of 003 Fig. 3 closer than this factor at every n are one line on a log axis (under a pixel apart).
SAME_COUNT = 1.05


def _same_curves(ds: xr.Dataset) -> list[list[tuple[str, str]]]:
    """The method × space pairs that have a count, grouped where their curves coincide (:data:`SAME_COUNT`)."""
    groups: list[list[tuple[str, str]]] = []
    for method in _strings(ds.merge_method.values):
        for space in _strings(ds.space.values):
            counts = ds.operations.sel(merge_method=method, space=space).values
            if np.isnan(counts).all():
                continue
            for group in groups:
                first = ds.operations.sel(merge_method=group[0][0], space=group[0][1]).values
                if np.all(np.maximum(counts, first) <= SAME_COUNT * np.minimum(counts, first)):
                    group.append((method, space))
                    break
            else:
                groups.append([(method, space)])
    return groups


def operation_count_curves(ds: xr.Dataset) -> Figure:
    """Operations to merge ``T`` rank-``r`` LoRA modules of shape ``n × n`` per method and space (003 Fig. 3).

    One line per method × space that 003 App. B gives a count for (log-log; colour: method, line and
    marker: space), from :func:`~mergelab.analysis.complexity.operation_counts` at the study's ``T``
    and rank; the legend gives each count at the task set's own shapes. Curves within
    :data:`SAME_COUNT` of each other at every ``n`` (Iso-C and Task Arithmetic in Core space: the
    core's SVD is negligible) are one line with one legend entry naming each, so that no curve
    hides under another.
    """
    T, r = int(ds.attrs["tasks"]), int(ds.attrs["rank"])
    fig, axes = _figure(ds, f"Operations to merge T = {T} rank-{r} LoRA modules of shape n × n", "003 Sec. 4.3, App. B, Fig. 3",
                        panel=(8.4, 3.8))  # the legend takes a third of the width
    ax, colors = axes[0], palette(_strings(ds.merge_method.values))
    for group in _same_curves(ds):
        method, space = group[0]
        own = " / ".join(f"{float(ds.operations_taskset.sel(merge_method=m, space=s)):.2g}" for m, s in group)
        names = " = ".join(f"{m}, {s}" for m, s in group)
        line, marker = _SPACE_STYLE.get(space, ("-", "."))
        ax.plot(ds["n"], ds.operations.sel(merge_method=method, space=space), color=colors[method], linestyle=line, marker=marker,
                label=f"{names} ({own} here)")
    ax.set(xscale="log", yscale="log", xlabel="n (module width)", ylabel="operations (sum of 003 App. B's steps)")
    ax.legend(fontsize=7, title=f"method, space (this task set's {ds.attrs['modules']} modules)", title_fontsize=7)
    return fig


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
    :func:`~mergelab.analysis.core_space.reference_basis_ablation`; ``frame.attrs`` carries the
    dataset label.
    """
    bases = _strings(ds.basis.values)
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
    fig, axes = _figure(ds, "Choice of the reference basis", "003 Sec. 5.2, Tab. 5", ncols=2, panel=(4.6, 3.4))
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
