"""The data model: per-module updates, per-task update sets, task sets and merged updates.

PEFT conventions throughout: ``lora_A`` has shape ``(r, in)``, ``lora_B`` has
shape ``(out, r)`` and a module's update is ``delta = scaling * B @ A``. :class:`LowRank` stores
the scaling already folded into ``B``, in the orientation of the base model's parameter (so a
``fan_in_fan_out`` adapter is transposed on load). The papers write ``ΔW = B Aᵀ`` with ``A`` of
shape ``m × r``; that ``A`` is our ``A.T``.

Every constructor validates what it is given (shapes, ranks, dtypes, finiteness, names) and
raises :class:`~mergelab.errors.InputError` naming the problem and the fix; code that receives
these objects trusts them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, TypeAlias

import torch
from torch import Tensor

from mergelab.errors import InputError
from mergelab.hashing import content_hash
from mergelab.lazy_mapping import LazyMapping
from mergelab.naming import GENERIC, ModuleLayout

__all__ = [
    "MAX_ENTRY",
    "SUPPORTED_DTYPES",
    "BaseRef",
    "Dense",
    "LowRank",
    "MergedUpdate",
    "StoredUpdates",
    "TaskSet",
    "TaskUpdate",
    "Update",
    "add_updates",
    "update_tensors",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


#: The largest entry an update may have: beyond it the squares of its entries (norms, Gram matrices,
#: the energies every merge method computes) overflow float32. Trained updates stay below about 1e3.
MAX_ENTRY = math.sqrt(torch.finfo(torch.float32).max)


def _check_tensor(t: Any, what: str, ndim: int | None = 2) -> float:
    """Check a tensor's type, dtype, dimension and finiteness; return ``max |t|`` (0 when empty)."""
    if not isinstance(t, Tensor):
        raise InputError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise InputError(
            f"{what} has unsupported dtype {t.dtype}; convert it to one of float16, bfloat16, float32, float64"
        )
    if ndim is not None and t.ndim != ndim:
        raise InputError(f"{what} must be {ndim}-D, got shape {tuple(t.shape)}")
    amax = float(t.abs().amax()) if t.numel() else 0.0  # amax propagates NaN; 10× cheaper than isfinite(t).all()
    if not math.isfinite(amax):
        bad = int((~torch.isfinite(t)).sum())
        raise InputError(f"{what} contains {bad} NaN/Inf values; re-export the checkpoint from a finite state")
    return amax


def _check_scale(bound: float, what: str) -> None:
    """Refuse an update whose entries can reach ``bound`` > :data:`MAX_ENTRY` (finite factors can
    multiply past float32: ``B`` and ``A`` filled with 1e30 give entries of r · 1e60)."""
    if not bound <= MAX_ENTRY:
        raise InputError(f"{what} can reach entries of {bound:.3g}, beyond {MAX_ENTRY:.3g}, where their squares overflow float32 "
                         "(no trained update comes near); re-export the checkpoint from its trained state")


@dataclass(frozen=True, eq=False)
class LowRank:
    """A factored update ``B @ A`` with the LoRA scaling folded into ``B``.

    ``B``: ``(out, r)``, ``A``: ``(r, in)``. The dense matrix is never formed unless a caller asks
    for it with :meth:`dense`.
    """

    B: Tensor
    A: Tensor

    def __post_init__(self) -> None:
        b_max, a_max = _check_tensor(self.B, "lora_B"), _check_tensor(self.A, "lora_A")
        if self.B.shape[1] != self.A.shape[0]:
            raise InputError(
                f"lora_B {tuple(self.B.shape)} and lora_A {tuple(self.A.shape)} disagree on the rank; "
                "B must be (out, r) and A (r, in)"
            )
        if self.B.shape[1] == 0:
            raise InputError("LoRA rank r = 0; an adapter needs r >= 1")
        _check_scale(self.rank * b_max * a_max, "the update B A (bounded by r · max|B| · max|A|)")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[0], self.A.shape[1])

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.B.dtype

    def dense(self, dtype: torch.dtype | None = None) -> Tensor:
        """The ``(out, in)`` matrix ``B @ A`` (materialised: use only where a method needs it)."""
        dtype = dtype or self.dtype
        return self.B.to(dtype) @ self.A.to(dtype)

    def to(self, dtype: torch.dtype) -> LowRank:
        return LowRank(self.B.to(dtype), self.A.to(dtype))

    def norm(self) -> float:
        """Frobenius norm of ``B @ A`` without forming it: ``‖BA‖² = tr((BᵀB)(AAᵀ))``."""
        B, A = self.B.double(), self.A.double()
        return float(((B.T @ B) * (A @ A.T)).sum().clamp_min(0).sqrt())


@dataclass(frozen=True, eq=False)
class Dense:
    """A dense update: a full fine-tune's ``W_t - W_0``, or any non-matrix parameter's delta."""

    delta: Tensor

    def __post_init__(self) -> None:
        _check_scale(_check_tensor(self.delta, "delta", ndim=None), "delta")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.delta.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.delta.dtype

    def dense(self, dtype: torch.dtype | None = None) -> Tensor:
        return self.delta.to(dtype or self.dtype)

    def to(self, dtype: torch.dtype) -> Dense:
        return Dense(self.delta.to(dtype))

    def norm(self) -> float:
        """Frobenius (L2) norm of the delta."""
        return float(self.delta.double().norm())


Update: TypeAlias = LowRank | Dense


def _update_hash(update: Update) -> str:
    if isinstance(update, LowRank):
        return content_hash({"kind": "lowrank", "B": update.B, "A": update.A})
    return content_hash({"kind": "dense", "delta": update.delta})


@dataclass(frozen=True)
class BaseRef:
    """Identity of the base model the updates apply to: a name, where it came from, its hash."""

    name: str
    path: str | None = None
    content_hash: str = ""


@dataclass(frozen=True, eq=False)
class TaskUpdate:
    """One task's updates, keyed by the base model's parameter names.

    ``meta`` is JSON-able metadata (the adapter config, per-module rank and alpha, the PEFT
    module path of each parameter); it enters the content hash together with the tensors.
    """

    name: str
    modules: Mapping[str, Update]
    source: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise InputError("a task needs a non-empty name; pass names=[...] (CLI: NAME=PATH)")
        if not self.modules:
            raise InputError(f"task {self.name!r} has no updated modules; check the checkpoint's target modules")
        for module, update in self.modules.items():
            if not isinstance(update, (LowRank, Dense)):
                raise InputError(f"task {self.name!r}, module {module!r}: expected LowRank or Dense, got {type(update).__name__}")
        object.__setattr__(self, "modules", dict(self.modules))

    @cached_property
    def content_hash(self) -> str:
        """Hash of the tensors and the metadata (adapter config); the task name is a label, not content."""
        return content_hash({"modules": {k: _update_hash(u) for k, u in self.modules.items()}, "meta": self.meta})

    @property
    def is_low_rank(self) -> bool:
        return all(isinstance(u, LowRank) for u in self.modules.values())

    def __len__(self) -> int:
        return len(self.modules)


@dataclass(frozen=True, eq=False)
class TaskSet:
    """The base model reference plus ordered task updates that share module names and shapes.

    ``layout``: which of the base model's parameters is which (block, attention / MLP projection):
    the bench's declaration (:mod:`mergelab.bench.kinds`), or :data:`~mergelab.naming.GENERIC`. It
    describes the base model, so it is no part of :attr:`content_hash`.
    """

    tasks: tuple[TaskUpdate, ...]
    base: BaseRef = field(default_factory=lambda: BaseRef("unknown"))
    layout: ModuleLayout = GENERIC

    def __post_init__(self) -> None:
        tasks = tuple(self.tasks)
        object.__setattr__(self, "tasks", tasks)
        if not tasks:
            raise InputError("no tasks given; pass at least one adapter or fine-tuned checkpoint")
        names = [t.name for t in tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise InputError(f"duplicate task names {dupes}; give each source a distinct name (CLI: NAME=PATH)")
        first = tasks[0]
        for task in tasks[1:]:
            missing = sorted(set(first.modules) - set(task.modules))
            extra = sorted(set(task.modules) - set(first.modules))
            if missing or extra:
                detail = f"missing {_head(missing)}" if missing else f"extra {_head(extra)}"
                raise InputError(
                    f"task {task.name!r} targets {len(task.modules)} modules, task {first.name!r} targets "
                    f"{len(first.modules)} ({detail}); restrict both with modules=[...] (CLI: --modules)"
                )
            for module, update in task.modules.items():
                if update.shape != first.modules[module].shape:
                    raise InputError(
                        f"module {module!r} has shape {tuple(update.shape)} in task {task.name!r} but "
                        f"{tuple(first.modules[module].shape)} in task {first.name!r}; the tasks must share one base model"
                    )

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    @property
    def module_names(self) -> tuple[str, ...]:
        return tuple(self.tasks[0].modules)

    @property
    def is_low_rank(self) -> bool:
        return all(t.is_low_rank for t in self.tasks)

    def updates(self, module: str) -> list[Update]:
        """The per-task updates of one module, in task order."""
        return [t.modules[module] for t in self.tasks]

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[TaskUpdate]:
        return iter(self.tasks)

    def __getitem__(self, name: str) -> TaskUpdate:
        for task in self.tasks:
            if task.name == name:
                return task
        raise InputError(f"no task named {name!r}; known tasks: {list(self.names)}")

    @cached_property
    def content_hash(self) -> str:
        return content_hash({"base": self.base.content_hash, "tasks": [(t.name, t.content_hash) for t in self.tasks]})

    def subset(self, names: Sequence[str]) -> TaskSet:
        """A TaskSet of the named tasks, in the given order (unseen-task protocols)."""
        return TaskSet(tuple(self[n] for n in names), self.base, self.layout)

    def restrict(self, modules: Sequence[str]) -> TaskSet:
        """Keep only the given modules (exact names or regular expressions) in every task."""
        patterns = [re.compile(m) for m in modules]
        keep = lambda name: any(p.fullmatch(name) for p in patterns)  # noqa: E731
        tasks = []
        for task in self.tasks:
            kept = {k: u for k, u in task.modules.items() if keep(k)}
            if not kept:
                raise InputError(f"modules={list(modules)} matches none of task {task.name!r}'s {len(task)} modules")
            tasks.append(TaskUpdate(task.name, kept, task.source, task.meta))
        return TaskSet(tuple(tasks), self.base, self.layout)


@dataclass(frozen=True, eq=False)
class MergedUpdate:
    """The result of a merge: ``{parameter name: LowRank | Dense}`` plus what produced it.

    ``meta`` records the method, space, hyper-parameters, task names and the PEFT adapter layout
    used by :func:`mergelab.checkpoints.save_merged`.
    """

    modules: Mapping[str, Update]
    base: BaseRef = field(default_factory=lambda: BaseRef("unknown"))
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.modules:
            raise InputError("a merged update needs at least one module")
        object.__setattr__(self, "modules", dict(self.modules))

    @property
    def is_low_rank(self) -> bool:
        return all(isinstance(u, LowRank) for u in self.modules.values())

    @cached_property
    def content_hash(self) -> str:
        return content_hash({"modules": {k: _update_hash(u) for k, u in self.modules.items()}, "meta": self.meta})

    def to_tensors(self) -> dict[str, Tensor]:
        """Flat tensors for storage (:func:`update_tensors` of every module)."""
        return {key: t for name, update in self.modules.items() for key, t in update_tensors(name, update).items()}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], base: BaseRef | None = None,
                     meta: Mapping[str, Any] | None = None) -> MergedUpdate:
        """Inverse of :meth:`to_tensors`."""
        return cls(dict(StoredUpdates(tensors)), base or BaseRef("unknown"), dict(meta or {}))

    def apply(self, state_dict: Mapping[str, Tensor], scale: float = 1.0) -> dict[str, Tensor]:
        """A new state dict ``W_0 + scale · delta`` (the input is not modified)."""
        missing = sorted(set(self.modules) - set(state_dict))
        if missing:
            raise InputError(f"base state dict lacks {len(missing)} merged parameters ({_head(missing)}); pass the base model the adapters "
                             "were trained on")
        return {**state_dict, **add_updates(state_dict, self.modules, scale)}


def update_tensors(name: str, update: Update) -> dict[str, Tensor]:
    """Module ``name``'s update as flat tensors for storage: ``<name>::B`` and ``<name>::A`` for LowRank,
    ``<name>::delta`` for Dense."""
    return {f"{name}::B": update.B, f"{name}::A": update.A} if isinstance(update, LowRank) else {f"{name}::delta": update.delta}


class StoredUpdates(LazyMapping[Update]):
    """The updates of flat tensors (:func:`update_tensors`' names) by module, each built when asked for: over
    tensors read one at a time (:meth:`mergelab.store.Store.tensors`), a model-sized merge is never held whole."""

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        super().__init__(name for name, _, part in (key.rpartition("::") for key in tensors) if part in ("delta", "B"))
        self._tensors = tensors

    def _make(self, name: str) -> Update:
        if f"{name}::delta" in self._tensors:
            return Dense(self._tensors[f"{name}::delta"])
        return LowRank(self._tensors[f"{name}::B"], self._tensors[f"{name}::A"])


def add_updates(base: Mapping[str, Tensor], updates: Mapping[str, Update], scale: float = 1.0) -> dict[str, Tensor]:
    """``W_0 + scale · ΔW`` for each updated parameter: added in float32, returned in ``W_0``'s dtype
    and device. The one place a model's weights are formed from an update (merged, fine-tuned or
    adapted)."""
    out = {}
    for name, update in updates.items():
        w, delta = base[name], update.dense(torch.float32).to(base[name].device)
        out[name] = (w.to(torch.float32) + (delta if scale == 1.0 else scale * delta)).to(w.dtype)
    return out


def _head(items: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(items[:n])
    return f"{shown}, … ({len(items)} in all)" if len(items) > n else shown
