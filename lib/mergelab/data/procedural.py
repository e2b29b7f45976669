"""Procedural image generators for six micro-benchmark tasks and the dense suite.

Each generator mirrors one dataset of the papers' eight-task vision benchmark (001 Sec. 4,
App. C.1) in structure, not in content: house-number-like digits on clutter (SVHN), traffic-sign-like
glyphs (GTSRB), land-cover fields (EuroSAT), aerial scenes (RESISC45), scene compositions (SUN397)
and side views of vehicles (Cars). A generator is ``draw(rng, label, size) -> (S, S, 3)`` float
image in [0, 1]; all randomness comes from the given ``numpy.random.Generator``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mergelab.data.render import (COLORS, FONT, SYMBOLS, band_mask, bitmap, disk, paint, polygon, smooth_noise,
                                  stamp)

__all__ = ["AERIAL", "DENSE_SHAPES", "LANDCOVER", "SCENES", "SIGNS", "VEHICLES", "Drawer", "dense_scene", "draw_aerial",
           "draw_house_number", "draw_landcover", "draw_scene", "draw_sign", "draw_vehicle"]

Drawer = Callable[[np.random.Generator, int, int], np.ndarray]
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _color(rng: np.random.Generator, name: str, jitter: float = 0.06) -> np.ndarray:
    return np.clip(np.asarray(COLORS[name]) + rng.normal(0, jitter, 3), 0, 1)


def _finish(rng: np.random.Generator, canvas: np.ndarray, noise: float = 0.02) -> np.ndarray:
    """Mild global brightness / contrast jitter and pixel noise (colour names stay unambiguous)."""
    gain, bias = rng.uniform(0.9, 1.1), rng.uniform(-0.03, 0.03)
    return np.clip(canvas * gain + bias + rng.normal(0, noise, canvas.shape), 0, 1)


def _two_tone(rng: np.random.Generator, size: int, a: np.ndarray, b: np.ndarray, cells: int) -> np.ndarray:
    """A mixture of two colours by value noise."""
    t = smooth_noise(rng, size, cells)[..., None]
    return a * (1 - t) + b * t


# House numbers (SVHN analogue) --------------------------------------------------------------


def draw_house_number(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """A digit in a random colour on clutter, with parts of neighbouring digits at the sides."""
    bg_a, bg_b = rng.random(3), rng.random(3)
    canvas = _two_tone(rng, size, bg_a, bg_b, cells=int(rng.integers(2, 5)))
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
    return _finish(rng, canvas)


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


def _regular(n: int, cy: float, cx: float, r: float, phase: float) -> list[tuple[float, float]]:
    angles = phase + 2 * np.pi * np.arange(n) / n
    return [(cy - r * np.cos(a), cx + r * np.sin(a)) for a in angles]


#: Outline shapes as functions of (size, cy, cx, radius) -> mask.
SHAPES: dict[str, Callable[[int, float, float, float], np.ndarray]] = {
    "circle": lambda s, cy, cx, r: disk(s, cy, cx, r),
    "triangle": lambda s, cy, cx, r: polygon(s, _regular(3, cy + r * 0.2, cx, r * 1.15, 0.0)),
    "inverted_triangle": lambda s, cy, cx, r: polygon(s, _regular(3, cy - r * 0.2, cx, r * 1.15, np.pi)),
    "octagon": lambda s, cy, cx, r: polygon(s, _regular(8, cy, cx, r, np.pi / 8)),
    "diamond": lambda s, cy, cx, r: polygon(s, _regular(4, cy, cx, r, 0.0)),
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
    canvas = _two_tone(rng, size, _color(rng, rng.choice(["grass", "sky", "gray", "forest"]), 0.1),
                       _color(rng, rng.choice(["soil", "sky", "asphalt", "snow"]), 0.1), cells=3)
    r = rng.uniform(0.36, 0.44) * size
    cy, cx = size / 2 + rng.uniform(-1.5, 1.5, 2)
    shape = SHAPES[sign.shape]
    paint(canvas, shape(size, cy, cx, r), _color(rng, sign.border, 0.05))
    paint(canvas, shape(size, cy, cx, r * 0.72), _color(rng, sign.fill, 0.05))
    if sign.symbol:
        glyph = _pictogram(sign.symbol)
        height = r * (0.75 if glyph.shape[1] > 7 else 0.95)
        width = min(height * glyph.shape[1] / glyph.shape[0], r * 1.3)
        top = cy - height / 2 + (r * 0.15 if sign.shape == "triangle" else 0.0)
        paint(canvas, stamp(size, glyph, top, cx - width / 2, height, width), _color(rng, sign.ink, 0.03))
    return _finish(rng, canvas * rng.uniform(0.8, 1.05))


# Land cover (EuroSAT analogue) and aerial terrains ------------------------------------------------


def _stripes(rng: np.random.Generator, size: int, a: np.ndarray, b: np.ndarray, period: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    angle = rng.uniform(0, np.pi)
    t = (np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + rng.uniform(0, 6.3)) > 0)[..., None]
    return np.where(t, a, b) + rng.normal(0, 0.03, (size, size, 3))


def _dots(rng: np.random.Generator, canvas: np.ndarray, spacing: float, radius: float, color: np.ndarray,
          jitter: float = 0.5) -> np.ndarray:
    size = canvas.shape[0]
    oy, ox = rng.uniform(0, spacing, 2)
    for y in np.arange(oy, size, spacing):
        for x in np.arange(ox, size, spacing):
            paint(canvas, disk(size, y + rng.normal(0, jitter), x + rng.normal(0, jitter), radius), color)
    return canvas


def _blocks(rng: np.random.Generator, canvas: np.ndarray, spacing: float, side: float, colors: list[str]) -> np.ndarray:
    size = canvas.shape[0]
    oy, ox = rng.uniform(0, spacing, 2)
    for y in np.arange(oy - spacing, size, spacing):
        for x in np.arange(ox - spacing, size, spacing):
            s = side * rng.uniform(0.7, 1.2)
            paint(canvas, polygon(size, [(y, x), (y, x + s), (y + s, x + s), (y + s, x)]), _color(rng, rng.choice(colors), 0.05))
    return canvas


def _meander(rng: np.random.Generator, size: int, width: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    vertical = rng.random() < 0.5
    along, across = (yy, xx) if vertical else (xx, yy)
    centre = size / 2 + rng.uniform(-3, 3) + rng.uniform(2, 4) * np.sin(along / size * rng.uniform(4, 8) + rng.uniform(0, 6.3))
    return np.clip(width / 2 - np.abs(across - centre) + 0.5, 0, 1)


#: Terrain painters shared by the land-cover and aerial tasks: (rng, size) -> canvas.
TERRAINS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "forest": lambda rng, s: _two_tone(rng, s, _color(rng, "forest"), _color(rng, "forest") * 0.55, cells=8),
    "desert": lambda rng, s: _two_tone(rng, s, _color(rng, "sand"), _color(rng, "orange") * 0.8, cells=4),
    "farmland": lambda rng, s: _stripes(rng, s, _color(rng, "grass"), _color(rng, "soil"), rng.uniform(4, 7)),
    "snow": lambda rng, s: _two_tone(rng, s, _color(rng, "snow", 0.02), _color(rng, "silver", 0.03), cells=5),
    "pasture": lambda rng, s: _two_tone(rng, s, _color(rng, "grass") * 1.15, _color(rng, "grass"), cells=2),
    "herbs": lambda rng, s: _two_tone(rng, s, _color(rng, "grass"), _color(rng, "yellow") * 0.7, cells=10),
    "water": lambda rng, s: _two_tone(rng, s, _color(rng, "water"), _color(rng, "navy") * 1.5, cells=6),
}


def _highway(rng: np.random.Generator, s: int) -> np.ndarray:
    canvas = TERRAINS[rng.choice(["pasture", "farmland", "herbs"])](rng, s)
    angle = rng.uniform(0, np.pi)
    cy, cx = s / 2 + rng.uniform(-3, 3, 2)
    paint(canvas, band_mask(s, cy, cx, angle, rng.uniform(3, 4.5)), _color(rng, "asphalt"))
    return paint(canvas, band_mask(s, cy, cx, angle, 0.6), _color(rng, "white") * 0.8)


#: (name, painter) of the ten land-cover classes.
LANDCOVER: tuple[tuple[str, Callable[[np.random.Generator, int], np.ndarray]], ...] = (
    ("annual crop land", lambda rng, s: _stripes(rng, s, _color(rng, "grass"), _color(rng, "yellow") * 0.8, rng.uniform(3, 5))),
    ("forest", TERRAINS["forest"]),
    ("herbaceous vegetation", TERRAINS["herbs"]),
    ("highway", _highway),
    ("industrial buildings", lambda rng, s: _blocks(rng, _two_tone(rng, s, _color(rng, "gray"), _color(rng, "asphalt"), 3),
                                                    rng.uniform(8, 11), rng.uniform(5, 7), ["white", "silver"])),
    ("pasture", TERRAINS["pasture"]),
    ("permanent crop", lambda rng, s: _dots(rng, TERRAINS["desert"](rng, s) * 0.8, rng.uniform(3.5, 4.5), 1.1, _color(rng, "forest"))),
    ("residential buildings", lambda rng, s: _blocks(rng, _two_tone(rng, s, _color(rng, "grass"), _color(rng, "gray"), 4),
                                                     rng.uniform(4.5, 5.5), rng.uniform(2.2, 3.2), ["red", "brown", "silver"])),
    ("river", lambda rng, s: paint(TERRAINS[rng.choice(["forest", "pasture", "farmland"])](rng, s),
                                   _meander(rng, s, rng.uniform(3, 5)), _color(rng, "water"))),
    ("sea or lake", TERRAINS["water"]),
)


def draw_landcover(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """One land-cover field seen from above."""
    return _finish(rng, LANDCOVER[label][1](rng, size), noise=0.025)


def _runway(rng, canvas):
    s = canvas.shape[0]
    angle, (cy, cx) = rng.uniform(0, np.pi), s / 2 + rng.uniform(-2, 2, 2)
    paint(canvas, band_mask(s, cy, cx, angle, 5.5), _color(rng, "asphalt"))
    dashes = band_mask(s, cy, cx, angle, 0.8) * (np.sin(np.add.outer(np.arange(s), np.arange(s)) * 1.3) > 0)
    return paint(canvas, dashes, _color(rng, "white"))


def _bridge(rng, canvas):
    s = canvas.shape[0]
    angle, (cy, cx) = rng.uniform(0, np.pi), s / 2 + rng.uniform(-2, 2, 2)
    paint(canvas, band_mask(s, cy, cx, angle, 8), _color(rng, "water"))
    return paint(canvas, band_mask(s, cy, cx, angle + np.pi / 2, 2.5), _color(rng, "silver"))


def _roundabout(rng, canvas):
    s = canvas.shape[0]
    cy, cx = s / 2 + rng.uniform(-2, 2, 2)
    paint(canvas, band_mask(s, cy, cx, rng.uniform(0, np.pi), 2.5), _color(rng, "asphalt"))
    paint(canvas, disk(s, cy, cx, 6.5), _color(rng, "asphalt"))
    return paint(canvas, disk(s, cy, cx, 3.5), _color(rng, "grass"))


def _tanks(rng, canvas):
    s = canvas.shape[0]
    for _ in range(int(rng.integers(3, 6))):
        paint(canvas, disk(s, *rng.uniform(4, s - 4, 2), rng.uniform(2, 3.2)), _color(rng, "white", 0.03))
    return canvas


def _parking(rng, canvas):
    s = canvas.shape[0]
    y, x = rng.uniform(2, 5, 2)
    paint(canvas, polygon(s, [(y, x), (y, s - x), (s - y, s - x), (s - y, x)]), _color(rng, "asphalt"))
    for cy in np.arange(y + 2, s - y - 1, 3.0):
        for cx in np.arange(x + 1.5, s - x - 1, 2.5):
            if rng.random() < 0.7:
                paint(canvas, polygon(s, [(cy, cx), (cy, cx + 1.5), (cy + 2, cx + 1.5), (cy + 2, cx)]), rng.random(3))
    return canvas


def _stadium(rng, canvas):
    s = canvas.shape[0]
    cy, cx = s / 2 + rng.uniform(-2, 2, 2)
    paint(canvas, disk(s, cy, cx, 7.5, aspect=1.4), _color(rng, "brown"))
    return paint(canvas, disk(s, cy, cx, 4.5, aspect=1.4), _color(rng, "grass"))


def _railway(rng, canvas):
    s = canvas.shape[0]
    angle, (cy, cx) = rng.uniform(0, np.pi), s / 2 + rng.uniform(-2, 2, 2)
    paint(canvas, band_mask(s, cy, cx, angle, 4), _color(rng, "silver") * 0.8)
    off = np.array([np.cos(angle), np.sin(angle)]) * 1.2
    for sign in (-1, 1):
        paint(canvas, band_mask(s, cy + sign * off[1], cx + sign * off[0], angle, 0.8), _color(rng, "black"))
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
    return _finish(rng, structure(rng, TERRAINS[terrain](rng, size)), noise=0.025)


# Scenes (SUN397 analogue) -------------------------------------------------------------------------


def _sky(rng: np.random.Generator, size: int, time: str) -> np.ndarray:
    t = (np.arange(size)[:, None, None] + 0.5) / size
    palette = {"midday": ("sky", "white"), "sunset": ("orange", "navy"), "night": ("navy", "black")}[time]
    top, bottom = _color(rng, palette[1]), _color(rng, palette[0])
    sky = np.broadcast_to(top * (1 - t) + bottom * t, (size, size, 3)).copy()
    if time == "night":
        stars = rng.random((size, size)) < 0.03
        sky[stars] = 0.9
    elif time == "sunset":
        paint(sky, disk(size, size * rng.uniform(0.3, 0.5), rng.uniform(3, size - 3), 2.5), _color(rng, "yellow"))
    else:
        paint(sky, disk(size, rng.uniform(2, 6), rng.uniform(3, size - 3), rng.uniform(2, 3), aspect=2.0), _color(rng, "white"))
    return sky


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    return yy, xx


def _tree(rng, horizon, x):
    return [(horizon - rng.uniform(4, 8), x), (horizon + 1, x + 2.5), (horizon + 1, x - 2.5)]


def _building(rng, horizon, x):
    w, h = rng.uniform(3, 6), rng.uniform(4, 10)
    return [(horizon - h, x), (horizon - h, x + w), (horizon + 1, x + w), (horizon + 1, x)]


def _peak(rng, horizon, x):
    return [(horizon - rng.uniform(6, 10), x), (horizon + 1, x + 8), (horizon + 1, x - 8)]


def _beach(rng, ground, horizon):
    yy, _ = _coords(ground.shape[0])
    return paint(ground, np.clip(yy - horizon, 0, 1) * np.clip(horizon + 3.5 - yy, 0, 1), _color(rng, "water")), 0.0


def _meadow(rng, ground, horizon):
    return _dots(rng, ground, 3.0, 0.5, _color(rng, rng.choice(["yellow", "red", "white"])), jitter=1.0), 0.0


def _dunes(rng, ground, horizon):
    yy, xx = _coords(ground.shape[0])
    return ground * (1 + 0.12 * np.sin(xx / 2.5 + yy / 1.5 + rng.uniform(0, 6)))[..., None], 0.0


def _boats(rng, ground, horizon):
    size = ground.shape[0]
    for _ in range(2):
        x, y = rng.uniform(0, size), rng.uniform(horizon + 2, size - 2)
        paint(ground, polygon(size, [(y - 1.5, x - 3), (y - 1.5, x + 3), (y, x + 2), (y, x - 2)]), _color(rng, "white"))
    return ground, 0.0


def _standing(count: int, outline, color: str):
    """Objects standing on the horizon (trees, buildings, peaks): painted, and returned as a mask."""

    def add(rng, ground, horizon):
        mask = np.zeros(ground.shape[:2])
        for _ in range(count):
            shape = polygon(ground.shape[0], outline(rng, horizon, rng.uniform(0, ground.shape[0])))
            paint(ground, shape, _color(rng, color) * 0.8)
            mask = np.maximum(mask, shape)
        return ground, mask

    return add


#: Ground types of the scene task: (fill colour, adder). An adder paints on the ground and returns
#: (ground, mask of what rises above the horizon).
GROUNDS: dict[str, tuple[str, Callable]] = {
    "beach": ("sand", _beach), "meadow": ("grass", _meadow), "forest": ("forest", _standing(5, _tree, "forest")),
    "snowfield": ("snow", lambda rng, ground, horizon: (ground, 0.0)), "desert": ("sand", _dunes),
    "city": ("asphalt", _standing(4, _building, "silver")), "harbor": ("water", _boats),
    "mountains": ("grass", _standing(2, _peak, "brown")),
}


def _ground(rng: np.random.Generator, size: int, kind: str, horizon: float) -> tuple[np.ndarray, np.ndarray]:
    """The ground image and its mask (1 below the horizon line and on objects rising above it)."""
    yy, _ = _coords(size)
    fill, add = GROUNDS[kind]
    ground = _two_tone(rng, size, _color(rng, fill), _color(rng, fill) * 0.8, cells=4)
    ground, rising = add(rng, ground, horizon)
    return ground, np.maximum(np.clip(yy - horizon, 0, 1), rising)


_TIMES = ("midday", "sunset", "night")
_GROUNDS = tuple(GROUNDS)

#: (name, ground, time) of the 24 scene classes.
SCENES = tuple((f"{ground} at {time}", ground, time) for ground in _GROUNDS for time in _TIMES)
_LIGHT = {"midday": np.array([1.0, 1.0, 1.0]), "sunset": np.array([1.0, 0.72, 0.55]), "night": np.array([0.3, 0.32, 0.45])}


def draw_scene(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """A landscape: sky by time of day over a ground type with its objects."""
    _, ground_kind, time = SCENES[label]
    horizon = rng.uniform(0.4, 0.6) * size
    ground, mask = _ground(rng, size, ground_kind, horizon)
    canvas = paint(_sky(rng, size, time), mask, ground * _LIGHT[time])
    return _finish(rng, canvas)


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
    canvas = _two_tone(rng, size, _color(rng, rng.choice(["sky", "gray", "brown", "grass"]), 0.1),
                       _color(rng, rng.choice(["silver", "sky", "forest"]), 0.1), cells=3)
    paint(canvas, np.clip(np.mgrid[0:size, 0:size][0] + 0.5 - road, 0, 1), _color(rng, "asphalt"))
    width = rng.uniform(0.72, 0.85) * size
    height = width * 0.5
    left, top = (size - width) / 2 + rng.uniform(-1.5, 1.5), road - height * 0.8 + rng.uniform(-1, 1)
    flip = rng.random() < 0.5

    def place(points):
        return [(top + y * height, left + (1 - x if flip else x) * width) for y, x in points]

    color = _color(rng, paint_name, 0.04)
    outline, cabin = _BODIES[body]
    paint(canvas, polygon(size, place(cabin)), color)
    paint(canvas, polygon(size, place(outline)), color)
    window = [(y + 0.06, x) for y, x in cabin]
    paint(canvas, polygon(size, place(window)) * 0.6, _color(rng, "sky"))
    for wheel_x in (0.2, 0.8):
        (wy, wx), = place([(0.85, wheel_x)])
        paint(canvas, disk(size, wy, wx, height * 0.2), _color(rng, "black", 0.02))
    return _finish(rng, canvas)


# Dense suite (004 Sec. 4.1 analogue) -------------------------------------------------------------

#: Object shapes of the dense suite's classification task.
DENSE_SHAPES = ("disk", "square", "triangle", "diamond", "bar", "ring")


def _object_mask(size: int, shape: str, cy: float, cx: float, r: float) -> np.ndarray:
    return {
        "disk": lambda: disk(size, cy, cx, r),
        "square": lambda: polygon(size, [(cy - r, cx - r), (cy - r, cx + r), (cy + r, cx + r), (cy + r, cx - r)]),
        "triangle": lambda: polygon(size, _regular(3, cy + r * 0.2, cx, r * 1.2, 0.0)),
        "diamond": lambda: polygon(size, _regular(4, cy, cx, r * 1.2, 0.0)),
        "bar": lambda: polygon(size, [(cy - r * 0.4, cx - r * 1.3), (cy - r * 0.4, cx + r * 1.3), (cy + r * 0.4, cx + r * 1.3), (cy + r * 0.4, cx - r * 1.3)]),
        "ring": lambda: np.clip(disk(size, cy, cx, r) - disk(size, cy, cx, r * 0.5), 0, 1),
    }[shape]()


def dense_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """An image with a horizon and one object, plus its per-pixel and global targets.

    Targets: ``segmentation`` (S, S) in {0 sky, 1 ground, 2 object}; ``depth`` (S, S) — the ground
    recedes towards the horizon, the sky is far, the object sits at its own depth; ``keypoint``
    (2,) — the object's centre (y, x) in [0, 1]; ``shape`` — the object's shape index.
    """
    yy = np.mgrid[0:size, 0:size][0] + 0.5
    horizon = rng.uniform(0.3, 0.6) * size
    ground_mask = np.clip(yy - horizon, 0, 1)
    canvas = paint(_sky(rng, size, "midday"), ground_mask, TERRAINS[rng.choice(["pasture", "desert", "farmland", "snow"])](rng, size))
    shape = int(rng.integers(len(DENSE_SHAPES)))
    r = rng.uniform(0.12, 0.22) * size
    cy, cx = rng.uniform(r + 1, size - r - 1, 2)
    mask = _object_mask(size, DENSE_SHAPES[shape], cy, cx, r)
    paint(canvas, mask, rng.random(3))
    segmentation = np.where(mask > 0.5, 2, np.where(ground_mask > 0.5, 1, 0))
    ground_depth = np.clip(size / np.maximum(yy - horizon, 0.5), 0, 10) / 10
    depth = np.where(segmentation == 2, rng.uniform(0.05, 0.5), np.where(segmentation == 1, ground_depth, 1.0))
    targets = {"segmentation": segmentation, "depth": depth, "keypoint": np.array([cy, cx]) / size, "shape": np.array(shape)}
    return _finish(rng, canvas), targets
