"""Drawing primitives for the procedural micro-benchmark tasks: float RGB canvases in [0, 1].

Everything is numpy, deterministic given a ``numpy.random.Generator``, and vectorised over the
pixels of one image. Canvases are ``(S, S, 3)`` float arrays; masks are ``(S, S)`` floats in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["COLORS", "FONT", "SYMBOLS", "Canvas", "band_mask", "bitmap", "disk", "dots", "finish", "paint", "polygon",
           "regular", "resize", "smooth_noise", "stamp", "tint", "two_tone"]

Canvas = np.ndarray

#: Named RGB colours used by class names (vehicles, signs) and palettes.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.1, 0.1), "blue": (0.1, 0.25, 0.85), "white": (0.95, 0.95, 0.95), "black": (0.06, 0.06, 0.07),
    "yellow": (0.95, 0.85, 0.1), "green": (0.1, 0.6, 0.2), "silver": (0.62, 0.64, 0.68), "gray": (0.45, 0.45, 0.47),
    "orange": (0.95, 0.5, 0.1), "brown": (0.45, 0.3, 0.15), "sky": (0.55, 0.75, 0.95), "navy": (0.05, 0.07, 0.2),
    "sand": (0.86, 0.76, 0.5), "water": (0.15, 0.35, 0.65), "grass": (0.3, 0.65, 0.25), "forest": (0.08, 0.32, 0.12),
    "snow": (0.93, 0.95, 0.98), "soil": (0.5, 0.36, 0.2), "asphalt": (0.3, 0.3, 0.32),
}

#: A 5 × 7 bitmap font for the digits (rows top to bottom, '#' = ink).
FONT: dict[str, tuple[str, ...]] = {
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("####.", "....#", "....#", ".###.", "....#", "....#", "####."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
}

#: 7 × 7 pictograms for the traffic-sign-like task.
SYMBOLS: dict[str, tuple[str, ...]] = {
    "arrow_up": ("...#...", "..###..", ".#.#.#.", "...#...", "...#...", "...#...", "...#..."),
    "arrow_left": (".......", "..#....", ".#.....", "#######", ".#.....", "..#....", "......."),
    "arrow_right": (".......", "....#..", ".....#.", "#######", ".....#.", "....#..", "......."),
    "arrow_down_right": ("#......", ".#.....", "..#....", "...#..#", "....#.#", ".....##", "..####."),
    "arrow_down_left": ("......#", ".....#.", "....#..", "#..#...", "#.#....", "##.....", ".####.."),
    "ring": ("..###..", ".#...#.", "#.....#", "#.....#", "#.....#", ".#...#.", "..###.."),
    "exclamation": ("...#...", "...#...", "...#...", "...#...", "...#...", ".......", "...#..."),
    "curve_left": ("....#..", "....#..", "...#...", "..#....", "..#....", "...#...", "....#.."),
    "curve_right": ("..#....", "..#....", "...#...", "....#..", "....#..", "...#...", "..#...."),
    "person": ("...#...", "..###..", ".#.#.#.", "...#...", "..#.#..", ".#...#.", "#.....#"),
    "waves": (".......", "##...##", "..#.#..", "...#...", "##...##", "..#.#..", "...#..."),
    "lights": ("...#...", "..###..", "...#...", "..###..", "...#...", "..###..", "...#..."),
    "two_cars": (".......", ".......", "##...##", "##...##", "##...##", "#.#.#.#", "......."),
    "truck": (".......", "####...", "####.#.", "######.", "#######", ".#...#.", "......."),
    "bar": (".......", ".......", ".......", "#######", "#######", ".......", "......."),
    "slash": ("......#", ".....#.", "....#..", "...#...", "..#....", ".#.....", "#......"),
}

_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(yy, xx)`` in pixel units."""
    if size not in _GRIDS:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
        _GRIDS[size] = (yy, xx)
    return _GRIDS[size]


def bitmap(rows: Sequence[str]) -> np.ndarray:
    """A glyph as a float array (1 = ink)."""
    return np.array([[c == "#" for c in row] for row in rows], dtype=np.float64)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a ``(h, w[, c])`` array to ``(size, size[, c])`` (pixel-centre aligned)."""
    h, w = image.shape[:2]

    def axis(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        t = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
        i0 = np.floor(t).astype(int)
        return i0, np.minimum(i0 + 1, n - 1), t - i0

    y0, y1, wy = axis(h)
    x0, x1, wx = axis(w)
    wy = wy.reshape(-1, 1, *([1] * (image.ndim - 2)))
    wx = wx.reshape(1, -1, *([1] * (image.ndim - 2)))
    top = image[y0][:, x0] * (1 - wx) + image[y0][:, x1] * wx
    bottom = image[y1][:, x0] * (1 - wx) + image[y1][:, x1] * wx
    return top * (1 - wy) + bottom * wy


def smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int = 1) -> np.ndarray:
    """Value noise: a ``cells × cells`` random grid bilinearly upsampled, ``(size, size[, channels])``."""
    grid = rng.random((cells, cells, channels) if channels > 1 else (cells, cells))
    return resize(grid, size)


def paint(canvas: Canvas, mask: np.ndarray, color: Sequence[float] | np.ndarray) -> Canvas:
    """Alpha-blend ``color`` (RGB or a per-pixel ``(S, S, 3)`` image) into ``canvas`` where ``mask`` is set."""
    m = np.clip(mask, 0, 1)[..., None]
    canvas *= 1 - m
    canvas += m * np.asarray(color, dtype=np.float64)
    return canvas


def disk(size: int, cy: float, cx: float, r: float, aspect: float = 1.0) -> np.ndarray:
    """An anti-aliased filled ellipse (``aspect`` stretches x)."""
    yy, xx = _grid(size)
    d = np.sqrt((yy - cy) ** 2 + ((xx - cx) / aspect) ** 2)
    return np.clip(r - d + 0.5, 0, 1)


def polygon(size: int, vertices: Sequence[tuple[float, float]]) -> np.ndarray:
    """A filled convex polygon (``(y, x)`` vertices in order), 4× supersampled for soft edges."""
    fine = 4
    yy, xx = np.mgrid[0:size * fine, 0:size * fine].astype(np.float64) / fine + 0.5 / fine
    v = np.asarray(vertices, dtype=np.float64)
    inside = np.ones_like(yy, dtype=bool)
    nxt = np.roll(v, -1, axis=0)
    orientation = np.sign(np.sum((nxt[:, 1] - v[:, 1]) * (nxt[:, 0] + v[:, 0]))) or 1.0
    for (y0, x0), (y1, x1) in zip(v, nxt):
        inside &= orientation * ((x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0)) <= 0
    return inside.reshape(size, fine, size, fine).mean(axis=(1, 3))


def band_mask(size: int, cy: float, cx: float, angle: float, width: float) -> np.ndarray:
    """A straight band of ``width`` pixels through ``(cy, cx)`` at ``angle`` (radians)."""
    yy, xx = _grid(size)
    d = np.abs(-(yy - cy) * np.cos(angle) + (xx - cx) * np.sin(angle))
    return np.clip(width / 2 - d + 0.5, 0, 1)


def stamp(size: int, glyph: np.ndarray, top: float, left: float, height: float, width: float | None = None) -> np.ndarray:
    """A mask of ``glyph`` drawn into a ``height × width`` box at ``(top, left)`` (nearest sampling)."""
    gh, gw = glyph.shape
    width = height * gw / gh if width is None else width
    yy, xx = _grid(size)
    gy = np.floor((yy - top) / height * gh).astype(int)
    gx = np.floor((xx - left) / width * gw).astype(int)
    inside = (gy >= 0) & (gy < gh) & (gx >= 0) & (gx < gw)
    out = np.zeros((size, size))
    out[inside] = glyph[gy[inside], gx[inside]]
    return out


def tint(rng: np.random.Generator, name: str, jitter: float = 0.06) -> np.ndarray:
    """The named colour of :data:`COLORS` with Gaussian jitter per channel, clipped to [0, 1]."""
    return np.clip(np.asarray(COLORS[name]) + rng.normal(0, jitter, 3), 0, 1)


def finish(rng: np.random.Generator, canvas: np.ndarray, noise: float = 0.02) -> np.ndarray:
    """Mild global brightness / contrast jitter and pixel noise (colour names stay unambiguous)."""
    gain, bias = rng.uniform(0.9, 1.1), rng.uniform(-0.03, 0.03)
    return np.clip(canvas * gain + bias + rng.normal(0, noise, canvas.shape), 0, 1)


def two_tone(rng: np.random.Generator, size: int, a: np.ndarray, b: np.ndarray, cells: int) -> np.ndarray:
    """A mixture of two colours by value noise."""
    t = smooth_noise(rng, size, cells)[..., None]
    return a * (1 - t) + b * t


def regular(n: int, cy: float, cx: float, r: float, phase: float) -> list[tuple[float, float]]:
    """The ``n`` vertices of a regular polygon of circumradius ``r`` about (cy, cx), the first at angle ``phase``."""
    angles = phase + 2 * np.pi * np.arange(n) / n
    return [(cy - r * np.cos(a), cx + r * np.sin(a)) for a in angles]


def dots(rng: np.random.Generator, canvas: np.ndarray, spacing: float, radius: float, color: np.ndarray,
          jitter: float = 0.5) -> np.ndarray:
    """Paint a jittered grid of disks (``spacing`` apart, random offset) onto ``canvas`` in place."""
    size = canvas.shape[0]
    oy, ox = rng.uniform(0, spacing, 2)
    for y in np.arange(oy, size, spacing):
        for x in np.arange(ox, size, spacing):
            paint(canvas, disk(size, y + rng.normal(0, jitter), x + rng.normal(0, jitter), radius), color)
    return canvas
