"""Operations to merge ``T`` rank-``r`` LoRA modules of shape ``m × n`` per method and space (003 Sec. 4.3, App. B, Fig. 3).

Each count is the sum of the per-step terms 003 App. B derives (not their ``O(·)`` simplification),
so the curves of 003 Fig. 3 follow from ``m``, ``n``, ``T``, ``r`` and TSV's per-task rank ``k``:

* Task Arithmetic, full space: ``LoRA → full`` ``T r n m`` + summation ``T n m`` (the first two
  steps of App. B's Iso-C analysis).
* Iso-C, full space: those + the SVD of the sum ``m² n + n³`` + isotropisation ``m² n``.
* TSV, full space: ``LoRA → full`` ``T r n m`` + per-task SVDs ``T (m² n + n³)`` + concatenation
  ``T k (n + m)`` + the global SVDs ``2 (m² n + n³)`` + orthogonalisation ``2 m² n`` + merge
  ``m n T r + T r n``.
* Task Arithmetic, KnOTS space: ``LoRA → full`` ``T r n m`` + concatenation ``T n m`` + the SVD of
  the ``m × T n`` stack ``n² T² m + m³`` (transpose trick) + merge ``T² r n`` + reconstruction
  ``m n T r + T r n``.
* Task Arithmetic, Core space: stacking ``T r (n + m)`` + the reference SVDs
  ``(m² + n²) T r + 2 (T r)³`` + the low-rank loop ``T (T m r² + T r² n + T² r³)`` + merge ``T³ r²``
  + reconstruction ``m T² r² + m T r n``; Iso-C in Core space adds the isotropisation ``T³ r³``.

App. B derives no count for Iso-C or TSV in KnOTS space or for TSV in Core space; those cells are
NaN rather than a count this project would have to invent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import xarray as xr

from mergelab.taskset import LowRank, TaskSet

__all__ = ["METHODS", "SPACES", "merge_operations", "operation_counts"]

METHODS = ("task_arithmetic", "iso_c", "tsv")
SPACES = ("full", "knots", "core")

Count = Callable[[float, float, float, float, float], float]


def _ta_full(m: float, n: float, T: float, r: float, k: float) -> float:
    return T * r * n * m + T * n * m


def _iso_full(m: float, n: float, T: float, r: float, k: float) -> float:
    return _ta_full(m, n, T, r, k) + (m**2 * n + n**3) + m**2 * n


def _tsv_full(m: float, n: float, T: float, r: float, k: float) -> float:
    return (T * r * n * m + T * (m**2 * n + n**3) + T * k * (n + m) + 2 * (m**2 * n + n**3) + 2 * m**2 * n
            + m * n * T * r + T * r * n)


def _ta_knots(m: float, n: float, T: float, r: float, k: float) -> float:
    return T * r * n * m + T * n * m + (n**2 * T**2 * m + m**3) + T**2 * r * n + (m * n * T * r + T * r * n)


def _ta_core(m: float, n: float, T: float, r: float, k: float) -> float:
    Tr = T * r
    return (Tr * (n + m) + (m**2 + n**2) * Tr + 2 * Tr**3 + T * (T * m * r**2 + T * r**2 * n + T**2 * r**3) + T**3 * r**2
            + m * T**2 * r**2 + m * Tr * n)


def _iso_core(m: float, n: float, T: float, r: float, k: float) -> float:
    return _ta_core(m, n, T, r, k) + (T * r) ** 3


#: (method, space) -> the count of 003 App. B; combinations App. B does not derive are absent.
COUNTS: dict[tuple[str, str], Count] = {
    ("task_arithmetic", "full"): _ta_full, ("iso_c", "full"): _iso_full, ("tsv", "full"): _tsv_full,
    ("task_arithmetic", "knots"): _ta_knots, ("task_arithmetic", "core"): _ta_core, ("iso_c", "core"): _iso_core,
}


def merge_operations(method: str, space: str, m: int, n: int, tasks: int, rank: int, k: int | None = None) -> float:
    """Operations to merge ``tasks`` rank-``rank`` updates of shape ``m × n`` (003 App. B); NaN where
    App. B derives none. ``k``: TSV's components kept per task, by default ``min(m, n) // tasks``.

    It takes 7 parameters because App. B's counts are functions of all of them: method, space, the shape ``m × n``, the
    number of tasks, their rank and TSV's ``k``."""
    count = COUNTS.get((method, space))
    if count is None:
        return float("nan")
    return float(count(float(m), float(n), float(tasks), float(rank), float(min(m, n) // tasks if k is None else k)))


def operation_counts(taskset: TaskSet, sizes: Sequence[int] = (96, 256, 768, 1024, 2048, 4096)) -> xr.Dataset:
    """003 Fig. 3 at the task set's ``T`` and rank, and the task set's own count.

    ``operations(method, space, n)``: merging ``T`` rank-``r`` modules of shape ``n × n`` for each
    ``n`` of ``sizes`` (``r`` the task set's largest rank); ``operations_taskset(method, space)``: the
    sum over the task set's matrix modules at their own shapes and each module's largest rank.
    """
    T = len(taskset.names)
    shapes, ranks = [], []
    for module in taskset.module_names:
        updates = taskset.updates(module)
        if all(isinstance(u, LowRank) for u in updates):
            shapes.append(tuple(updates[0].shape))
            ranks.append(max(u.rank for u in updates))
    rank = max(ranks) if ranks else 0
    grid = np.array([[[merge_operations(a, s, n, n, T, rank) for n in sizes] for s in SPACES] for a in METHODS])
    own = np.array([[sum(merge_operations(a, s, m, n, T, r) for (m, n), r in zip(shapes, ranks, strict=True)) if shapes
                     else np.nan for s in SPACES] for a in METHODS])
    return xr.Dataset(
        {"operations": (("merge_method", "space", "n"), grid), "operations_taskset": (("merge_method", "space"), own)},
        coords={"merge_method": np.array(METHODS, dtype=object), "space": np.array(SPACES, dtype=object), "n": np.array(sizes)},
        attrs={"tasks": T, "rank": rank, "modules": len(shapes),
               "note": "sums of the per-step counts of 003 App. B; NaN: App. B derives no count for that method and space"},
    )
