"""The Core space's lean route (Gram eigendecompositions, factored output, TSV from the cores' factors)
gives 003's results to float32 round-off: against the route as 003 writes it (two SVDs of the stacks,
Eq. 3; cores by Eq. 8; ΔW by Eq. 10), on random, ill-conditioned and rank-deficient stacks."""

from __future__ import annotations

import pytest
import torch

from mergelab.linalg import numerical_rank
from mergelab.merging import merge, project
from mergelab.spaces.core import GRAM_COND_MAX, core_basis, stack_svd, stacks
from mergelab.synthetic import random_taskset
from mergelab.taskset import LowRank, TaskSet, TaskUpdate

METHODS = [("task_arithmetic", {}), ("ties", {}), ("dare_ties", {"seed": 0}), ("tsv", {}), ("iso_c", {}), ("iso_cts", {}),
           ("cart", {}), ("star", {}), ("magnitude_prune", {})]


def svd_route_bases(updates: list[LowRank]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_B^ref, V_A^ref)`` as 003 Eq. 3 takes them: SVDs of the stacks, truncated to their numerical rank."""
    B = torch.cat([u.B for u in updates], 1).double()
    A = torch.cat([u.A for u in updates], 0).double()
    U_B, s_B, _ = torch.linalg.svd(B, full_matrices=False)
    _, s_A, Vh_A = torch.linalg.svd(A, full_matrices=False)
    d_U = max(1, numerical_rank(s_B, tuple(B.shape), torch.float64))
    d_V = max(1, numerical_rank(s_A, tuple(A.shape), torch.float64))
    return U_B[:, :d_U], Vh_A[:d_V].T


def svd_route(taskset: TaskSet, method: str, **hp) -> dict[str, torch.Tensor]:
    """The merge in those bases, cores by Eq. 8 as written, ``ΔW = U_B M* V_Aᵀ`` (Eq. 10); dense float64."""
    bases = {m: svd_route_bases(taskset.updates(m)) for m in taskset.module_names}
    merged = merge(project(taskset, "core", bases=bases), method, **hp)
    return {m: u.dense(torch.float64) for m, u in merged.modules.items()}


def lean_route(taskset: TaskSet, method: str, **hp) -> dict[str, torch.Tensor]:
    return {m: u.dense(torch.float64) for m, u in merge(taskset, method, "core", **hp).modules.items()}


def scaled(taskset: TaskSet, task: int, factor: float) -> TaskSet:
    """``taskset`` with task ``task``'s B factors multiplied by ``factor`` (its stack singular values drop with it)."""
    tasks = list(taskset.tasks)
    t = tasks[task]
    tasks[task] = TaskUpdate(t.name, {m: LowRank(u.B * factor, u.A) for m, u in t.modules.items()})
    return TaskSet(tuple(tasks), taskset.base)


def with_copy(taskset: TaskSet, task: int, noise: float = 0.0) -> TaskSet:
    """``taskset`` plus a copy of task ``task`` (its B perturbed by ``noise`` relative, seeded)."""
    g = torch.Generator().manual_seed(1)
    t = taskset.tasks[task]
    copy = {m: LowRank(u.B * (1 + noise * torch.randn(u.B.shape, generator=g, dtype=u.B.dtype)), u.A) for m, u in t.modules.items()}
    return TaskSet((*taskset.tasks, TaskUpdate("copy", copy)), taskset.base)


MIXED = random_taskset({"q": (48, 40), "mlp": (64, 30)}, 4, rank=[2, 3, 5, 4], seed=7)  # k = 14 ≤ every side
CASES = {
    # name: (task set, which sides take the Gram route per module {module: (B side, A side)})
    "random, mixed ranks": (MIXED, {"q": (True, True), "mlp": (True, True)}),
    "cond(G) 1e6, within the Gram route": (scaled(MIXED, 1, 1e-3), {"q": (True, True), "mlp": (True, True)}),
    "cond(G) 1e12, beyond it": (scaled(MIXED, 1, 1e-6), {"q": (False, True), "mlp": (False, True)}),
    "duplicated adapter": (with_copy(MIXED, 2), {"q": (False, False), "mlp": (False, False)}),
    "near-duplicate (1e-9)": (with_copy(MIXED, 2, 1e-9), {"q": (False, False), "mlp": (False, False)}),  # A copied exactly
    "T·r above the width": (random_taskset({"w": (20, 12)}, 4, rank=[4, 5, 3, 4], seed=2), {"w": (True, False)}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_side_takes_the_gram_route_exactly_when_its_stack_is_well_conditioned(case):
    taskset, gram = CASES[case]
    for m, expected in gram.items():
        basis = core_basis(stacks(taskset.updates(m)))
        assert (basis.B.U is None, basis.A.U is None) == expected, m


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(("method", "hp"), METHODS, ids=[m for m, _ in METHODS])
def test_the_lean_route_merges_as_the_two_svd_route_to_float32_round_off(case, method, hp):
    taskset, _ = CASES[case]
    if method == "tsv" and "duplicate" in case:
        pytest.skip("TSV-M whitens [U_1 … U_T] with two equal blocks: its polar factor is undefined, and either route's "
                    "result moves by O(1) under a 1e-12 change of the inputs")
    lean, svd = lean_route(taskset, method, **hp), svd_route(taskset, method, **hp)
    for m in taskset.module_names:
        scale = float(svd[m].abs().max())
        torch.testing.assert_close(lean[m], svd[m], atol=2e-6 * scale, rtol=0)


def test_the_gram_route_returns_the_stacks_own_factors():
    """003 Eq. 10 folded into the factors: ``ΔW* = [B_1 … B_T] X`` times ``[A_1; …; A_T]``, no basis formed."""
    updates = MIXED.updates("q")
    merged = merge(MIXED.restrict(["q"]), "ties", "core").modules["q"]
    assert torch.equal(merged.A, torch.cat([u.A for u in updates], 0))
    assert merged.B.shape == (48, 14)


def test_stack_svd_equals_the_svd_where_the_gram_carries_it_and_is_the_svd_beyond():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(50, 6, generator=g, dtype=torch.float64))
    W, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    for spread, gram in ((1e3, True), (GRAM_COND_MAX ** 0.5 * 2, False), (1e12, False)):
        s = torch.logspace(0, -torch.log10(torch.tensor(spread)).item(), 6, dtype=torch.float64)
        S = Q @ torch.diag(s) @ W.T
        svd = stack_svd(S)
        assert (svd.U is None) == gram
        torch.testing.assert_close(svd.s, s, rtol=1e-9, atol=1e-15)
        U = S @ svd.V / svd.s if gram else svd.U
        torch.testing.assert_close(U @ torch.diag(svd.s) @ svd.V.T, S, atol=1e-13, rtol=0)
        torch.testing.assert_close(U.T @ U, torch.eye(6, dtype=torch.float64), atol=1e-9, rtol=0)
