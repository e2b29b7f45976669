"""What every conformance suite shares: :class:`Check`, :class:`ConformanceError`, the assertions
and the tiny seeded task set the method, space and adaptive checks run on."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mergelab.synthetic import random_lowrank
from mergelab.taskset import Dense, LowRank, TaskSet, TaskUpdate, Update

__all__ = ["BIAS", "SHAPES", "T64", "Check", "ConformanceError", "close", "read_tensors", "require", "tiny_taskset"]

T64 = torch.float64


class ConformanceError(AssertionError):
    """A registered entry fails a conformance check."""


@dataclass(frozen=True)
class Check:
    """One named check of one registry entry; calling it runs it (``ConformanceError`` on failure)."""

    registry: str
    entry: str
    name: str
    run: Callable[[], None]

    def __call__(self) -> None:
        self.run()

    def __str__(self) -> str:
        return f"{self.registry}:{self.entry}:{self.name}"


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConformanceError(message)


def close(got: Tensor, expected: Tensor, what: str, rtol: float = 1e-7) -> None:
    scale = max(float(expected.abs().max()) if expected.numel() else 0.0, 1.0)
    try:
        torch.testing.assert_close(got.to(T64), expected.to(T64), atol=rtol * scale, rtol=0)
    except AssertionError as err:
        raise ConformanceError(f"{what}: {err}") from None


# Tiny task sets -------------------------------------------------------------------------------------

#: Matrix modules (attention and MLP of one block, names the generic layout knows) and a bias.
SHAPES = {"layers.0.attn.q_proj.weight": (7, 5), "layers.0.mlp.fc1.weight": (4, 6)}
BIAS = "layers.0.mlp.fc1.bias"


def tiny_taskset(tasks: int = 3, *, dense: bool = False, seed: int = 0, dtype: torch.dtype = T64) -> TaskSet:
    """``tasks`` LoRA updates (rank 2; ``dense``: as Dense matrices) of :data:`SHAPES` plus a Dense bias."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(tasks):
        modules: dict[str, Update] = {}
        for name, (n_out, n_in) in SHAPES.items():
            factors = random_lowrank(n_out, n_in, 2, g, dtype=dtype)
            modules[name] = Dense(factors.dense()) if dense else factors
        modules[BIAS] = Dense(torch.randn(SHAPES["layers.0.mlp.fc1.weight"][0], generator=g, dtype=dtype))
        out.append(TaskUpdate(f"task{t}", modules))
    return TaskSet(tuple(out))


def read_tensors(taskset: TaskSet, side: Mapping[str, Any] | None = None) -> list[Tensor]:
    """Every tensor a merge reads: the updates' (Dense delta, LoRA B and A) and the side inputs'."""
    found = [x for task in taskset for u in task.modules.values() for x in ((u.B, u.A) if isinstance(u, LowRank) else (u.delta,))]
    return found + [x for per_task in (side or {}).values() for per_module in per_task.values() for x in per_module.values()]
