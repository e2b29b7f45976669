"""Wall time and peak memory of one call, as the results tables and benchmarks report them.

Peak memory is the peak resident set size of this process during the call minus its size when
the call started, sampled by a background thread (torch's CPU allocations are invisible to
``tracemalloc``). On CUDA the device's own peak counter is used instead.
"""

from __future__ import annotations

import ctypes
import gc
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import psutil
import torch

__all__ = ["Measured", "measure", "release_memory", "trim_heap"]

T = TypeVar("T")


@dataclass(frozen=True)
class Measured(Generic[T]):
    value: T
    wall_s: float
    peak_bytes: int


def measure(fn: Callable[[], T], *, interval_s: float = 0.002, device: torch.device | str | None = None) -> Measured[T]:
    """Call ``fn()`` and return its value, wall time and peak extra memory (bytes)."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start_alloc = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        value = fn()
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
        return Measured(value, wall, max(0, torch.cuda.max_memory_allocated(device) - start_alloc))

    process = psutil.Process()
    baseline = process.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            done.wait(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        value = fn()
    finally:
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
    peak = max(peak, process.memory_info().rss)
    return Measured(value, wall, max(0, peak - baseline))


def trim_heap() -> None:
    """Hand free heap pages back to the OS (glibc ``malloc_trim``, under a millisecond; a no-op
    elsewhere): after a model-sized temporary is freed, the resident set shrinks again instead of
    holding its high-water mark."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def release_memory() -> None:
    """Collect garbage (a quarter of a second in a process with the study flow loaded: for
    measurements, not hot paths), then :func:`trim_heap`, so that a measurement that follows sees
    the memory it reuses."""
    gc.collect()
    trim_heap()
