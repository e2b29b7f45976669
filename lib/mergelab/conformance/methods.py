"""The conformance checks of a merge method (:data:`mergelab.merging.METHODS`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from mergelab.conformance.base import SHAPES, T64, Check, close, read_tensors, require, tiny_taskset
from mergelab.taskset import MergedUpdate, TaskSet

if TYPE_CHECKING:
    from mergelab.merging.registry import Composition, MergeMethod

__all__ = ["checks_for_method", "sample_side_inputs"]


def sample_side_inputs(method: Any, taskset: TaskSet) -> dict[str, Any] | None:
    """Sample user-given side inputs of what ``method`` declares (``grams``: SPD per task and matrix module)."""
    from mergelab.merging.registry import SIDE_INPUTS

    given = [name for name in method.side if SIDE_INPUTS[name].derive is None]
    if not given:
        return None
    unknown = [name for name in given if name != "grams"]
    require(not unknown, f"the conformance suite has no sample of side input {unknown[:1]}; add one to "
                         "conformance.methods.sample_side_inputs")
    g = torch.Generator().manual_seed(1)
    grams = {}
    for t in taskset.names:
        per_module = {}
        for m, (_, n_in) in SHAPES.items():
            X = torch.randn(3 * n_in, n_in, generator=g, dtype=T64)
            per_module[m] = X.T @ X / (3 * n_in)
        grams[t] = per_module
    return {"grams": grams}

# Merge methods ---------------------------------------------------------------------------------------


def checks_for_method(name: str) -> Iterator[Check]:
    """The checks of merge method ``name`` (module docstring's table)."""
    from mergelab.merging import METHODS, merge

    method = METHODS[name]

    def run(taskset: TaskSet, space: str = "full", **hp: Any):
        return merge(taskset, name, space, side_inputs=sample_side_inputs(method, taskset), **hp)

    yield from _method_contract_checks(name, method, run)
    yield from _declared_method_checks(name, method, run)


def _method_contract_checks(name: str, method: MergeMethod | Composition, run: Callable[..., MergedUpdate]) -> Iterator[Check]:
    """The checks of every merge method (``run`` merges with it): full-space shapes, finite float64; inputs untouched; seeded."""
    from mergelab.merging import merge

    def shapes() -> None:
        merged = run(taskset := tiny_taskset(dense=method.inputs != "factors"))
        for m in taskset.module_names:
            u, shape = merged.modules[m], tuple(taskset.tasks[0].modules[m].shape)
            require(tuple(u.shape) == shape, f"module {m!r}: merged shape {tuple(u.shape)}, the tasks' {shape}")
            require(u.dtype == T64, f"module {m!r}: float64 tasks merged to {u.dtype}")
            require(bool(torch.isfinite(u.dense()).all()), f"module {m!r}: the merge is not finite")

    def pure() -> None:
        side = sample_side_inputs(method, taskset := tiny_taskset(dense=method.inputs != "factors"))  # the full space passes these very tensors
        before = [x.clone() for x in read_tensors(taskset, side)]
        merge(taskset, name, "full", side_inputs=side)
        changed = sum(not torch.equal(x, y) for x, y in zip(read_tensors(taskset, side), before, strict=True))
        require(changed == 0, f"merging modified {changed} of the {len(before)} input tensors in place")

    def seeded() -> None:
        taskset = tiny_taskset()
        hp = {"seed": 3} if "seed" in method.params else {}
        first, second = run(taskset, **hp), run(taskset, **hp)
        for m in taskset.module_names:
            require(torch.equal(first.modules[m].dense(), second.modules[m].dense()), f"module {m!r}: the same inputs and seed merge "
                     "differently (a random draw that does not come from the seed?)")
        if method.stochastic:
            other = run(taskset, seed=4)
            require(any(not torch.equal(first.modules[m].dense(), other.modules[m].dense()) for m in SHAPES),
                     "declared stochastic, but seeds 3 and 4 give the same merge (is the seed ignored?)")

    yield Check("method", name, "returns_finite_full_space_shapes", shapes)
    yield Check("method", name, "never_mutates_its_inputs", pure)
    yield Check("method", name, "same_seed_same_merge", seeded)


def _declared_method_checks(name: str, method: MergeMethod | Composition, run: Callable[..., MergedUpdate]) -> Iterator[Check]:
    """The checks of what a merge method declares (``run`` merges with it): its identity hyper-parameters, its linearity."""
    from mergelab.spaces import SPACES

    def identity() -> None:
        taskset = tiny_taskset(1)
        for space in [s for s, sp in SPACES.items() if sp.lossless]:
            merged = run(taskset, space, **method.identity)
            for m in taskset.module_names:
                close(merged.modules[m].dense(T64), taskset.tasks[0].modules[m].dense(T64),
                       f"one task merged with {dict(method.identity)} in the {space} space is not that task (module {m!r})", 1e-7)

    def linear() -> None:
        full = run(taskset := tiny_taskset(), alpha=0.7)
        for space, sp in SPACES.items():
            if space == "full" or not sp.lossless:
                continue
            other = run(taskset, space, alpha=0.7)
            for m in taskset.module_names:
                close(other.modules[m].dense(T64), full.modules[m].dense(T64),
                       f"declared linear, but its merge in the lossless {space} space differs from the full space's (module {m!r})", 1e-9)

    if method.identity is not None:
        yield Check("method", name, "one_task_gives_that_task", identity)
    if method.linear:
        yield Check("method", name, "linear_merge_is_the_same_in_every_lossless_space", linear)
