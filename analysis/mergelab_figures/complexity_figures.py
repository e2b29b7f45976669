"""Figures of the operation-count Dataset (:func:`mergelab.analysis.complexity.operation_counts`, the
``operation_counts`` analysis): operations to merge LoRA modules per method and space (003 Sec. 4.3,
App. B, Fig. 3).

The figure starts from :func:`mergelab_figures.style.paper_figure`; the counts come from the Dataset.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from mergelab_figures.style import palette, paper_figure, strings

__all__ = ["operation_count_curves"]


# 003: operation counts ----------------------------------------------------------------------------


_SPACE_STYLE = {"full": ("-", "o"), "knots": ("--", "s"), "core": (":", "^")}


#: Curves of 003 Fig. 3 closer than this factor at every n are one line on a log axis (under a pixel apart).
SAME_COUNT = 1.05


def _same_curves(ds: xr.Dataset) -> list[list[tuple[str, str]]]:
    """The method × space pairs that have a count, grouped where their curves coincide (:data:`SAME_COUNT`)."""
    groups: list[list[tuple[str, str]]] = []
    for method in strings(ds.merge_method.values):
        for space in strings(ds.space.values):
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
    fig, axes = paper_figure(ds, f"Operations to merge T = {T} rank-{r} LoRA modules of shape n × n", "003 Sec. 4.3, App. B, Fig. 3",
                             panel=(8.4, 3.8))  # the legend takes a third of the width
    ax, colors = axes[0], palette(strings(ds.merge_method.values))
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
