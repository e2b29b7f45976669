"""Every registered merge method, space, adaptive method and bench kind passes its registry's
conformance suite (:mod:`mergelab.conformance`, as scikit-learn's ``parametrize_with_checks``): a new
registration is checked here with no edit. A deliberately broken toy shows the suite catches faults."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import Tensor

from mergelab.conformance import ConformanceError, checks_for_method, parametrize_with_checks


@parametrize_with_checks()
def test_every_registered_entry_conforms(check, one_thread):
    check()


def mutating_mean(deltas: Sequence[Tensor], *, alpha: float = 1.0) -> Tensor:
    """A broken toy (2024): it scales its first input in place."""
    deltas[0].mul_(2.0)
    return alpha * torch.stack(list(deltas)).mean(dim=0)


def unseeded_drop(deltas: Sequence[Tensor], *, alpha: float = 1.0, seed: int = 0) -> Tensor:
    """A broken toy (2024): DARE-like drops drawn from the global generator, ignoring ``seed``."""
    return alpha * torch.stack([d * (torch.rand(d.shape, dtype=d.dtype) > 0.5) for d in deltas]).sum(dim=0)


def constant_drop(deltas: Sequence[Tensor], *, alpha: float = 1.0, seed: int = 0) -> Tensor:
    """A broken toy (2024): declared stochastic, it drops the same entries whatever the seed."""
    g = torch.Generator().manual_seed(0)
    return alpha * torch.stack([d * (torch.rand(d.shape, generator=g, dtype=d.dtype) > 0.5) for d in deltas]).sum(dim=0)


def half_sum(deltas: Sequence[Tensor], *, alpha: float = 1.0) -> Tensor:
    """A broken toy (2024): declared to give back a single task, it halves it."""
    return 0.5 * alpha * torch.stack(list(deltas)).sum(dim=0)


@pytest.mark.parametrize(("fn", "declared", "failing", "message"), [
    (mutating_mean, {"identity": {}}, "never_mutates_its_inputs", "modified 3 of the"),
    (unseeded_drop, {"stochastic": True}, "same_seed_same_merge", "the same inputs and seed merge differently"),
    (constant_drop, {"stochastic": True}, "same_seed_same_merge", "seeds 3 and 4 give the same merge"),
    (half_sum, {"identity": {}, "linear": True}, "one_task_gives_that_task", "one task merged with {} in the full space is not that task"),
])
def test_a_broken_method_fails_its_conformance_check(fn, declared, failing, message):
    from mergelab.merging import METHODS, MergeMethod

    METHODS.register("broken", MergeMethod(fn, inputs="tensors", nonmatrix="self", **declared))
    try:
        checks = {c.name: c for c in checks_for_method("broken")}
        with pytest.raises(ConformanceError, match=message.replace("{", r"\{").replace("}", r"\}")):
            checks[failing]()
        passing = [c for c in checks.values() if c.name not in (failing, "never_mutates_its_inputs")]
        for check in passing if fn is not mutating_mean else []:
            check()
    finally:
        del METHODS["broken"]


def test_a_method_is_held_to_what_it_declares():
    from mergelab.merging import METHODS

    names = lambda method: [c.name for c in checks_for_method(method)]  # noqa: E731
    assert names("iso_c") == ["returns_finite_full_space_shapes", "never_mutates_its_inputs", "same_seed_same_merge"]
    assert "linear_merge_is_the_same_in_every_lossless_space" in names("task_arithmetic")
    assert {n for n, m in METHODS.items() if m.stochastic} == {"dare_linear", "dare_ties"}
