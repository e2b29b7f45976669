"""Figure builders for the model-dependent analyses (``needs="bench"``; docs/store.md §7–8).

One function per paper figure, as in :mod:`mergelab_figures.figures` (whose helpers they share): the
anisotropy of LoRA directions from :func:`mergelab.experiments.model_analyses.jacobian_anisotropy`
(001 Sec. 2.3, App. E: Figs. 2, 6–9), AdaRank's loss change per singular component from
:func:`mergelab.experiments.model_analyses.component_loss_changes` (002 Sec. 4: Figs. 1–2), TAS and
AdaMMS* across the merge coefficient from :func:`mergelab.experiments.model_analyses.tas_sweep` (004 Sec. 3.2
Fig. 3, App. D Fig. 9, App. E Figs. 10–11) the final-embedding interference from
:func:`mergelab.experiments.model_analyses.merged_embedding_interference` (003 App. C.1, Fig. 6) and
the accuracy of truncated merges and of each reference basis from
:mod:`mergelab.experiments.core_space_accuracy` (003 Sec. 5.2: Fig. 4, Tab. 5).

Every figure is titled with what it shows, the paper figure it redraws and the dataset it was
computed on (``ds.attrs["dataset"]``); tables are DataFrames whose ``attrs["dataset"]`` carries that
label. The statistics come from the Dataset; the builders only average over modules that share a
layer and kind, rescale curves for display (stated on the axis) and, for the TAS tables, correlate
two of the Dataset's curves over λ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import seaborn as sns
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullLocator

from mergelab_figures.figures import (_BASIS_LABELS, _default_mlp_modules, _figure, _heatmap, _module_label, _note, _strings, _unique_legend,
                                      dataset_label, reference_basis_table)

__all__ = [
    "adamms_vs_tas",
    "anisotropy_table",
    "component_loss_table",
    "embedding_interference_bars",
    "jacobian_condition",
    "jacobian_scree",
    "kappa_preferences",
    "loss_change_per_component",
    "loss_change_per_task",
    "reference_basis_accuracy_table",
    "tas_correlation_table",
    "tas_robustness",
    "tas_selection_table",
    "tas_vs_lambda",
    "truncation_accuracy_curves",
    "xi_heatmap",
]

#: Module kinds in the order the papers lay them out (001 Figs. 6–9: q, k, v, out).
KIND_ORDER = ("q", "k", "v", "qkv", "out", "mlp_in", "mlp_out", "other")
BASIS_LABELS = {"raw": "RAW (rank-1 LoRA factors)", "svd": "SVD (shared orthonormal)"}


def _kinds(ds: xr.Dataset) -> list[str]:
    present = list(dict.fromkeys(_strings(ds.kind.values)))
    return [k for k in KIND_ORDER if k in present] + [k for k in present if k not in KIND_ORDER]


def _ordered_modules(ds: xr.Dataset, modules: Sequence[str] | None = None) -> list[str]:
    """Modules by layer, then kind in :data:`KIND_ORDER` (the layer × kind grid of 001 App. E)."""
    rank = {k: i for i, k in enumerate(_kinds(ds))}
    frame = pd.DataFrame({"module": _strings(ds.module.values), "layer": ds.layer.values,
                          "kind": [rank[k] for k in _strings(ds.kind.values)]})
    if modules is not None:
        frame = frame[frame["module"].isin(list(modules))]
    return frame.sort_values(["layer", "kind"], kind="stable")["module"].tolist()


def _layer_curve(da: xr.DataArray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """``(layers, values)`` of a module-indexed DataArray for one kind (mean over modules sharing a layer)."""
    frame = pd.DataFrame({"layer": da.layer.values, "kind": _strings(da.kind.values), "value": da.values})
    part = frame[frame["kind"] == kind].groupby("layer")["value"].mean()
    return part.index.to_numpy(), part.to_numpy()


def _layer_kind_frame(da: xr.DataArray) -> pd.DataFrame:
    """A module-indexed DataArray as a layer × kind table (mean over modules sharing both)."""
    frame = pd.DataFrame({"layer": da.layer.values, "kind": _strings(da.kind.values), "value": da.values})
    table = frame.pivot_table(index="layer", columns="kind", values="value", aggfunc="mean", dropna=False)
    order = [k for k in KIND_ORDER if k in table.columns] + [k for k in table.columns if k not in KIND_ORDER]
    return table[order].rename_axis(index="layer", columns="module")


def _log_y(ax: Axes) -> None:
    """A log y axis ticked at 1, 2, 5 × 10ᵏ with plain labels and no minor ticks (minor mathtext labels
    cost most of the drawing time of a log panel; 1-2-5 ticks still label a range under one decade)."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0), numticks=12))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_locator(NullLocator())


def _grid(n: int, ncols: int) -> tuple[int, int]:
    ncols = max(1, min(n, ncols))
    return math.ceil(n / ncols), ncols


def _hide_unused(axes: np.ndarray, used: int) -> None:
    for ax in axes[used:]:
        ax.set_axis_off()


# 001: anisotropy of LoRA directions --------------------------------------------------------------


def jacobian_scree(ds: xr.Dataset, modules: Sequence[str] | None = None) -> Figure:
    """Scree curves of the restricted Jacobian, RAW vs SVD basis overlaid, per layer and module (001 App. E, Fig. 8).

    Energy fraction ``σ_k² / Σ_j σ_j²`` of ``J[i, k] = <∇f_i(W), S_k>_F`` (001 Eq. (3)) against the
    component index k; a larger leading mass means sensitivity concentrated in fewer directions.
    ``modules`` restricts the panels (default: every analysed module, by layer then kind).
    """
    modules = _ordered_modules(ds, modules)
    nrows, ncols = _grid(len(modules), len(_kinds(ds)))
    fig, axes = _figure(ds, "Directional-sensitivity spectra of J (scree)", "001 App. E, Fig. 8",
                        nrows=nrows, ncols=ncols, panel=(2.8, 2.2))
    for ax, module in zip(axes, modules):
        for basis in _strings(ds.basis.values):
            frac = ds.energy_fraction.sel(basis=basis, module=module)
            keep = np.isfinite(frac.values)
            ax.plot(frac.component.values[keep], frac.values[keep], marker="o", markersize=3,
                    label=BASIS_LABELS.get(basis, basis))
        ax.set_title(_module_label(ds, module), fontsize=8)
        ax.set(ylim=(-0.02, 1.02))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
    for i, ax in enumerate(axes[: len(modules)]):
        if i + ncols >= len(modules):  # the lowest panel of its column
            ax.set_xlabel("component k", fontsize=8)
        else:
            ax.tick_params(labelbottom=False)
        if i % ncols == 0:
            ax.set_ylabel("σ_k² / Σ σ²", fontsize=8)
        else:
            ax.tick_params(labelleft=False)
    _hide_unused(axes, len(modules))
    axes[0].legend(fontsize=6)
    return fig


def jacobian_condition(ds: xr.Dataset) -> Figure:
    """Condition number ``κ(J) = σ_max / σ_min`` of the restricted Jacobian across layers (001 Sec. 2.3, Prop. 1, Eq. (4)).

    One panel per module kind, one curve per basis; 001 reads a large κ(J) as an anisotropic map
    from LoRA coefficients to task-loss changes.
    """
    kinds = _kinds(ds)
    fig, axes = _figure(ds, "Condition number κ(J) of the restricted Jacobian", "001 Sec. 2.3, Prop. 1",
                        ncols=len(kinds), panel=(3.2, 2.8))
    for ax, kind in zip(axes, kinds):
        for basis in _strings(ds.basis.values):
            ax.plot(*_layer_curve(ds.kappa_J.sel(basis=basis), kind), marker="o", label=BASIS_LABELS.get(basis, basis))
        _log_y(ax)
        ax.set(title=kind, xlabel="layer", ylabel="κ(J)")
    _unique_legend(fig, axes)  # the panels share the two bases
    return fig


def kappa_preferences(ds: xr.Dataset, bases: Sequence[str] | None = None) -> Figure:
    """Layer-wise κ(ρ) per module for ρ₁ uniform and ρ₂ one-hot on each task (001 App. E, Fig. 6 RAW, Fig. 7 SVD).

    ``κ(ρ) = max_k |h_k| / min_k |h_k|`` of the sensitivities ``h(ρ) = ρᵀJ`` (001 Eq. (5); the
    Dataset's reading of App. E, docs/store.md §7). One row of panels per basis (``bases``:
    default both), one panel per module kind.
    """
    bases = list(bases) if bases is not None else _strings(ds.basis.values)
    kinds = _kinds(ds)
    figs = {"raw": "Fig. 6", "svd": "Fig. 7"}
    paper = "001 App. E, " + ", ".join(f"{figs.get(b, b)} ({b.upper()})" for b in bases)
    fig, axes = _figure(ds, "Within-preference anisotropy κ(ρ)", paper, nrows=len(bases), ncols=len(kinds), panel=(3.2, 2.6))
    for row, basis in enumerate(bases):
        for col, kind in enumerate(kinds):
            ax = axes[row * len(kinds) + col]
            ax.plot(*_layer_curve(ds.kappa_uniform.sel(basis=basis), kind), marker="o", color="k", label="ρ₁ uniform")
            for i, task in enumerate(_strings(ds.task.values)):
                ax.plot(*_layer_curve(ds.kappa_onehot.sel(basis=basis, task=task), kind), marker=".", ls="--",
                        color=f"C{i % 10}", label=f"ρ₂ one-hot: {task}")
            _log_y(ax)
            ax.set(title=f"{kind}, {basis.upper()} basis", xlabel="layer", ylabel="κ(ρ)")
    _unique_legend(fig, axes)  # every panel draws ρ₁ and the same one-hot ρ₂: one legend beside them
    return fig


def xi_heatmap(ds: xr.Dataset, basis: str = "svd") -> Figure:
    """Directional-sensitivity misalignment ``ξ(ρ₁, ρ₂)`` per layer × module (001 Eq. (6); Fig. 2 RAW basis, Fig. 9 SVD basis).

    ρ₁ uniform, ρ₂ one-hot on the panel's task; ξ ∈ [0, 1], larger = the loss-sensitive directions
    change more when the preference switches.
    """
    tasks = _strings(ds.task.values)
    nrows, ncols = _grid(len(tasks), 4)
    xi = ds.xi.sel(basis=basis)
    n_layers, n_kinds = len(np.unique(ds.layer.values)), len(_kinds(ds))
    paper = {"raw": "001 Sec. 2.3, Fig. 2", "svd": "001 App. E, Fig. 9"}.get(basis, "001 Eq. (6)")
    fig, axes = _figure(ds, f"Misalignment ξ(ρ₁ uniform, ρ₂ one-hot), {BASIS_LABELS.get(basis, basis)} basis", paper,
                        nrows=nrows, ncols=ncols, panel=(max(3.0, 0.55 * n_kinds + 2.0), max(2.6, 0.32 * n_layers + 1.2)))
    for ax, task in zip(axes, tasks):
        _heatmap(ax, _layer_kind_frame(xi.sel(task=task)), 0.0, 1.0, "rocket_r", "ξ")
        ax.set_title(f"ρ₂ one-hot: {task}", fontsize=9)
    _hide_unused(axes, len(tasks))
    return fig


def anisotropy_table(ds: xr.Dataset) -> pd.DataFrame:
    """001 App. E's anisotropy statistics per module as a DataFrame (Figs. 6–9 in numbers).

    Rows: module (layer, kind); columns per basis: ``κ(J)``, ``κ(ρ uniform)``, the mean over tasks
    of ``κ(ρ one-hot)`` and of ``ξ(uniform, one-hot)``. ``frame.attrs`` carries the dataset label.
    """
    modules = _ordered_modules(ds)
    columns = {}
    for basis in _strings(ds.basis.values):
        sub = ds.sel(basis=basis, module=modules)
        b = basis.upper()
        columns[(b, "κ(J)")] = sub.kappa_J.values
        columns[(b, "κ(ρ uniform)")] = sub.kappa_uniform.values
        columns[(b, "mean κ(ρ one-hot)")] = sub.kappa_onehot.mean("task").values
        columns[(b, "mean ξ")] = sub.xi.mean("task").values
    frame = pd.DataFrame(columns, index=pd.Index([_module_label(ds, m) for m in modules], name="module"))
    frame.columns = pd.MultiIndex.from_tuples(frame.columns, names=["basis", "statistic"])
    frame.attrs = {"dataset": dataset_label(ds), "paper": "001 Sec. 2.3, App. E (Figs. 2, 6-9)", "lam": ds.attrs.get("lam")}
    return frame


# 002: loss change per singular component --------------------------------------------------------


def _components_shown(ds: xr.Dataset, task: str, module: str) -> np.ndarray:
    n = int(ds.n_components.sel(task=task, module=module))
    return ds.component.values[:n]


def _energy_label(ds: xr.Dataset) -> str:
    return f"{float(ds.attrs.get('energy', 0.95)):.0%}-energy rank"


def _mark_energy_rank(ax: Axes, ds: xr.Dataset, task: str, module: str, shown: np.ndarray, label: str | None = None) -> int | None:
    """A dashed line at task ``task``'s energy rank k of ``module`` (002 Fig. 3), or a legend note when it
    lies beyond the components shown; ``label`` names the line (default: with k). Returns k."""
    if "energy_rank" not in ds:
        return None
    k = int(ds.energy_rank.sel(task=task, module=module))
    label = label or f"{_energy_label(ds)} = {k}"
    if shown.size and k <= shown.max():
        ax.axvline(k, color="grey", ls="--", lw=1.0, label=label)
    else:
        ax.plot([], [], color="grey", ls="--", lw=1.0, label=f"{label} (beyond the components shown)")
    return k


def _component_ticks(ax: Axes, shown: np.ndarray) -> None:
    """Every singular index as a tick for a few components, integer ticks for many."""
    if shown.size <= 8:
        ax.set_xticks(shown)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def loss_change_per_component(ds: xr.Dataset, module: str | None = None) -> Figure:
    """Own-task ``ΔL_i(r)`` and multi-task ``ΔL(r)`` against the singular index r, per source task (002 Sec. 4, Eq. (4), Fig. 1).

    For source task i, component ``s_ir = σ_ir u_ir v_irᵀ`` of one module is added to the Task
    Arithmetic merge of the other tasks (002 Eq. (3)); only the top components the Dataset holds
    are drawn (002 shows the top 10 %). The dashed line marks the task's 95 %-energy rank of that
    module (002 Fig. 3). ``module``: default the last MLP module analysed (else the last module).
    """
    module = module or _default_mlp_modules(ds)[-1]
    tasks = _strings(ds.task.values)
    nrows, ncols = _grid(len(tasks), 4)
    fig, axes = _figure(ds, f"Loss change per added singular component, {_module_label(ds, module)}", "002 Sec. 4, Fig. 1",
                        nrows=nrows, ncols=ncols, panel=(3.4, 2.8))
    for ax, task in zip(axes, tasks):
        r = _components_shown(ds, task, module)
        ax.plot(r, ds.own_delta_loss.sel(task=task, module=module).values[: r.size], marker="o", color="C0",
                label="own task ΔL_i(r)")
        ax.plot(r, ds.multi_delta_loss.sel(task=task, module=module).values[: r.size], marker="s", color="C2",
                label="multi-task ΔL(r)")
        ax.axhline(0.0, color="k", lw=0.6)
        k = _mark_energy_rank(ax, ds, task, module, r, label=_energy_label(ds))
        ax.set(title=f"source: {task}" + ("" if k is None else f" (energy rank {k})"), xlabel="singular index r",
               ylabel="ΔL (nats)")
        ax.title.set_fontsize(9)
        _component_ticks(ax, r)
    _hide_unused(axes, len(tasks))
    _unique_legend(fig, axes[: len(tasks)], loc="outside lower center", ncols=4)
    _note_single_component(fig, ds, module)
    return fig


ONE_COMPONENT = ("one singular component per task: this study added only the top one of each update (its components "
                 "budget); the companion study micro-components (make papers) adds every component of rank-16 updates")


def _note_single_component(fig: Figure, ds: xr.Dataset, module: str) -> None:
    """Say so in the title when each curve of 002 Figs. 1-2 is one point (the demo adds the top
    component of each rank-4 update: 10 % of 4 rounds to 1), so that nobody reads a curve into it."""
    if int(ds.n_components.sel(module=module).max()) == 1:
        _note(fig, ONE_COMPONENT)


def loss_change_per_task(ds: xr.Dataset, task: str | None = None, module: str | None = None) -> Figure:
    """``ΔL_j(r)`` of every task j when adding source task i's components (002 Sec. 4, Fig. 2; the source task dotted).

    ``task``: the source task i (default the first); ``module``: as :func:`loss_change_per_component`.
    002 finds that components of one task lower the loss of related tasks and raise that of dissimilar ones.
    """
    task = task or _strings(ds.task.values)[0]
    module = module or _default_mlp_modules(ds)[-1]
    r = _components_shown(ds, task, module)
    fig, (ax,) = _figure(ds, f"Loss change of each task when adding the components of {task}, {_module_label(ds, module)}",
                         "002 Sec. 4, Fig. 2", panel=(5.2, 3.4))
    for j, other in enumerate(_strings(ds.eval_task.values)):
        values = ds.delta_loss.sel(task=task, module=module, eval_task=other).values[: r.size]
        ax.plot(r, values, marker="o", ls=":" if other == task else "-", color=f"C{j % 10}", label=f"ΔL_{other}(r)")
    ax.axhline(0.0, color="k", lw=0.6)
    _mark_energy_rank(ax, ds, task, module, r)
    ax.set(xlabel="singular index r", ylabel="ΔL_j (nats)")
    _component_ticks(ax, r)
    ax.legend(fontsize=7, ncols=2)
    _note_single_component(fig, ds, module)
    return fig


def component_loss_table(ds: xr.Dataset) -> pd.DataFrame:
    """002 Figs. 1–3 in numbers: one row per source task, module and added component r.

    Columns ``σ_ir``, ``ΔL_i(r)`` (own task), ``ΔL(r)`` (all tasks) and the task's energy rank of
    the module; components beyond a task's ``n_components`` are left out. ``frame.attrs`` carries
    the dataset label, the paper reference and the energy threshold.
    """
    rows = []
    for task in _strings(ds.task.values):
        for module in _ordered_modules(ds):
            label = _module_label(ds, module)
            for r in _components_shown(ds, task, module):
                point = ds.sel(task=task, module=module, component=r)
                rows.append({"source task": task, "module": label, "r": int(r), "σ_ir": float(point.singular_value),
                             "ΔL_i(r)": float(point.own_delta_loss), "ΔL(r)": float(point.multi_delta_loss),
                             "energy rank": int(point.energy_rank) if "energy_rank" in ds else np.nan})
    frame = pd.DataFrame(rows).set_index(["source task", "module", "r"])
    frame.attrs = {"dataset": dataset_label(ds), "paper": "002 Sec. 4, Eq. (4), Figs. 1-3",
                   "energy": float(ds.attrs.get("energy", 0.95))}
    return frame


# 004: TAS and AdaMMS* across λ ------------------------------------------------------------------


def _proxy_coords(ds: xr.Dataset, distance: str | None, n_batches: int | None) -> tuple[str, int]:
    """The distance (default ``l2``, 004's default, else the first) and batch count (default the largest)."""
    distances = _strings(ds.distance.values)
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
    return [*_strings(ds.task.values), "mean"]


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
    for distance in _strings(ds.distance.values):
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
    nrows, ncols = _grid(len(panels), 4)
    method = ds.attrs.get("method", "merge")
    fig, axes = _figure(ds, f"TAS ({distance}, {n_batches} batch(es)) and performance of {method} across λ", "004 Sec. 3.2, Fig. 3",
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
    _hide_unused(axes, len(panels))
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
    nrows, ncols = _grid(len(panels), 4)
    fig, axes = _figure(ds, f"AdaMMS* vs TAS ({distance}, {n_batches} batch(es)) across λ", "004 App. D, Fig. 9",
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
    _hide_unused(axes, len(panels))
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
    fig, axes = _figure(ds, "Robustness of TAS to the number of batches and to the distance", "004 App. E, Figs. 10-11",
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
    for i, d in enumerate(_strings(ds.distance.values)):
        draw(axes[1], ds.tas_mean.sel(distance=d, n_batches=n_batches).values, d, i)
    for ax, title in zip(axes, (f"distance {distance}", f"{n_batches} batch(es)")):
        if has_perf:
            ax.set(xlabel="mean TAS, min-max scaled", ylabel=f"mean {perf_label}".replace(" (", "\n(", 1))
        else:
            ax.set(xlabel="λ", ylabel="mean TAS, min-max scaled")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    return fig


# 003: final-embedding interference ---------------------------------------------------------------


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
    fig, (ax,) = _figure(ds, "Final-embedding L1 interference", "003 App. C.1, Fig. 6",
                         panel=(max(5.0, 0.5 * n_groups * max(1, frame["merge"].nunique()) + 2.0), 3.4))
    sns.barplot(data=frame, x="task", y="l1", hue="merge", ax=ax)
    ax.set(xlabel="task", ylabel="mean ‖f(x; θ_merged) − f(x; θ_t)‖₁")
    ax.legend(fontsize=7, title=" / ".join(extra) if extra else None)
    return fig


# 003: accuracy of Core Space merges (Sec. 5.2) ------------------------------------------------------


def truncation_accuracy_curves(ds: xr.Dataset) -> Figure:
    """Mean normalised accuracy of the merge truncated by the fraction ``p`` of its least significant
    singular values, full vs Core space (003 Fig. 4), from
    :func:`mergelab.experiments.core_space_accuracy.truncation_accuracy`; the task range shaded."""
    fig, axes = _figure(ds, f"Accuracy of the truncated {ds.attrs.get('method', 'merged')} merge by space",
                        "003 Sec. 5.2, Fig. 4", panel=(7.2, 3.6))
    ax = axes[0]
    for space in _strings(ds.space.values):
        per_task = 100 * ds.normalized_accuracy.sel(space=space)
        ax.plot(ds["fraction"], 100 * ds.normalized_accuracy_mean.sel(space=space), marker="o", label=f"{space} space")
        ax.fill_between(ds["fraction"], per_task.min("task"), per_task.max("task"), alpha=0.15)
    ax.set(xlabel="truncated fraction p of dim(Σ)", ylabel=f"normalised accuracy (%, {ds.attrs.get('split', 'test')})")
    ax.legend(fontsize=8, title="mean over tasks\n(band: their range)", title_fontsize=7)
    return fig


def reference_basis_accuracy_table(ds: xr.Dataset, errors: xr.Dataset | None = None) -> pd.DataFrame:
    """003 Tab. 5: one row per reference basis, the mean normalised accuracy (%) of the method merged in
    its Core space (:func:`mergelab.experiments.core_space_accuracy.reference_basis_accuracy`) and each
    task's; with ``errors`` (the ``reference_bases`` analysis of the same bases), the basis shapes and
    Avg. ε_U / ε_V before them, as the paper lays the table out."""
    bases = _strings(ds.basis.values)
    labels = [_BASIS_LABELS.get(b, b) for b in bases]
    frame = pd.DataFrame({"Avg. norm. acc. (%)": 100 * ds.normalized_accuracy_mean.values}, index=pd.Index(labels, name="reference basis"))
    for task in _strings(ds.task.values):
        frame[task] = 100 * ds.normalized_accuracy.sel(task=task).values
    if errors is not None:
        weights = reference_basis_table(errors.sel(basis=bases))
        frame = pd.concat([weights[["Shape U", "Shape V"]], frame, weights[["Avg. ε_U", "Avg. ε_V"]]], axis=1)
    frame.attrs = {"dataset": dataset_label(ds), "paper": "003 Sec. 5.2 (Tab. 5)", "method": ds.attrs.get("method"),
                   "split": ds.attrs.get("split")}
    return frame.round(2)
