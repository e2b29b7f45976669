"""Figures of the per-component loss changes (:func:`mergelab.experiments.model_analyses.component_loss_changes`,
the ``components`` analysis on :mod:`mergelab.analysis.components`; ``needs="bench"``, docs/store.md §7):
AdaRank's loss change per singular component (002 Sec. 4: Figs. 1–2, and Figs. 1–3 in numbers).

Every figure starts from :func:`mergelab_figures.style.paper_figure`; the table is a DataFrame whose
``attrs["dataset"]`` carries the dataset label. The statistics come from the Dataset.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mergelab_figures.style import (dataset_label, default_mlp_modules, hide_unused, module_label, note, ordered_modules,
                                    panel_grid, paper_figure, strings, unique_legend)

__all__ = ["component_loss_table", "loss_change_per_component", "loss_change_per_task"]


# 002: loss change per singular component ----------------------------------------------------------


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
    module = module or default_mlp_modules(ds)[-1]
    tasks = strings(ds.task.values)
    nrows, ncols = panel_grid(len(tasks), 4)
    fig, axes = paper_figure(ds, f"Loss change per added singular component, {module_label(ds, module)}", "002 Sec. 4, Fig. 1",
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
    hide_unused(axes, len(tasks))
    unique_legend(fig, axes[: len(tasks)], loc="outside lower center", ncols=4)
    _note_single_component(fig, ds, module)
    return fig


ONE_COMPONENT = ("one singular component per task: this study added only the top one of each update (its components "
                 "budget); the companion study micro-components (make papers) adds every component of rank-16 updates")


def _note_single_component(fig: Figure, ds: xr.Dataset, module: str) -> None:
    """Say so in the title when each curve of 002 Figs. 1-2 is one point (the demo adds the top
    component of each rank-4 update: 10 % of 4 rounds to 1), so that nobody reads a curve into it."""
    if int(ds.n_components.sel(module=module).max()) == 1:
        note(fig, ONE_COMPONENT)


def loss_change_per_task(ds: xr.Dataset, task: str | None = None, module: str | None = None) -> Figure:
    """``ΔL_j(r)`` of every task j when adding source task i's components (002 Sec. 4, Fig. 2; the source task dotted).

    ``task``: the source task i (default the first); ``module``: as :func:`loss_change_per_component`.
    002 finds that components of one task lower the loss of related tasks and raise that of dissimilar ones.
    """
    task = task or strings(ds.task.values)[0]
    module = module or default_mlp_modules(ds)[-1]
    r = _components_shown(ds, task, module)
    fig, (ax,) = paper_figure(ds, f"Loss change of each task when adding the components of {task}, {module_label(ds, module)}",
                              "002 Sec. 4, Fig. 2", panel=(5.2, 3.4))
    for j, other in enumerate(strings(ds.eval_task.values)):
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
    for task in strings(ds.task.values):
        for module in ordered_modules(ds):
            label = module_label(ds, module)
            for r in _components_shown(ds, task, module):
                point = ds.sel(task=task, module=module, component=r)
                rows.append({"source task": task, "module": label, "r": int(r), "σ_ir": float(point.singular_value),
                             "ΔL_i(r)": float(point.own_delta_loss), "ΔL(r)": float(point.multi_delta_loss),
                             "energy rank": int(point.energy_rank) if "energy_rank" in ds else np.nan})
    frame = pd.DataFrame(rows).set_index(["source task", "module", "r"])
    frame.attrs = {"dataset": dataset_label(ds), "paper": "002 Sec. 4, Eq. (4), Figs. 1-3",
                   "energy": float(ds.attrs.get("energy", 0.95))}
    return frame
