"""Operation counts of 003 App. B (Fig. 3): the step sums, their scaling and the task-set Dataset."""

from __future__ import annotations

import math

import pytest
import torch

from mergelab.analysis.complexity import merge_operations, operation_counts
from mergelab.taskset import LowRank, TaskSet, TaskUpdate


def test_the_counts_are_app_b_step_sums():
    m = n = 768
    T, r = 8, 16
    assert merge_operations("task_arithmetic", "full", m, n, T, r) == T * r * n * m + T * n * m
    knots = T * r * n * m + T * n * m + (n**2 * T**2 * m + m**3) + T**2 * r * n + (m * n * T * r + T * r * n)
    assert merge_operations("task_arithmetic", "knots", m, n, T, r) == knots
    core = merge_operations("task_arithmetic", "core", m, n, T, r)
    assert merge_operations("iso_c", "core", m, n, T, r) - core == (T * r) ** 3
    assert math.isnan(merge_operations("tsv", "knots", m, n, T, r)) and math.isnan(merge_operations("tsv", "core", m, n, T, r))


@pytest.mark.parametrize("n", [1024, 4096])
def test_core_scales_like_task_arithmetic_and_knots_super_cubically(n):
    T, r = 8, 16
    core, knots = (merge_operations("task_arithmetic", s, n, n, T, r) for s in ("core", "knots"))
    doubled = [merge_operations("task_arithmetic", s, 2 * n, 2 * n, T, r) for s in ("core", "knots")]
    assert 3.5 < doubled[0] / core < 4.5  # O(T r n²): quadratic in n
    assert 7.5 < doubled[1] / knots < 8.5  # O(n³ T²): cubic in n
    assert knots / core > 30  # 003 Fig. 3: Core far below KnOTS


def test_operation_counts_of_a_task_set():
    torch.manual_seed(0)
    shapes = {"a.weight": (6, 5), "b.weight": (4, 7)}
    tasks = [TaskUpdate(f"t{i}", {k: LowRank(torch.randn(o, 2), torch.randn(2, i_)) for k, (o, i_) in shapes.items()})
             for i in range(3)]
    ts = TaskSet(tuple(tasks))
    ds = operation_counts(ts, sizes=(8, 16))
    assert ds.attrs["tasks"] == 3 and ds.attrs["rank"] == 2 and ds.attrs["modules"] == 2
    assert float(ds.operations.sel(merge_method="task_arithmetic", space="full", n=8)) == merge_operations("task_arithmetic", "full", 8, 8, 3, 2)
    own = sum(merge_operations("iso_c", "core", o, i, 3, 2) for o, i in shapes.values())
    assert float(ds.operations_taskset.sel(merge_method="iso_c", space="core")) == own
    assert bool(ds.operations.sel(merge_method="tsv", space="knots").isnull().all())
