"""The conformance checks of a merge space (:data:`mergelab.spaces.SPACES`)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from mergelab.conformance.base import SHAPES, T64, Check, close, read_tensors, require, tiny_taskset
from mergelab.conformance.methods import sample_side_inputs
from mergelab.taskset import LowRank

__all__ = ["checks_for_space"]


# Spaces ----------------------------------------------------------------------------------------------


def checks_for_space(name: str) -> Iterator[Check]:
    """The checks of space ``name`` (its registered configuration)."""
    from mergelab.merging import METHODS, merge
    from mergelab.spaces import SPACES

    space = SPACES[name]

    def round_trip() -> None:
        for m in SHAPES:
            updates = tiny_taskset().updates(m)
            reps, ctx = space.project(updates)
            for t, (rep, factors, u) in enumerate(zip(reps, space.factors(updates, ctx), updates, strict=True)):
                close(space.reconstruct(rep, ctx).dense(T64), u.dense(T64), f"task {t} of module {m!r} does not come back", 1e-9)
                close(space.reconstruct(factors, ctx).dense(T64), u.dense(T64),
                      f"task {t}'s factors in module {m!r} do not come back", 1e-9)

    def pure() -> None:
        taskset = tiny_taskset()
        before = [x.clone() for x in read_tensors(taskset)]
        first = [space.project(taskset.updates(m))[0] for m in SHAPES]
        second = [space.project(taskset.updates(m))[0] for m in SHAPES]
        changed = sum(not torch.equal(x, y) for x, y in zip(read_tensors(taskset), before, strict=True))
        require(changed == 0, f"projecting modified {changed} of the {len(before)} update tensors in place")
        for m, xs, ys in zip(SHAPES, first, second, strict=True):
            require(all(torch.equal(_dense(x), _dense(y)) for x, y in zip(xs, ys, strict=True)),
                    f"module {m!r}: projects differently twice")

    def every_method() -> None:
        for method in METHODS:
            taskset = tiny_taskset()
            merged = merge(taskset, method, name, side_inputs=sample_side_inputs(METHODS[method], taskset))
            for m in taskset.module_names:
                u, shape = merged.modules[m], tuple(taskset.tasks[0].modules[m].shape)
                require(tuple(u.shape) == shape, f"{method}: module {m!r} comes back {tuple(u.shape)}, the tasks' {shape}")
                require(bool(torch.isfinite(u.dense()).all()), f"{method}: module {m!r} is not finite")

    if space.lossless:
        yield Check("space", name, "reconstructs_each_task_and_its_factors", round_trip)
    yield Check("space", name, "projects_without_mutating_and_repeatably", pure)
    yield Check("space", name, "every_method_returns_full_space_shapes", every_method)


def _dense(x: Tensor | LowRank) -> Tensor:
    return x.dense() if isinstance(x, LowRank) else x
