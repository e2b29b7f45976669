"""What a reviewer rejects at a glance, measured on a drawn figure's boxes: :func:`layout_problems`.

The figure is drawn once on an Agg canvas (a :class:`~mergelab_figures.style.PaperFigure` is tidied
then, as when a notebook shows it) and matplotlib's window extents are compared in display pixels:

* **legend over text**: a legend's box intersects an axis label, a tick label, a panel title, the
  figure title or another legend;
* **legend over data**: a legend's box crosses a line, a marker, a bar, a patch or an image /
  mesh of a panel it lies on (a legend beside or below its panels crosses nothing);
* **text over text across panels**: a label, tick label or title of one panel intersects one of
  another panel (a legend or a colour bar squeezed between rows, a turned label running into the
  next panel);
* **hidden series**: every point of a labelled line or scatter lies under a later series of the same
  panel (within half a filled marker, or a pixel and a half of an open one or of a line's vertex);
* **crowded tick labels**: two neighbouring tick labels of one axis intersect (labels turned by an
  angle: their parallel lines are closer than a line's height);
* **clipped text**: a tick label, axis label, title or legend reaching outside the figure canvas;
* **accuracy as a fraction**: an axis or colour-bar label that names an accuracy without ``%``
  (tables print accuracies in %, so every figure does).

Each problem is one line naming the two boxes. Overlaps below ``tolerance`` pixels in either
direction are not problems (anti-aliasing, a label's descender touching a frame).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.lines import Line2D
from matplotlib.text import Text
from matplotlib.transforms import Bbox

__all__ = ["layout_problems"]

_ACCURACY = re.compile(r"\baccurac(y|ies)\b", re.IGNORECASE)


def _overlap(a: Bbox, b: Bbox, tolerance: float) -> bool:
    return min(a.x1, b.x1) - max(a.x0, b.x0) > tolerance and min(a.y1, b.y1) - max(a.y0, b.y0) > tolerance


def _shown(artist) -> bool:
    return artist.get_visible() and (not isinstance(artist, Text) or bool(artist.get_text().strip()))


def _in_view(axis, tick) -> bool:
    low, high = sorted(axis.get_view_interval())
    span = (high - low) * 1e-9 + 1e-12
    return low - span <= tick.get_loc() <= high + span


def _tick_labels(ax: Axes) -> Iterator[Text]:
    """The tick labels matplotlib draws: shown, non-empty, of ticks inside the view limits."""
    for axis in (ax.xaxis, ax.yaxis):
        if not axis.get_visible():
            continue
        for tick in axis.get_major_ticks() + axis.get_minor_ticks():
            if tick.get_visible() and _in_view(axis, tick):
                yield from (label for label in (tick.label1, tick.label2) if _shown(label))


def _panel_texts(ax: Axes) -> Iterator[tuple[str, Text]]:
    """``(what, text)`` for every label, tick label and title ``ax`` draws."""
    name = _panel_name(ax)
    titles = (("title", ax.title), ("left title", ax._left_title), ("right title", ax._right_title))  # noqa: SLF001 (no public getter)
    labels = (("x label", ax.xaxis.label), ("y label", ax.yaxis.label)) if ax.axison else ()
    for what, text in (*titles, *labels):
        if _shown(text):
            yield f"{name} {what} {text.get_text()!r}", text
    if ax.axison:
        for text in _tick_labels(ax):
            yield f"{name} tick label {text.get_text()!r}", text


def _panel_name(ax: Axes) -> str:
    title = ax.get_title() or ax.get_ylabel() or ax.get_xlabel()
    return f"panel {ax.get_figure().axes.index(ax)}" + (f" ({title!r})" if title else "")


def _legends(fig: Figure) -> list[tuple[str, Legend]]:
    found = [(f"{_panel_name(ax)} legend", ax.get_legend()) for ax in fig.axes if ax.get_legend() is not None]
    found += [(f"figure legend {i}", legend) for i, legend in enumerate(fig.legends)]
    return [(name, legend) for name, legend in found if legend.get_visible()]


def _crosses(artist, box: Bbox, renderer, tolerance: float) -> bool:
    """Whether a data artist of a panel draws inside ``box`` (display pixels)."""
    inner = Bbox.from_extents(box.x0 + tolerance, box.y0 + tolerance, box.x1 - tolerance, box.y1 - tolerance)
    if isinstance(artist, Line2D):
        path = artist.get_transform().transform_path(artist.get_path())
        if artist.get_linestyle() not in ("None", "", " ") and len(path.vertices) > 1 and path.intersects_bbox(inner, filled=False):
            return True
        return artist.get_marker() not in ("None", "", " ", None) and bool(inner.contains(*path.vertices.T).any())
    if isinstance(artist, PathCollection):  # scatter: the markers' centres
        offsets = artist.get_offset_transform().transform(artist.get_offsets())
        return bool(len(offsets)) and bool(inner.contains(*np.asarray(offsets).T).any())
    return _overlap(artist.get_window_extent(renderer), box, tolerance)


def _data_artists(ax: Axes) -> list:
    """Lines, collections (markers, fills, meshes), patches (bars, ellipses) and images of ``ax``."""
    return [artist for artist in (*ax.lines, *ax.collections, *ax.patches, *ax.images) if artist.get_visible()]


def _has_markers(artist) -> bool:
    return isinstance(artist, PathCollection) or artist.get_marker() not in ("None", "", " ", None)


def _series(ax: Axes) -> list[dict]:
    """Each labelled line or scatter of ``ax`` in drawing order: its points in display pixels, its
    marker radius in pixels, whether its markers are filled, its line width and style."""
    px = ax.get_figure().dpi / 72.0
    found = []
    for artist in sorted((a for a in (*ax.lines, *ax.collections) if a.get_visible()), key=lambda a: a.get_zorder()):  # stable
        label = str(artist.get_label())
        if label.startswith("_") or not isinstance(artist, Line2D | PathCollection):
            continue
        if isinstance(artist, Line2D):
            points = artist.get_transform().transform(artist.get_xydata())
            radius = 0.5 * artist.get_markersize() * px
            filled = _has_markers(artist) and artist.get_markerfacecolor() != "none"
            line = (artist.get_linewidth() * px, artist.get_linestyle()) if artist.get_linestyle() not in ("None", "", " ") else None
        else:
            points = artist.get_offset_transform().transform(artist.get_offsets())
            radius = 0.5 * np.sqrt(float(np.max(artist.get_sizes(), initial=0.0))) * px
            faces = artist.get_facecolors()
            filled, line = len(faces) > 0 and float(np.max(faces[:, 3])) > 0, None
        points = np.asarray(points, dtype=float)
        points = points[np.isfinite(points).all(axis=1)]
        if len(points):
            found.append({"label": label, "points": points, "radius": radius, "filled": filled, "line": line,
                          "markers": _has_markers(artist)})
    return found


def _covers(above: dict, below: dict) -> bool:
    """Whether series ``above``, drawn later, leaves nothing of ``below`` in sight: a filled marker over
    each of its markers, the same open ring on each of its open rings, or a solid line at least as
    wide through each vertex of its plain line."""
    distance = np.linalg.norm(below["points"][:, None, :] - above["points"][None, :, :], axis=-1).min(axis=1)
    if below["markers"]:
        if not above["markers"]:
            return False
        if above["filled"]:
            return bool((distance + below["radius"] <= above["radius"] + 1.0).all())
        return not below["filled"] and abs(below["radius"] - above["radius"]) <= 1.0 and bool((distance <= 1.5).all())
    if below["line"] is None or above["line"] is None:
        return False
    return above["line"][1] in ("-", "solid") and above["line"][0] >= below["line"][0] and bool((distance <= 1.5).all())


def _hidden(ax: Axes) -> list[str]:
    series = _series(ax)
    problems = []
    for i, below in enumerate(series):
        for above in series[i + 1:]:
            if _covers(above, below):
                problems.append(f"{_panel_name(ax)}: series {below['label']!r} is hidden under {above['label']!r}")
                break
    return problems


def _crowded(ax: Axes, renderer, tolerance: float) -> list[str]:
    """Neighbouring tick labels of one axis that run into each other: level labels whose boxes
    intersect, turned ones whose parallel lines are closer than a line's height."""
    problems = []
    for axis, along in ((ax.xaxis, 0), (ax.yaxis, 1)):
        shown = {id(t) for t in _tick_labels(ax)}
        labels = [t for t in axis.get_ticklabels() if id(t) in shown]
        labels.sort(key=lambda t: t.get_window_extent(renderer).get_points()[:, along].mean())
        for left, right in zip(labels, labels[1:]):
            angle = np.deg2rad(left.get_rotation())
            if round(left.get_rotation()) % 90 == 0:  # level or upright: the boxes are the text
                clash = _overlap(left.get_window_extent(renderer), right.get_window_extent(renderer), tolerance)
            else:
                _, height, _ = renderer.get_text_width_height_descent("Xg", left.get_fontproperties(), ismath=False)
                anchors = [np.asarray(t.get_transform().transform(t.get_position()), dtype=float) for t in (left, right)]
                gap = abs(anchors[1][along] - anchors[0][along])
                clash = gap * abs(np.sin(angle) if along == 0 else np.cos(angle)) < height - tolerance
            if clash:
                problems.append(f"{_panel_name(ax)} tick labels {left.get_text()!r} and {right.get_text()!r} overlap")
    return problems


def _labels(fig: Figure) -> Iterator[str]:
    for ax in fig.axes:
        if ax.get_visible() and ax.axison:
            for text in (ax.xaxis.label, ax.yaxis.label):
                if _shown(text):
                    yield text.get_text()


def layout_problems(fig: Figure, *, tolerance: float = 1.0) -> list[str]:
    """Every problem of the module's list in ``fig`` as one line each; empty when the figure is clean.

    Lays ``fig`` out on an Agg canvas (replacing its canvas: a figure built without pyplot has one
    that draws nothing) without rasterising it. ``tests/test_figure_layout.py`` runs it on every
    figure the notebooks draw.
    """
    FigureCanvasAgg(fig)
    fig.draw_without_rendering()  # tidies and lays the figure out as a real draw does, without rasterising it
    renderer = fig.canvas.get_renderer()
    canvas = fig.bbox
    panels = [ax for ax in fig.axes if ax.get_visible()]
    texts = {id(ax): [(what, text.get_window_extent(renderer)) for what, text in _panel_texts(ax)] for ax in panels}
    legends = [(name, legend.get_window_extent(renderer)) for name, legend in _legends(fig)]
    title = [("figure title", fig._suptitle.get_window_extent(renderer))] if fig._suptitle is not None and _shown(fig._suptitle) else []  # noqa: SLF001
    problems = []

    every_text = [item for ax in panels for item in texts[id(ax)]] + title
    for name, box in legends:
        problems += [f"{name} covers {what}" for what, other in every_text if _overlap(box, other, tolerance)]
        for ax in panels:
            if not _overlap(box, ax.bbox, tolerance):
                continue
            crossed = [a for a in _data_artists(ax) if _crosses(a, box, renderer, tolerance)]
            if crossed:
                problems.append(f"{name} covers data of {_panel_name(ax)} ({type(crossed[0]).__name__} {crossed[0].get_label()!r})")
    for i, (name, box) in enumerate(legends):
        problems += [f"{name} covers {other_name}" for other_name, other in legends[i + 1:] if _overlap(box, other, tolerance)]

    for i, ax in enumerate(panels):
        for other in panels[i + 1:]:
            for what, box in texts[id(ax)]:
                problems += [f"{what} overlaps {other_what}" for other_what, other_box in texts[id(other)]
                             if _overlap(box, other_box, tolerance)]
        problems += [f"{what} overlaps the figure title" for what, box in texts[id(ax)] if title and _overlap(box, title[0][1], tolerance)]

    for ax in panels:
        problems += _hidden(ax)
        if ax.axison:
            problems += _crowded(ax, renderer, tolerance)

    for what, box in every_text + legends:
        if (box.x0 < canvas.x0 - tolerance or box.y0 < canvas.y0 - tolerance
                or box.x1 > canvas.x1 + tolerance or box.y1 > canvas.y1 + tolerance):
            problems.append(f"{what} is clipped by the figure's edge")

    problems += [f"axis label {label!r} gives an accuracy without %" for label in _labels(fig)
                 if _ACCURACY.search(label) and "%" not in label]
    return list(dict.fromkeys(problems))
