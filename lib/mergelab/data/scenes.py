"""Composed scenes: SUN397-like landscapes (sky by time of day over a ground with its objects) and
the dense suite's images with per-pixel targets (004 Sec. 4.1 analogue).

A scene generator is ``draw(rng, label, size) -> (S, S, 3)`` float image in [0, 1], as in
:mod:`mergelab.data.procedural`; all randomness comes from the given ``numpy.random.Generator``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mergelab.data.procedural import TERRAINS
from mergelab.data.render import disk, dots, finish, paint, polygon, regular, tint, two_tone

__all__ = ["DENSE_SHAPES", "SCENES", "dense_scene", "draw_scene"]


# Scenes (SUN397 analogue) -------------------------------------------------------------------------


def _sky(rng: np.random.Generator, size: int, time: str) -> np.ndarray:
    t = (np.arange(size)[:, None, None] + 0.5) / size
    palette = {"midday": ("sky", "white"), "sunset": ("orange", "navy"), "night": ("navy", "black")}[time]
    top, bottom = tint(rng, palette[1]), tint(rng, palette[0])
    sky = np.broadcast_to(top * (1 - t) + bottom * t, (size, size, 3)).copy()
    if time == "night":
        stars = rng.random((size, size)) < 0.03
        sky[stars] = 0.9
    elif time == "sunset":
        paint(sky, disk(size, size * rng.uniform(0.3, 0.5), rng.uniform(3, size - 3), 2.5), tint(rng, "yellow"))
    else:
        paint(sky, disk(size, rng.uniform(2, 6), rng.uniform(3, size - 3), rng.uniform(2, 3), aspect=2.0), tint(rng, "white"))
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
    return paint(ground, np.clip(yy - horizon, 0, 1) * np.clip(horizon + 3.5 - yy, 0, 1), tint(rng, "water")), 0.0


def _meadow(rng, ground, horizon):
    return dots(rng, ground, 3.0, 0.5, tint(rng, rng.choice(["yellow", "red", "white"])), jitter=1.0), 0.0


def _dunes(rng, ground, horizon):
    yy, xx = _coords(ground.shape[0])
    return ground * (1 + 0.12 * np.sin(xx / 2.5 + yy / 1.5 + rng.uniform(0, 6)))[..., None], 0.0


def _boats(rng, ground, horizon):
    size = ground.shape[0]
    for _ in range(2):
        x, y = rng.uniform(0, size), rng.uniform(horizon + 2, size - 2)
        paint(ground, polygon(size, [(y - 1.5, x - 3), (y - 1.5, x + 3), (y, x + 2), (y, x - 2)]), tint(rng, "white"))
    return ground, 0.0


def _standing(count: int, outline, color: str):
    """Objects standing on the horizon (trees, buildings, peaks): painted, and returned as a mask."""

    def add(rng, ground, horizon):
        mask = np.zeros(ground.shape[:2])
        for _ in range(count):
            shape = polygon(ground.shape[0], outline(rng, horizon, rng.uniform(0, ground.shape[0])))
            paint(ground, shape, tint(rng, color) * 0.8)
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
    ground = two_tone(rng, size, tint(rng, fill), tint(rng, fill) * 0.8, cells=4)
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
    return finish(rng, canvas)


# Dense suite (004 Sec. 4.1 analogue) -------------------------------------------------------------

#: Object shapes of the dense suite's classification task.
DENSE_SHAPES = ("disk", "square", "triangle", "diamond", "bar", "ring")


def _object_mask(size: int, shape: str, cy: float, cx: float, r: float) -> np.ndarray:
    return {
        "disk": lambda: disk(size, cy, cx, r),
        "square": lambda: polygon(size, [(cy - r, cx - r), (cy - r, cx + r), (cy + r, cx + r), (cy + r, cx - r)]),
        "triangle": lambda: polygon(size, regular(3, cy + r * 0.2, cx, r * 1.2, 0.0)),
        "diamond": lambda: polygon(size, regular(4, cy, cx, r * 1.2, 0.0)),
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
    return finish(rng, canvas), targets
