"""Procedural image generators for six micro-benchmark tasks and the dense suite.

Each generator mirrors one dataset of the papers' eight-task vision benchmark (001 Sec. 4,
App. C.1) in structure, not in content: house-number-like digits on clutter (SVHN), traffic-sign-like
glyphs (GTSRB), land-cover fields (EuroSAT), aerial scenes (RESISC45), scene compositions (SUN397)
and side views of vehicles (Cars); the scenes (SUN397) and the dense suite are in
:mod:`mergelab.data.scenes`. A generator is ``draw(rng, label, size) -> (S, S, 3)`` float
image in [0, 1]; all randomness comes from the given ``numpy.random.Generator``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mergelab.data.render import (FONT, SYMBOLS, band_mask, bitmap, disk, dots, finish, paint, polygon, regular,
                                  stamp, tint, two_tone)

__all__ = ["AERIAL", "LANDCOVER", "SIGNS", "TERRAINS", "VEHICLES", "Drawer", "draw_aerial", "draw_house_number",
           "draw_landcover", "draw_sign", "draw_vehicle"]

Drawer = Callable[[np.random.Generator, int, int], np.ndarray]
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


# House numbers (SVHN analogue) --------------------------------------------------------------


def draw_house_number(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """A digit in a random colour on clutter, with parts of neighbouring digits at the sides."""
    bg_a, bg_b = rng.random(3), rng.random(3)
    canvas = two_tone(rng, size, bg_a, bg_b, cells=int(rng.integers(2, 5)))
    for _ in range(int(rng.integers(0, 3))):  # clutter rectangles
        y, x = rng.uniform(0, size, 2)
        h, w = rng.uniform(2, size / 2, 2)
        paint(canvas, polygon(size, [(y, x), (y, x + w), (y + h, x + w), (y + h, x)]), rng.random(3))
    background = canvas.mean(axis=(0, 1))
    ink = rng.random(3)
    while abs(ink.mean() - background.mean()) < 0.45:
        ink = rng.random(3)
    height = rng.uniform(0.62, 0.78) * size
    width = height * 5 / 7
    top = size / 2 - height / 2 + rng.uniform(-1.5, 1.5)
    left = size / 2 - width / 2 + rng.uniform(-1.5, 1.5)
    gap = width * rng.uniform(1.15, 1.35)
    for offset in (-gap, gap):
        if rng.random() < 0.4:
            paint(canvas, stamp(size, bitmap(FONT[str(rng.integers(10))]), top, left + offset, height), ink)
    paint(canvas, stamp(size, bitmap(FONT[str(label)]), top, left, height), ink)
    return finish(rng, canvas)


# Traffic signs (GTSRB analogue) ---------------------------------------------------------------


@dataclass(frozen=True)
class Sign:
    """One sign class: outline shape, border / fill colours and the pictogram (digits or a symbol)."""

    name: str
    shape: str
    border: str
    fill: str
    symbol: str = ""
    ink: str = "black"


SIGNS: tuple[Sign, ...] = (
    *(Sign(f"speed limit {v}", "circle", "red", "white", v) for v in ("30", "50", "70")),
    Sign("no overtaking", "circle", "red", "white", "two_cars"),
    Sign("no trucks", "circle", "red", "white", "truck"),
    Sign("no vehicles", "circle", "red", "white"),
    Sign("no entry", "circle", "red", "red", "bar", "white"),
    Sign("ahead only", "circle", "blue", "blue", "arrow_up", "white"),
    Sign("turn left ahead", "circle", "blue", "blue", "arrow_left", "white"),
    Sign("turn right ahead", "circle", "blue", "blue", "arrow_right", "white"),
    Sign("keep right", "circle", "blue", "blue", "arrow_down_right", "white"),
    Sign("keep left", "circle", "blue", "blue", "arrow_down_left", "white"),
    Sign("roundabout", "circle", "blue", "blue", "ring", "white"),
    Sign("general caution", "triangle", "red", "white", "exclamation"),
    Sign("dangerous curve to the left", "triangle", "red", "white", "curve_left"),
    Sign("dangerous curve to the right", "triangle", "red", "white", "curve_right"),
    Sign("pedestrian crossing", "triangle", "red", "white", "person"),
    Sign("slippery road", "triangle", "red", "white", "waves"),
    Sign("traffic signals ahead", "triangle", "red", "white", "lights"),
    Sign("yield", "inverted_triangle", "red", "white"),
    Sign("stop", "octagon", "white", "red", "bar", "white"),
    Sign("priority road", "diamond", "white", "yellow"),
    Sign("end of all limits", "circle", "gray", "white", "slash"),
)


#: Outline shapes as functions of (size, cy, cx, radius) -> mask.
SHAPES: dict[str, Callable[[int, float, float, float], np.ndarray]] = {
    "circle": lambda s, cy, cx, r: disk(s, cy, cx, r),
    "triangle": lambda s, cy, cx, r: polygon(s, regular(3, cy + r * 0.2, cx, r * 1.15, 0.0)),
    "inverted_triangle": lambda s, cy, cx, r: polygon(s, regular(3, cy - r * 0.2, cx, r * 1.15, np.pi)),
    "octagon": lambda s, cy, cx, r: polygon(s, regular(8, cy, cx, r, np.pi / 8)),
    "diamond": lambda s, cy, cx, r: polygon(s, regular(4, cy, cx, r, 0.0)),
}


def _pictogram(symbol: str) -> np.ndarray:
    """A symbol bitmap, or the digits of a speed limit side by side with one blank column."""
    if symbol in SYMBOLS:
        return bitmap(SYMBOLS[symbol])
    glyphs = [bitmap(FONT[d]) for d in symbol]
    blank = np.zeros((7, 1))
    return np.concatenate([part for g in glyphs for part in (g, blank)][:-1], axis=1)


def draw_sign(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """A sign (outline, fill, pictogram) on a natural-looking background, with lighting jitter."""
    sign = SIGNS[label]
    canvas = two_tone(rng, size, tint(rng, rng.choice(["grass", "sky", "gray", "forest"]), 0.1),
                       tint(rng, rng.choice(["soil", "sky", "asphalt", "snow"]), 0.1), cells=3)
    r = rng.uniform(0.36, 0.44) * size
    cy, cx = size / 2 + rng.uniform(-1.5, 1.5, 2)
    shape = SHAPES[sign.shape]
    paint(canvas, shape(size, cy, cx, r), tint(rng, sign.border, 0.05))
    paint(canvas, shape(size, cy, cx, r * 0.72), tint(rng, sign.fill, 0.05))
    if sign.symbol:
        glyph = _pictogram(sign.symbol)
        height = r * (0.75 if glyph.shape[1] > 7 else 0.95)
        width = min(height * glyph.shape[1] / glyph.shape[0], r * 1.3)
        top = cy - height / 2 + (r * 0.15 if sign.shape == "triangle" else 0.0)
        paint(canvas, stamp(size, glyph, top, cx - width / 2, height, width), tint(rng, sign.ink, 0.03))
    return finish(rng, canvas * rng.uniform(0.8, 1.05))


# Land cover (EuroSAT analogue) and aerial terrains ------------------------------------------------


def _stripes(rng: np.random.Generator, size: int, a: np.ndarray, b: np.ndarray, period: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    angle = rng.uniform(0, np.pi)
    t = (np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + rng.uniform(0, 6.3)) > 0)[..., None]
    return np.where(t, a, b) + rng.normal(0, 0.03, (size, size, 3))


def _blocks(rng: np.random.Generator, canvas: np.ndarray, spacing: float, side: float, colors: list[str]) -> np.ndarray:
    size = canvas.shape[0]
    oy, ox = rng.uniform(0, spacing, 2)
    for y in np.arange(oy - spacing, size, spacing):
        for x in np.arange(ox - spacing, size, spacing):
            s = side * rng.uniform(0.7, 1.2)
            paint(canvas, polygon(size, [(y, x), (y, x + s), (y + s, x + s), (y + s, x)]), tint(rng, rng.choice(colors), 0.05))
    return canvas


def _meander(rng: np.random.Generator, size: int, width: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    vertical = rng.random() < 0.5
    along, across = (yy, xx) if vertical else (xx, yy)
    centre = size / 2 + rng.uniform(-3, 3) + rng.uniform(2, 4) * np.sin(along / size * rng.uniform(4, 8) + rng.uniform(0, 6.3))
    return np.clip(width / 2 - np.abs(across - centre) + 0.5, 0, 1)


#: Terrain painters shared by the land-cover and aerial tasks: (rng, size) -> canvas.
TERRAINS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "forest": lambda rng, s: two_tone(rng, s, tint(rng, "forest"), tint(rng, "forest") * 0.55, cells=8),
    "desert": lambda rng, s: two_tone(rng, s, tint(rng, "sand"), tint(rng, "orange") * 0.8, cells=4),
    "farmland": lambda rng, s: _stripes(rng, s, tint(rng, "grass"), tint(rng, "soil"), rng.uniform(4, 7)),
    "snow": lambda rng, s: two_tone(rng, s, tint(rng, "snow", 0.02), tint(rng, "silver", 0.03), cells=5),
    "pasture": lambda rng, s: two_tone(rng, s, tint(rng, "grass") * 1.15, tint(rng, "grass"), cells=2),
    "herbs": lambda rng, s: two_tone(rng, s, tint(rng, "grass"), tint(rng, "yellow") * 0.7, cells=10),
    "water": lambda rng, s: two_tone(rng, s, tint(rng, "water"), tint(rng, "navy") * 1.5, cells=6),
}


def _highway(rng: np.random.Generator, s: int) -> np.ndarray:
    canvas = TERRAINS[rng.choice(["pasture", "farmland", "herbs"])](rng, s)
    angle = rng.uniform(0, np.pi)
    cy, cx = s / 2 + rng.uniform(-3, 3, 2)
    paint(canvas, band_mask(s, cy, cx, angle, rng.uniform(3, 4.5)), tint(rng, "asphalt"))
    return paint(canvas, band_mask(s, cy, cx, angle, 0.6), tint(rng, "white") * 0.8)


#: (name, painter) of the ten land-cover classes.
LANDCOVER: tuple[tuple[str, Callable[[np.random.Generator, int], np.ndarray]], ...] = (
    ("annual crop land", lambda rng, s: _stripes(rng, s, tint(rng, "grass"), tint(rng, "yellow") * 0.8, rng.uniform(3, 5))),
    ("forest", TERRAINS["forest"]),
    ("herbaceous vegetation", TERRAINS["herbs"]),
    ("highway", _highway),
    ("industrial buildings", lambda rng, s: _blocks(rng, two_tone(rng, s, tint(rng, "gray"), tint(rng, "asphalt"), 3),
                                                    rng.uniform(8, 11), rng.uniform(5, 7), ["white", "silver"])),
    ("pasture", TERRAINS["pasture"]),
    ("permanent crop", lambda rng, s: dots(rng, TERRAINS["desert"](rng, s) * 0.8, rng.uniform(3.5, 4.5), 1.1, tint(rng, "forest"))),
    ("residential buildings", lambda rng, s: _blocks(rng, two_tone(rng, s, tint(rng, "grass"), tint(rng, "gray"), 4),
                                                     rng.uniform(4.5, 5.5), rng.uniform(2.2, 3.2), ["red", "brown", "silver"])),
    ("river", lambda rng, s: paint(TERRAINS[rng.choice(["forest", "pasture", "farmland"])](rng, s),
                                   _meander(rng, s, rng.uniform(3, 5)), tint(rng, "water"))),
    ("sea or lake", TERRAINS["water"]),
)


def draw_landcover(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """One land-cover field seen from above."""
    return finish(rng, LANDCOVER[label][1](rng, size), noise=0.025)


def _runway(rng, canvas):
    s = canvas.shape[0]
    angle, (cy, cx) = rng.uniform(0, np.pi), s / 2 + rng.uniform(-2, 2, 2)
    paint(canvas, band_mask(s, cy, cx, angle, 5.5), tint(rng, "asphalt"))
    dashes = band_mask(s, cy, cx, angle, 0.8) * (np.sin(np.add.outer(np.arange(s), np.arange(s)) * 1.3) > 0)
    return paint(canvas, dashes, tint(rng, "white"))


def _bridge(rng, canvas):
    s = canvas.shape[0]
    angle, (cy, cx) = rng.uniform(0, np.pi), s / 2 + rng.uniform(-2, 2, 2)
    paint(canvas, band_mask(s, cy, cx, angle, 8), tint(rng, "water"))
    return paint(canvas, band_mask(s, cy, cx, angle + np.pi / 2, 2.5), tint(rng, "silver"))


def _roundabout(rng, canvas):
    s = canvas.shape[0]
    cy, cx = s / 2 + rng.uniform(-2, 2, 2)
    paint(canvas, band_mask(s, cy, cx, rng.uniform(0, np.pi), 2.5), tint(rng, "asphalt"))
    paint(canvas, disk(s, cy, cx, 6.5), tint(rng, "asphalt"))
    return paint(canvas, disk(s, cy, cx, 3.5), tint(rng, "grass"))


def _tanks(rng, canvas):
    s = canvas.shape[0]
    for _ in range(int(rng.integers(3, 6))):
        paint(canvas, disk(s, *rng.uniform(4, s - 4, 2), rng.uniform(2, 3.2)), tint(rng, "white", 0.03))
    return canvas


def _parking(rng, canvas):
    s = canvas.shape[0]
    y, x = rng.uniform(2, 5, 2)
    paint(canvas, polygon(s, [(y, x), (y, s - x), (s - y, s - x), (s - y, x)]), tint(rng, "asphalt"))
    for cy in np.arange(y + 2, s - y - 1, 3.0):
        for cx in np.arange(x + 1.5, s - x - 1, 2.5):
            if rng.random() < 0.7:
                paint(canvas, polygon(s, [(cy, cx), (cy, cx + 1.5), (cy + 2, cx + 1.5), (cy + 2, cx)]), rng.random(3))
    return canvas


def _stadium(rng, canvas):
    s = canvas.shape[0]
    cy, cx = s / 2 + rng.uniform(-2, 2, 2)
    paint(canvas, disk(s, cy, cx, 7.5, aspect=1.4), tint(rng, "brown"))
    return paint(canvas, disk(s, cy, cx, 4.5, aspect=1.4), tint(rng, "grass"))


def _railway(rng, canvas):
    s = canvas.shape[0]
    angle, (cy, cx) = rng.uniform(0, np.pi), s / 2 + rng.uniform(-2, 2, 2)
    paint(canvas, band_mask(s, cy, cx, angle, 4), tint(rng, "silver") * 0.8)
    off = np.array([np.cos(angle), np.sin(angle)]) * 1.2
    for sign in (-1, 1):
        paint(canvas, band_mask(s, cy + sign * off[1], cx + sign * off[0], angle, 0.8), tint(rng, "black"))
    return canvas


_STRUCTURES = (("runway", _runway), ("bridge", _bridge), ("roundabout", _roundabout), ("storage tanks", _tanks),
               ("parking lot", _parking), ("stadium", _stadium), ("railway", _railway))
_PLACES = (("desert", "in the desert"), ("forest", "in a forest"), ("farmland", "among farmland"), ("snow", "in the snow"))

#: (name, structure painter, terrain) of the 28 aerial-scene classes.
AERIAL = tuple((f"{structure} {place}", paint_structure, terrain)
               for structure, paint_structure in _STRUCTURES for terrain, place in _PLACES)


def draw_aerial(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """An aerial scene: a structure (runway, bridge, …) on a terrain (desert, forest, …)."""
    _, structure, terrain = AERIAL[label]
    return finish(rng, structure(rng, TERRAINS[terrain](rng, size)), noise=0.025)


# Vehicles (Cars analogue) ------------------------------------------------------------------------

#: Side-view body outlines in a unit box (y down, x from the rear 0 to the front 1): body, cabin.
_BODIES: dict[str, tuple[list[tuple[float, float]], list[tuple[float, float]]]] = {
    "sedan": ([(0.45, 0.0), (0.45, 1.0), (0.85, 1.0), (0.85, 0.0)], [(0.45, 0.18), (0.1, 0.32), (0.1, 0.6), (0.45, 0.75)]),
    "hatchback": ([(0.45, 0.1), (0.45, 0.9), (0.85, 0.9), (0.85, 0.1)], [(0.45, 0.1), (0.05, 0.15), (0.05, 0.55), (0.45, 0.72)]),
    "pickup truck": ([(0.5, 0.0), (0.5, 1.0), (0.85, 1.0), (0.85, 0.0)], [(0.5, 0.55), (0.0, 0.58), (0.0, 0.82), (0.5, 0.95)]),
    "van": ([(0.0, 0.05), (0.0, 0.82), (0.85, 1.0), (0.85, 0.05)], [(0.05, 0.62), (0.05, 0.8), (0.35, 0.92), (0.35, 0.62)]),
    "sports car": ([(0.6, 0.0), (0.5, 1.0), (0.85, 1.0), (0.85, 0.0)], [(0.6, 0.25), (0.32, 0.45), (0.32, 0.6), (0.5, 0.85)]),
}
_PAINTS = ("red", "blue", "white", "black", "yellow", "green", "orange")

#: (name, body, colour) of the 35 vehicle classes.
VEHICLES = tuple((f"{paint_name} {body}", body, paint_name) for body in _BODIES for paint_name in _PAINTS)


def draw_vehicle(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """A side view of a vehicle of a given body type and paint colour on a street background."""
    _, body, paint_name = VEHICLES[label]
    road = rng.uniform(0.62, 0.72) * size
    canvas = two_tone(rng, size, tint(rng, rng.choice(["sky", "gray", "brown", "grass"]), 0.1),
                       tint(rng, rng.choice(["silver", "sky", "forest"]), 0.1), cells=3)
    paint(canvas, np.clip(np.mgrid[0:size, 0:size][0] + 0.5 - road, 0, 1), tint(rng, "asphalt"))
    width = rng.uniform(0.72, 0.85) * size
    height = width * 0.5
    left, top = (size - width) / 2 + rng.uniform(-1.5, 1.5), road - height * 0.8 + rng.uniform(-1, 1)
    flip = rng.random() < 0.5

    def place(points):
        return [(top + y * height, left + (1 - x if flip else x) * width) for y, x in points]

    color = tint(rng, paint_name, 0.04)
    outline, cabin = _BODIES[body]
    paint(canvas, polygon(size, place(cabin)), color)
    paint(canvas, polygon(size, place(outline)), color)
    window = [(y + 0.06, x) for y, x in cabin]
    paint(canvas, polygon(size, place(window)) * 0.6, tint(rng, "sky"))
    for wheel_x in (0.2, 0.8):
        (wy, wx), = place([(0.85, wheel_x)])
        paint(canvas, disk(size, wy, wx, height * 0.2), tint(rng, "black", 0.02))
    return finish(rng, canvas)
