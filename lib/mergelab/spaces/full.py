"""Full space: each task is its dense update ``ΔW_t = B_t A_t`` (Task Arithmetic et al.)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from mergelab.spaces.base import Context, Space, output_dtype
from mergelab.taskset import Update

__all__ = ["FullSpace"]


@dataclass(frozen=True)
class FullSpace(Space):
    """The dense ``out × in`` update of every task (003 Fig. 2 left).

    Options:
        scope: ``"module"`` (per tensor, as PEFT, mergekit and the Core Space code) or
            ``"model"`` (element-wise methods see the whole model flattened into one vector,
            as the original TIES / FusionBench ``state_dict_to_vector`` path).
        dtype: working precision of the dense matrices. Default float64, so that full-space
            results agree with the (float64) core and KnOTS spaces to float64 round-off and
            numerical ranks are detected at float64 precision; ``"float32"`` halves the memory
            of large models.
    """

    name: ClassVar[str] = "full"
    scope: Literal["module", "model"] = "module"  # type: ignore[misc]
    dtype: Literal["float64", "float32"] = "float64"

    def project(self, updates: Sequence[Update], basis: Any = None) -> tuple[list[Tensor], Context]:
        assert basis is None, "the full space has no basis"
        work = getattr(torch, self.dtype)
        matrices = [u.dense(work) for u in updates]
        return matrices, Context(shape=tuple(updates[0].shape), dtype=output_dtype(updates))
