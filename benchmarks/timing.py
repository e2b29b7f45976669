"""How every benchmark here times routes against each other (issue 31 item 2).

One methodology for every script that compares routes:

* each call is timed in CPU time *and* wall time (:func:`timed`); CPU time is this process's
  ``time.process_time`` plus the user + system time of the child processes it waited for (zero for
  in-process routes), the primary figure on a shared machine, where wall time grows with the load;
* the routes run interleaved (:func:`interleave`): every route once per round, in a fresh random
  order each round, for ≥ 5 rounds, so that a load spike falls on every route alike;
* a comparison is the median over rounds of the per-round ratios (:func:`median_ratio`), printed
  with the median times (:func:`median`) and the load average (:func:`load`);
* every route names its precision (float32 / float64) where it is printed.

A benchmark, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import os
import platform
import random
import resource
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["ROUNDS", "Times", "interleave", "load", "machine", "median", "median_ratio", "now", "timed", "timed_routes"]

T = TypeVar("T")

#: The fewest rounds a reported comparison runs (each script's ``--rounds`` default).
ROUNDS = 5


@dataclass(frozen=True)
class Times:
    """CPU and wall seconds of one call (or a clock reading, :func:`now`)."""

    cpu: float
    wall: float

    def __sub__(self, other: Times) -> Times:
        return Times(self.cpu - other.cpu, self.wall - other.wall)

    def __add__(self, other: Times) -> Times:
        return Times(self.cpu + other.cpu, self.wall + other.wall)

    def __mul__(self, k: float) -> Times:
        """``k`` times the call (a whole model from one module, or from some of its layers)."""
        return Times(self.cpu * k, self.wall * k)

    def __truediv__(self, n: float) -> Times:
        """Per unit (module, iteration, call) of a call that did ``n`` of them."""
        return Times(self.cpu / n, self.wall / n)


def now() -> Times:
    """The clocks now: CPU seconds of this process and of its reaped children, and the wall clock."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return Times(time.process_time() + children.ru_utime + children.ru_stime, time.perf_counter())


def timed(fn: Callable[[], T]) -> tuple[T, Times]:
    """``fn()``'s result and the CPU and wall seconds it took (the result is dropped by the caller, untimed)."""
    start = now()
    value = fn()
    return value, now() - start


def interleave(routes: Mapping[str, Callable[[], T]], rounds: int, rng: random.Random) -> dict[str, list[T]]:
    """Call every route once per round, in a fresh random order each round; ``{route: [result per round]}``."""
    results: dict[str, list[T]] = {label: [] for label in routes}
    for _ in range(rounds):
        order = list(routes)
        rng.shuffle(order)
        for label in order:
            results[label].append(routes[label]())
    return results


def timed_routes(routes: Mapping[str, Callable[[], object]], rounds: int, rng: random.Random) -> dict[str, list[Times]]:
    """:func:`interleave` of the routes' times alone (each result dropped once its clock has stopped)."""
    return interleave({label: (lambda fn=fn: timed(fn)[1]) for label, fn in routes.items()}, rounds, rng)


def median(samples: Sequence[Times]) -> Times:
    """Median CPU and median wall time over rounds."""
    return Times(statistics.median(s.cpu for s in samples), statistics.median(s.wall for s in samples))


def median_ratio(num: Sequence[Times], den: Sequence[Times]) -> Times:
    """Median over rounds of ``num / den`` taken within each round, in CPU and in wall time."""
    pairs = list(zip(num, den, strict=True))
    return Times(statistics.median(a.cpu / b.cpu for a, b in pairs), statistics.median(a.wall / b.wall for a, b in pairs))


def load() -> str:
    """The 1-, 5- and 15-minute load averages, as printed with every result."""
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> str:
    """The machine a result ran on: CPUs, architecture and Python (a script adds its library versions)."""
    return f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}"
