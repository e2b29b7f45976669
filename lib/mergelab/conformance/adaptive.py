"""The conformance checks of an adaptive method (:data:`mergelab.adaptation.ADAPTERS`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

from mergelab.conformance.base import BIAS, SHAPES, Check, read_tensors, require, tiny_taskset
from mergelab.taskset import TaskSet

__all__ = ["checks_for_adaptive"]


# Adaptive methods ------------------------------------------------------------------------------------


def _tiny_model(taskset: TaskSet, seed: int = 0):
    """A two-layer functional model over :data:`SHAPES`' modules (tokens of width 5, per-task heads of 3
    classes) as a :class:`~mergelab.adaptation.Forward`, and seeded token batches (one stream per task)."""
    from mergelab.adaptation import Forward

    g = torch.Generator().manual_seed(seed)
    (q, fc), (n_q, d_in) = list(SHAPES), SHAPES["layers.0.attn.q_proj.weight"]
    n_fc, d_fc = SHAPES["layers.0.mlp.fc1.weight"]
    base = {q: torch.randn(n_q, d_in, generator=g) / d_in ** 0.5, fc: torch.randn(n_fc, d_fc, generator=g) / d_fc ** 0.5,
            BIAS: torch.zeros(n_fc)}
    heads = [torch.randn(3, n_fc, generator=g) for _ in taskset.names]
    project = torch.randn(n_q, d_fc, generator=g) / n_q ** 0.5

    def tokens(x: Tensor, params: Mapping[str, Tensor]) -> Tensor:  # (N, L, n_fc)
        hidden = torch.tanh(x @ params[q].T) @ project  # (N, L, d_fc)
        return torch.tanh(hidden @ params[fc].T + params[BIAS])

    forward = Forward(base=base, logits=lambda t, x, params: tokens(x, params).mean(dim=1) @ heads[t].T, tokens=tokens)
    batches = [[torch.randn(4, 3, d_in, generator=g) for _ in range(4)] for _ in taskset.names]
    return forward, batches


def checks_for_adaptive(name: str) -> Iterator[Check]:
    """The checks of adaptive method ``name``: three Adam steps on :func:`_tiny_model` per declared space."""
    from mergelab.adaptation import ADAPTERS, Schedule, adapt, build

    adapter = ADAPTERS[name]

    def run(taskset: TaskSet, space: str = "full"):
        forward, batches = _tiny_model(taskset)
        hp = {} if space == "full" else {"space": space}
        return adapt(name, taskset, forward, [iter(b) for b in batches], Schedule(iters=3, lr=0.05), record_every=1, **hp), forward

    def shapes() -> None:
        taskset = tiny_taskset(2, dtype=torch.float32)
        for space in adapter.spaces:
            model = build(name, taskset, **({} if space == "full" else {"space": space}))
            coefficients = model.coefficients()
            require(len(coefficients) == len(model.banks), f"{space}: {len(coefficients)} coefficient vectors for {len(model.banks)} banks")
            for m, c, bank in zip(model.module_names, coefficients, model.banks, strict=True):
                require(tuple(c.shape) == (bank.size,) and bool(torch.isfinite(c).all()),
                        f"{space}: module {m!r} has coefficients {tuple(c.shape)} for {bank.size} directions, or not finite")
            result, _ = run(taskset, space)
            for m in taskset.module_names:
                u, shape = result.merged.modules[m], tuple(taskset.tasks[0].modules[m].shape)
                require(tuple(u.shape) == shape, f"{space}: module {m!r} adapts to {tuple(u.shape)}, the tasks' {shape}")
                require(bool(torch.isfinite(u.dense()).all()), f"{space}: module {m!r} adapts to non-finite weights")
            loss = result.history["loss"]
            require(loss.shape == (3, len(taskset)) and bool(loss.notnull().all()),
                    f"{space}: the loss history is {loss.shape} or not finite")

    def seeded() -> None:
        (first, _), (second, _) = run(taskset := tiny_taskset(2, dtype=torch.float32)), run(taskset)
        for m in taskset.module_names:
            require(torch.equal(first.merged.modules[m].dense(), second.merged.modules[m].dense()),
                     f"module {m!r}: the same seeded batches adapt to different merges")

    def pure() -> None:
        taskset = tiny_taskset(2, dtype=torch.float32)
        before = [x.clone() for x in read_tensors(taskset)]
        _, forward = run(taskset)
        changed = sum(not torch.equal(x, y) for x, y in zip(read_tensors(taskset), before, strict=True))
        require(changed == 0, f"adapting modified {changed} of the task set's {len(before)} tensors in place")
        fresh, _ = _tiny_model(taskset)
        require(all(torch.equal(forward.base[k], fresh.base[k]) for k in fresh.base), "adapting modified the base weights in place")

    yield Check("adaptive", name, "adapts_to_finite_coefficients_of_the_bank_shape", shapes)
    yield Check("adaptive", name, "same_batches_same_merge", seeded)
    yield Check("adaptive", name, "never_mutates_the_task_set_or_the_base", pure)
