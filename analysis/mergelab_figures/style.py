"""One figure style for every paper figure: colour-blind-safe lines, integer layer ticks, legends
beside the data.

:class:`PaperFigure` is the ``matplotlib.figure.Figure`` every figure builder of this package
creates; just before it is drawn (shown in a notebook, saved as PNG or PDF) it passes through
:func:`tidy`, so the rules hold for every builder without each one repeating them:

* line colours come from seaborn's ``colorblind`` palette (10 hues, distinct under the common
  colour-vision deficiencies), crossed with two line styles: 20 series stay distinct;
* an axis labelled ``layer …`` of a numeric plot gets integer ticks (blocks are integers);
* every legend sits outside its axes (to the right, or below the x-axis label of a panel that
  shares its row), so it never covers data;
* x tick labels that would overlap (method names under bars) are turned 40° to read side by side;
* a title wider than its figure is wrapped to the figure's width.

The second half holds what the figure modules share (one copy each, public so that every module
imports the same one): :func:`paper_figure` starts every figure (a :class:`PaperFigure` titled with
what it shows, the paper item and :func:`dataset_label`); :func:`note` adds a caption line;
:func:`unique_legend` puts one legend beside panels that share their series; :func:`heatmap` and
:func:`turned` draw a labelled heatmap; :func:`panel_grid` and :func:`hide_unused` lay out a grid of
panels; :func:`strings`, :func:`module_label`, :func:`per_layer`, :func:`module_kinds`,
:func:`ordered_modules` and :func:`default_mlp_modules` read a Dataset's labels and its
``module`` / ``layer`` / ``kind`` coordinates. Which module a figure goes in: docs/extending.md, "A figure".
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

import numpy as np
import pandas as pd
import seaborn as sns
import xarray as xr
from cycler import cycler
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import AutoLocator, MaxNLocator
from matplotlib.transforms import ScaledTranslation

__all__ = ["KIND_ORDER", "OBJECTIVES", "PALETTE", "UNLABELLED", "PaperFigure", "dataset_label", "default_mlp_modules", "heatmap",
           "hide_unused", "module_kinds", "module_label", "note", "ordered_modules", "palette", "panel_grid", "paper_figure", "per_layer",
           "strings", "tidy", "turned", "unique_legend"]

#: seaborn's colour-blind-safe qualitative palette (10 hues).
PALETTE: list[tuple[float, float, float]] = sns.color_palette("colorblind", 10)
#: Line cycle: each hue solid, then each dashed (20 distinct series).
CYCLE = cycler(linestyle=["-", "--"]) * cycler(color=PALETTE)


def palette(names: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """A colour per name for seaborn's ``palette=`` (hues repeat after 10: pair them with a
    second visual channel such as ``style=``)."""
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


def _integer_layer_ticks(ax: Axes) -> None:
    for axis, label in ((ax.xaxis, ax.get_xlabel()), (ax.yaxis, ax.get_ylabel())):
        if label.startswith("layer") and isinstance(axis.get_major_locator(), AutoLocator):
            axis.set_major_locator(MaxNLocator(integer=True))


def _legend_outside(ax: Axes, renderer) -> None:
    """Re-place the legend outside ``ax``: to the right of a panel alone in its row, below the
    x-axis label of a panel that shares its row (several legends to the right would squeeze the
    panels to nothing)."""
    legend = ax.get_legend()
    if legend is None or getattr(legend, "_mergelab_outside", False):
        return
    handles, labels = legend.legend_handles, [t.get_text() for t in legend.get_texts()]
    title = legend.get_title().get_text() or None
    size = legend.get_texts()[0].get_fontsize() if labels else 7
    spec = ax.get_subplotspec()
    if spec is None or spec.get_gridspec().ncols == 1:
        where = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)}
    else:  # below the x axis' tick labels and label, by their depth in inches: it does not change when the layout
        # engine resizes the panel afterwards (an offset in axes fractions would, and land on the label)
        below = ax.xaxis.get_tightbbox(renderer) if renderer is not None else None
        depth = (ax.bbox.y0 - below.y0) / ax.figure.dpi if below is not None else 0.5
        offset = ScaledTranslation(0.0, -(depth + 0.05), ax.figure.dpi_scale_trans)
        where = {"loc": "upper center", "bbox_to_anchor": (0.5, 0.0), "bbox_transform": ax.transAxes + offset, "ncols": 1}
    moved = ax.legend(handles, labels, title=title, fontsize=size, borderaxespad=0.0, frameon=False, **where)
    moved._mergelab_outside = True


def _turn_crowded_ticks(ax: Axes, renderer) -> None:
    """Turn the x tick labels of ``ax`` by 40° (anchored at their right end) when two neighbours overlap."""
    labels = [t for t in ax.get_xticklabels() if t.get_text()]
    if renderer is None or len(labels) < 2 or any(t.get_rotation() for t in labels):
        return
    boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: b.x0)
    if any(left.x1 > right.x0 for left, right in zip(boxes, boxes[1:])):
        for t in labels:
            t.set(rotation=40, horizontalalignment="right", rotation_mode="anchor")


def _fit_title(fig: Figure, renderer) -> None:
    """Wrap the figure's title (``suptitle``) line by line when it is wider than the figure, narrowing
    the wrap until the measured text fits (characters differ in width, so one proportional guess can
    still overrun the edge)."""
    title = fig._suptitle  # matplotlib keeps the suptitle's Text here; get_suptitle() gives only its string
    if renderer is None or title is None:
        return
    lines, room = title.get_text().split("\n"), 0.98 * fig.bbox.width
    chars = max(map(len, lines))
    while (width := title.get_window_extent(renderer).width) > room and chars > 20:
        chars = max(20, min(chars - 1, int(chars * room / width)))
        title.set_text("\n".join(textwrap.fill(line, chars) for line in lines))


def tidy(fig: Figure, renderer=None) -> Figure:
    """Apply the rules of this module to every axes of ``fig`` (idempotent); ``renderer`` places a
    legend below its panel's x-axis label and measures tick labels and the title."""
    _fit_title(fig, renderer)
    for ax in fig.axes:
        _integer_layer_ticks(ax)
        _turn_crowded_ticks(ax, renderer)
        _legend_outside(ax, renderer)
    return fig


class PaperFigure(Figure):
    """A Figure whose axes cycle :data:`CYCLE` and which is :func:`tidy` whenever it is drawn."""

    def add_axes(self, *args, **kwargs):  # noqa: D102 (Figure's)
        ax = super().add_axes(*args, **kwargs)
        ax.set_prop_cycle(CYCLE)
        return ax

    def add_subplot(self, *args, **kwargs):  # noqa: D102 (Figure's)
        ax = super().add_subplot(*args, **kwargs)
        ax.set_prop_cycle(CYCLE)
        return ax

    def draw(self, renderer):  # noqa: D102 (Figure's)
        tidy(self, renderer)
        return super().draw(renderer)


# What the figure modules share -----------------------------------------------------------------------

UNLABELLED = "unlabelled data"

#: How a model-dependent analysis' loss ``attrs["objective"]`` reads in a caption.
OBJECTIVES = {"labels": "loss: cross-entropy on val labels", "entropy": "loss: prediction entropy (label-free)"}

#: Module kinds in the order the papers lay them out (001 Figs. 6–9: q, k, v, out).
KIND_ORDER = ("q", "k", "v", "qkv", "out", "mlp_in", "mlp_out", "other")


def dataset_label(ds: xr.Dataset) -> str:
    """What the figure was computed on: ``ds.attrs["dataset"]`` (set by the producer or the flow),
    and the loss it was measured with where the analysis has one (``attrs["objective"]``)."""
    label = str(ds.attrs.get("dataset") or UNLABELLED)
    objective = OBJECTIVES.get(str(ds.attrs.get("objective", "")))
    return f"{label}; {objective}" if objective else label


def strings(values) -> list[str]:
    """Labels as Python strings (coords read back from Zarr v3 are numpy StringDType)."""
    return [str(v) for v in np.asarray(values).ravel()]


def paper_figure(ds: xr.Dataset, title: str, paper: str, *, ncols: int = 1, nrows: int = 1,
                 panel: tuple[float, float] = (4.2, 3.2)) -> tuple[Figure, np.ndarray]:
    """A :class:`PaperFigure` of ``nrows × ncols`` panels of ``panel`` inches each, titled with
    ``title``, the ``paper`` item it redraws and :func:`dataset_label`; its axes as a flat array."""
    fig = PaperFigure(figsize=(panel[0] * ncols, panel[1] * nrows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    fig.suptitle(f"{title} ({paper})\ncomputed on: {dataset_label(ds)}", fontsize=10)
    return fig, axes


def note(fig: Figure, text: str) -> None:
    """Add a last line to the figure's title: what the reader must know to read it (a degenerate case)."""
    title = fig._suptitle  # the Text matplotlib keeps; get_suptitle() gives only its string
    fig.suptitle(f"{title.get_text()}\nnote: {text}", fontsize=title.get_fontsize())


def unique_legend(fig: Figure, axes, **where) -> None:
    """One legend, outside the panels (``where``: ``fig.legend`` placement, default to the right of
    the panels, centred beside them, clear of the figure title), for panels that share their series
    (the first handle of each label wins)."""
    seen: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    fig.legend(list(seen.values()), list(seen), **{"loc": "outside right center", **where}, fontsize=7, frameon=False)


def panel_grid(n: int, ncols: int) -> tuple[int, int]:
    """``(nrows, ncols)`` of a grid of ``n`` panels at most ``ncols`` wide."""
    ncols = max(1, min(n, ncols))
    return math.ceil(n / ncols), ncols


def hide_unused(axes: np.ndarray, used: int) -> None:
    """Turn off the panels of a grid after the first ``used``."""
    for ax in axes[used:]:
        ax.set_axis_off()


def turned(labels: Sequence[str]) -> float:
    """Inches of height that column labels turned by 40° under a heatmap take beyond level ones."""
    return 0.06 * max(map(len, labels), default=0)


def heatmap(ax: Axes, frame: pd.DataFrame, vmin: float, vmax: float, cmap: str, label: str) -> None:
    """A seaborn heatmap with every row and column labelled, row labels level and column labels
    level unless they crowd (then :func:`tidy` turns them; seaborn's vertical labels ran into the
    axis label and the figure title)."""
    sns.heatmap(frame, ax=ax, vmin=vmin, vmax=vmax, cmap=cmap, annot=frame.shape[0] * frame.shape[1] <= 144,
                fmt=".2f", square=True, cbar_kws={"label": label}, annot_kws={"fontsize": 7}, xticklabels=True, yticklabels=True)
    ax.tick_params(axis="x", rotation=0)
    ax.tick_params(axis="y", rotation=0)


def module_label(ds: xr.Dataset, module: str) -> str:
    """``layer <i> <kind>`` of one module of ``ds``."""
    row = ds.sel(module=module)
    return f"layer {int(row.layer)} {row.kind.item()}"


def per_layer(da: xr.DataArray) -> pd.DataFrame:
    """A module-indexed DataArray as a tidy frame with ``layer`` and ``kind`` columns (mean over duplicates)."""
    frame = da.to_dataframe(name="value").reset_index()
    keys = [c for c in frame.columns if c not in ("value", "module")]
    return frame.groupby(keys, as_index=False)["value"].mean()


def module_kinds(ds: xr.Dataset) -> list[str]:
    """The module kinds of ``ds``, in :data:`KIND_ORDER` (then any others as they come)."""
    present = list(dict.fromkeys(strings(ds.kind.values)))
    return [k for k in KIND_ORDER if k in present] + [k for k in present if k not in KIND_ORDER]


def ordered_modules(ds: xr.Dataset, modules: Sequence[str] | None = None) -> list[str]:
    """Modules by layer, then kind in :data:`KIND_ORDER` (the layer × kind grid of 001 App. E)."""
    rank = {k: i for i, k in enumerate(module_kinds(ds))}
    frame = pd.DataFrame({"module": strings(ds.module.values), "layer": ds.layer.values,
                          "kind": [rank[k] for k in strings(ds.kind.values)]})
    if modules is not None:
        frame = frame[frame["module"].isin(list(modules))]
    return frame.sort_values(["layer", "kind"], kind="stable")["module"].tolist()


def default_mlp_modules(ds: xr.Dataset) -> list[str]:
    """The first and the last MLP module (002 Fig. 3 uses the first and last MLP layer), else first/last module."""
    modules = pd.DataFrame({"module": strings(ds.module.values), "layer": ds.layer.values, "kind": strings(ds.kind.values)})
    mlp = modules[modules["kind"].str.startswith("mlp")]
    pool = (mlp if len(mlp) else modules).sort_values("layer", kind="stable")
    return list(dict.fromkeys([pool["module"].iloc[0], pool["module"].iloc[-1]]))
