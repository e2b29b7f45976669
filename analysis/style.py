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
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import seaborn as sns
from cycler import cycler
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import AutoLocator, MaxNLocator
from matplotlib.transforms import ScaledTranslation

__all__ = ["PALETTE", "PaperFigure", "palette", "tidy"]

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
