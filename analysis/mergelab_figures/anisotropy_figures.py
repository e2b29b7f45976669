"""Figures of the anisotropy Dataset (:func:`mergelab.experiments.model_analyses.jacobian_anisotropy`, the
``anisotropy`` analysis on :mod:`mergelab.analysis.anisotropy`; ``needs="bench"``, docs/store.md §7):
the anisotropy of LoRA directions (001 Sec. 2.3, App. E: Figs. 2, 6–9).

Every figure starts from :func:`mergelab_figures.style.paper_figure` (titled with what it shows, the
paper figure it redraws, the dataset and the loss it was measured with); the table is a DataFrame whose
``attrs["dataset"]`` carries that label. The builders only average over modules that share a layer
and kind: the statistics come from the Dataset.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullLocator

from mergelab_figures.style import (KIND_ORDER, dataset_label, heatmap, hide_unused, module_kinds, module_label, ordered_modules,
                                    panel_grid, paper_figure, strings, unique_legend)

__all__ = ["anisotropy_table", "jacobian_condition", "jacobian_scree", "kappa_preferences", "xi_heatmap"]


# 001: anisotropy of LoRA directions ---------------------------------------------------------------


BASIS_LABELS = {"raw": "RAW (rank-1 LoRA factors)", "svd": "SVD (shared orthonormal)"}


def _layer_curve(da: xr.DataArray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """``(layers, values)`` of a module-indexed DataArray for one kind (mean over modules sharing a layer)."""
    frame = pd.DataFrame({"layer": da.layer.values, "kind": strings(da.kind.values), "value": da.values})
    part = frame[frame["kind"] == kind].groupby("layer")["value"].mean()
    return part.index.to_numpy(), part.to_numpy()


def _layer_kind_frame(da: xr.DataArray) -> pd.DataFrame:
    """A module-indexed DataArray as a layer × kind table (mean over modules sharing both)."""
    frame = pd.DataFrame({"layer": da.layer.values, "kind": strings(da.kind.values), "value": da.values})
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


def jacobian_scree(ds: xr.Dataset, modules: Sequence[str] | None = None) -> Figure:
    """Scree curves of the restricted Jacobian, RAW vs SVD basis overlaid, per layer and module (001 App. E, Fig. 8).

    Energy fraction ``σ_k² / Σ_j σ_j²`` of ``J[i, k] = <∇f_i(W), S_k>_F`` (001 Eq. (3)) against the
    component index k; a larger leading mass means sensitivity concentrated in fewer directions.
    ``modules`` restricts the panels (default: every analysed module, by layer then kind).
    """
    modules = ordered_modules(ds, modules)
    nrows, ncols = panel_grid(len(modules), len(module_kinds(ds)))
    fig, axes = paper_figure(ds, "Directional-sensitivity spectra of J (scree)", "001 App. E, Fig. 8",
                             nrows=nrows, ncols=ncols, panel=(2.8, 2.2))
    for ax, module in zip(axes, modules):
        for basis in strings(ds.basis.values):
            frac = ds.energy_fraction.sel(basis=basis, module=module)
            keep = np.isfinite(frac.values)
            ax.plot(frac.component.values[keep], frac.values[keep], marker="o", markersize=3,
                    label=BASIS_LABELS.get(basis, basis))
        ax.set_title(module_label(ds, module), fontsize=8)
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
    hide_unused(axes, len(modules))
    axes[0].legend(fontsize=6)
    return fig


def jacobian_condition(ds: xr.Dataset) -> Figure:
    """Condition number ``κ(J) = σ_max / σ_min`` of the restricted Jacobian across layers (001 Sec. 2.3, Prop. 1, Eq. (4)).

    One panel per module kind, one curve per basis; 001 reads a large κ(J) as an anisotropic map
    from LoRA coefficients to task-loss changes.
    """
    kinds = module_kinds(ds)
    fig, axes = paper_figure(ds, "Condition number κ(J) of the restricted Jacobian", "001 Sec. 2.3, Prop. 1",
                             ncols=len(kinds), panel=(3.2, 2.8))
    for ax, kind in zip(axes, kinds):
        for basis in strings(ds.basis.values):
            ax.plot(*_layer_curve(ds.kappa_J.sel(basis=basis), kind), marker="o", label=BASIS_LABELS.get(basis, basis))
        _log_y(ax)
        ax.set(title=kind, xlabel="layer", ylabel="κ(J)")
    unique_legend(fig, axes)  # the panels share the two bases
    return fig


def kappa_preferences(ds: xr.Dataset, bases: Sequence[str] | None = None) -> Figure:
    """Layer-wise κ(ρ) per module for ρ₁ uniform and ρ₂ one-hot on each task (001 App. E, Fig. 6 RAW, Fig. 7 SVD).

    ``κ(ρ) = max_k |h_k| / min_k |h_k|`` of the sensitivities ``h(ρ) = ρᵀJ`` (001 Eq. (5); the
    Dataset's reading of App. E, docs/store.md §7). One row of panels per basis (``bases``:
    default both), one panel per module kind.
    """
    bases = list(bases) if bases is not None else strings(ds.basis.values)
    kinds = module_kinds(ds)
    figs = {"raw": "Fig. 6", "svd": "Fig. 7"}
    paper = "001 App. E, " + ", ".join(f"{figs.get(b, b)} ({b.upper()})" for b in bases)
    fig, axes = paper_figure(ds, "Within-preference anisotropy κ(ρ)", paper, nrows=len(bases), ncols=len(kinds), panel=(3.2, 2.6))
    for row, basis in enumerate(bases):
        for col, kind in enumerate(kinds):
            ax = axes[row * len(kinds) + col]
            ax.plot(*_layer_curve(ds.kappa_uniform.sel(basis=basis), kind), marker="o", color="k", label="ρ₁ uniform")
            for i, task in enumerate(strings(ds.task.values)):
                ax.plot(*_layer_curve(ds.kappa_onehot.sel(basis=basis, task=task), kind), marker=".", ls="--",
                        color=f"C{i % 10}", label=f"ρ₂ one-hot: {task}")
            _log_y(ax)
            ax.set(title=f"{kind}, {basis.upper()} basis", xlabel="layer", ylabel="κ(ρ)")
    unique_legend(fig, axes)  # every panel draws ρ₁ and the same one-hot ρ₂: one legend beside them
    return fig


def xi_heatmap(ds: xr.Dataset, basis: str = "svd") -> Figure:
    """Directional-sensitivity misalignment ``ξ(ρ₁, ρ₂)`` per layer × module (001 Eq. (6); Fig. 2 RAW basis, Fig. 9 SVD basis).

    ρ₁ uniform, ρ₂ one-hot on the panel's task; ξ ∈ [0, 1], larger = the loss-sensitive directions
    change more when the preference switches.
    """
    tasks = strings(ds.task.values)
    nrows, ncols = panel_grid(len(tasks), 4)
    xi = ds.xi.sel(basis=basis)
    n_layers, n_kinds = len(np.unique(ds.layer.values)), len(module_kinds(ds))
    paper = {"raw": "001 Sec. 2.3, Fig. 2", "svd": "001 App. E, Fig. 9"}.get(basis, "001 Eq. (6)")
    fig, axes = paper_figure(ds, f"Misalignment ξ(ρ₁ uniform, ρ₂ one-hot), {BASIS_LABELS.get(basis, basis)} basis", paper,
                             nrows=nrows, ncols=ncols, panel=(max(3.0, 0.55 * n_kinds + 2.0), max(2.6, 0.32 * n_layers + 1.2)))
    for ax, task in zip(axes, tasks):
        heatmap(ax, _layer_kind_frame(xi.sel(task=task)), 0.0, 1.0, "rocket_r", "ξ")
        ax.set_title(f"ρ₂ one-hot: {task}", fontsize=9)
    hide_unused(axes, len(tasks))
    return fig


def anisotropy_table(ds: xr.Dataset) -> pd.DataFrame:
    """001 App. E's anisotropy statistics per module as a DataFrame (Figs. 6–9 in numbers).

    Rows: module (layer, kind); columns per basis: ``κ(J)``, ``κ(ρ uniform)``, the mean over tasks
    of ``κ(ρ one-hot)`` and of ``ξ(uniform, one-hot)``. ``frame.attrs`` carries the dataset label.
    """
    modules = ordered_modules(ds)
    columns = {}
    for basis in strings(ds.basis.values):
        sub = ds.sel(basis=basis, module=modules)
        b = basis.upper()
        columns[(b, "κ(J)")] = sub.kappa_J.values
        columns[(b, "κ(ρ uniform)")] = sub.kappa_uniform.values
        columns[(b, "mean κ(ρ one-hot)")] = sub.kappa_onehot.mean("task").values
        columns[(b, "mean ξ")] = sub.xi.mean("task").values
    frame = pd.DataFrame(columns, index=pd.Index([module_label(ds, m) for m in modules], name="module"))
    frame.columns = pd.MultiIndex.from_tuples(frame.columns, names=["basis", "statistic"])
    frame.attrs = {"dataset": dataset_label(ds), "paper": "001 Sec. 2.3, App. E (Figs. 2, 6-9)", "lam": ds.attrs.get("lam")}
    return frame
