"""Figures of the subspace-coverage Datasets (:func:`mergelab.analysis.coverage.subspace_coverage`,
the ``coverage`` analysis): effective ranks across layers (001 Figs. 1, 5) and 95 %-energy ranks per
task (002 Fig. 3).

Each function takes the Dataset (read back from the store or computed in place) and returns a
:class:`matplotlib.figure.Figure` started by :func:`mergelab_figures.style.paper_figure` (titled with
what it shows, the paper figure it redraws and ``ds.attrs["dataset"]``); a ``*_table`` returns a
:class:`pandas.DataFrame` whose ``attrs["dataset"]`` carries that label. Nothing here computes a
statistic: the numbers come from the Dataset.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import seaborn as sns
import xarray as xr
from matplotlib.figure import Figure

from mergelab_figures.style import (dataset_label, default_mlp_modules, module_label, note, paper_figure, per_layer, strings,
                                    unique_legend)

__all__ = ["coverage_erank", "energy_rank_per_task", "energy_rank_table", "uniform_energy_rank"]


# 001: subspace coverage ---------------------------------------------------------------------------


def coverage_erank(ds: xr.Dataset, kinds: Sequence[str] | None = None) -> Figure:
    """Effective rank across layers, one panel per module kind (001 Fig. 1 for one kind, Fig. 5 for all).

    Three curves per panel: the per-task sum, the Rank-1 stack (LoRA-aware) and the ΔW stack
    (LoRA-agnostic), from :func:`mergelab.analysis.coverage.subspace_coverage`.
    """
    kinds = list(kinds) if kinds is not None else list(dict.fromkeys(ds.kind.values.tolist()))
    fig, axes = paper_figure(ds, "Effective rank across layers", "001 Figs. 1, 5", ncols=len(kinds))
    curves = {"per-task sum": "erank_per_task_sum", "Rank-1 stack (LoRA-aware)": "erank_aware",
              "ΔW stack (LoRA-agnostic)": "erank_agnostic"}
    for ax, kind in zip(axes, kinds):
        sub = ds.isel(module=np.flatnonzero(np.array(strings(ds.kind.values)) == kind))
        for label, var in curves.items():
            frame = per_layer(sub[var].reset_coords("kind", drop=True))
            ax.plot(frame["layer"], frame["value"], marker="o", label=label)
        ax.set(title=kind, xlabel="layer", ylabel="erank")
    unique_legend(fig, axes)  # the panels share their three curves
    return fig


# 002: energy ranks --------------------------------------------------------------------------------


def uniform_energy_rank(ds: xr.Dataset, modules: Sequence[str] | None = None) -> int | None:
    """The one 95 %-energy rank every task has in ``modules`` (default: the two 002 Fig. 3 draws), or
    None when they differ. On low-rank LoRA updates (the demo's rank 4) every component carries
    energy, so every bar of 002 Fig. 3 is the rank and the figure shows nothing to compare."""
    modules = list(modules) if modules is not None else default_mlp_modules(ds)
    values = np.unique(ds.energy_rank.sel(module=modules).values)
    return int(values[0]) if values.size == 1 else None


def energy_rank_per_task(ds: xr.Dataset, modules: Sequence[str] | None = None) -> Figure:
    """Rank keeping 95 % of each task vector's energy, per task, for selected modules (002 Fig. 3).

    When every bar has the same height (:func:`uniform_energy_rank`) the title says so: the figure
    then cannot show 002's finding that the rank differs across tasks and layers.
    """
    modules = list(modules) if modules is not None else default_mlp_modules(ds)
    fig, axes = paper_figure(ds, f"Rank capturing {ds.attrs.get('energy', 0.95):.0%} of the energy", "002 Fig. 3",
                             ncols=len(modules), panel=(max(3.0, 0.55 * ds.sizes["task"] + 1.5), 3.2))
    for ax, module in zip(axes, modules):
        values = ds.energy_rank.sel(module=module)
        sns.barplot(x=strings(values.task.values), y=values.values, ax=ax, color="C0")
        ax.set(title=module_label(ds, module), xlabel="task", ylabel="energy rank")
    same = uniform_energy_rank(ds, modules)
    if same is not None:
        note(fig, f"every task's energy rank is {same} here: each update needs all its components, so there is no spread "
                  "to compare (higher-rank updates show it)")
    return fig


def energy_rank_table(ds: xr.Dataset) -> pd.DataFrame:
    """002 Fig. 3 for every module as a DataFrame: the 95 %-energy rank, rows = module (layer, kind), columns = task.

    From :func:`~mergelab.analysis.coverage.subspace_coverage`; ``frame.attrs`` carries the dataset
    label, the paper reference and the energy threshold.
    """
    frame = ds.energy_rank.transpose("module", "task").to_pandas()
    frame.index = pd.Index([module_label(ds, m) for m in strings(frame.index)], name="module")
    frame.columns = pd.Index(strings(frame.columns), name="task")
    frame.attrs = {"dataset": dataset_label(ds), "paper": "002 Sec. 4, Fig. 3", "energy": float(ds.attrs.get("energy", 0.95))}
    return frame
