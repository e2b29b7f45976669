"""Test-time adaptation of merge coefficients (DESIGN §4): registry ``ADAPTERS`` and :func:`adapt`.

| name             | directions (bank)                     | learned                          | objective |
|------------------|---------------------------------------|----------------------------------|-----------|
| ``adamerging``     | raw factors                           | λ per task or per module × task   | entropy   |
| ``tara_a``         | raw rank-1 LoRA directions (001 Eq. 7) | signed φ per direction            | entropy, STCH |
| ``tara_b``         | shared SVD of [ΔW_1 … ΔW_N] (Eq. 9)    | φ per task × shared direction      | entropy, STCH |
| ``adarank``        | each task's singular components        | binary masks (STE) + λ per module  | entropy   |
| ``adamerging_tas`` | raw factors                           | λ per module × task               | TAS alignment (004 App. H) |

A new adaptive method is one builder ``(taskset, **hp) -> CoefficientModel`` and one registry
entry. Non-matrix parameters (biases, norms) always use the raw bank with the method's
per-task coefficients (a singular decomposition of a vector is meaningless).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mergelab.adaptation.bank import Bank, raw_bank, shared_svd_bank, task_svd_bank
from mergelab.adaptation.loop import AdaptResult, Forward, anchors, run, task_weights
from mergelab.adaptation.models import CoefficientModel, DirectionCoefficients, MaskedCoefficients, TaskCoefficients
from mergelab.checkpoints import peft_template
from mergelab.errors import InputError
from mergelab.taskset import TaskSet, Update

__all__ = ["ADAPTERS", "AdaptResult", "Adapter", "Forward", "adapt", "build"]


def _banks(taskset: TaskSet, matrix_bank: Callable[[Sequence[Update]], Bank]) -> tuple[list[str], list[Bank]]:
    modules = list(taskset.module_names)
    banks = []
    for m in modules:
        updates = taskset.updates(m)
        banks.append(matrix_bank(updates) if len(updates[0].shape) == 2 else raw_bank(updates))
    return modules, banks


def build_adamerging(taskset: TaskSet, *, granularity: str = "layer", init: float | None = None,
                     clamp: tuple[float, float] | None = None) -> CoefficientModel:
    """AdaMerging (Yang et al., 2024): λ init 0.3; 004 App. H.2 initialises at 1/T for +TAS."""
    if granularity not in ("task", "layer"):
        raise InputError(f"granularity must be 'task' or 'layer', got {granularity!r}")
    modules, banks = _banks(taskset, raw_bank)
    init = 0.3 if init is None else init
    return TaskCoefficients(modules, banks, taskset.names, granularity=granularity, init=init, clamp=clamp)


def build_adamerging_tas(taskset: TaskSet, *, granularity: str = "layer", init: float | None = None,
                         clamp: tuple[float, float] | None = None) -> CoefficientModel:
    """AdaMerging+TAS (004 App. H.2): λ initialised uniformly at 1/T."""
    return build_adamerging(taskset, granularity=granularity, init=1.0 / len(taskset) if init is None else init, clamp=clamp)


def build_tara_a(taskset: TaskSet, *, init: float = 0.4) -> CoefficientModel:
    """TARA Variant A (001 Eq. 7): ``W_0 + Σ_ij φ_ij b_ij a_ijᵀ``, signed φ, init 0.4."""
    modules, banks = _banks(taskset, raw_bank)
    return DirectionCoefficients(modules, banks, taskset.names, init=init)


def build_tara_b(taskset: TaskSet, *, init: float = 0.4, rank: int | None = None) -> CoefficientModel:
    """TARA Variant B (001 Eqs. 8–9): φ_ik on the top-R shared singular directions (R = all by default)."""
    modules, banks = _banks(taskset, lambda us: shared_svd_bank(us, rank))
    return DirectionCoefficients(modules, banks, taskset.names, init=init)


def build_adarank(taskset: TaskSet, *, origin: str = "ta", lam: float | None = None, rank_ratio: float = 0.16,
                  temperature: float = 10.0) -> CoefficientModel:
    """AdaRank (002 Eq. 5, App. A). ``origin="ta"``: all components on, λ = 0.3.
    ``origin="cart"``: components of ``ΔW_i − mean`` around the average, the top
    ``rank_ratio · min(out, in)`` of each task on (CART init), λ = 1.0 unless given."""
    if origin not in ("ta", "cart"):
        raise InputError(f"adarank origin must be 'ta' or 'cart', got {origin!r}")
    center = origin == "cart"
    modules, banks = _banks(taskset, lambda us: task_svd_bank(us, center=center))
    keep = []
    for m, bank in zip(modules, banks, strict=True):
        shape = taskset.updates(m)[0].shape
        if not center or len(shape) != 2:
            keep.append(torch.ones(bank.size, dtype=torch.bool))
            continue
        k = max(1, int(rank_ratio * min(shape)))
        # components of each task are stored in descending singular value order
        position = torch.cat([torch.arange(int((bank.owner == t).sum())) for t in range(len(taskset))])
        keep.append(position < k)
    lam = (1.0 if center else 0.3) if lam is None else lam
    return MaskedCoefficients(modules, banks, taskset.names, keep=keep, lam=lam, temperature=temperature)


@dataclass(frozen=True)
class Adapter:
    """An adaptive merge method: its builder, default objective and scalarisation, hyper-parameters."""

    build: Callable[..., CoefficientModel]
    objective: str = "entropy"
    scalarization: str = "sum"
    defaults: Mapping[str, Any] = field(default_factory=dict)


ADAPTERS: dict[str, Adapter] = {
    "adamerging": Adapter(build_adamerging),
    "tara_a": Adapter(build_tara_a, scalarization="stch"),
    "tara_b": Adapter(build_tara_b, scalarization="stch"),
    "adarank": Adapter(build_adarank),
    "adamerging_tas": Adapter(build_adamerging_tas, objective="tas"),
}


def build(method: str, taskset: TaskSet, **hp: Any) -> CoefficientModel:
    """The coefficient model of ``method`` for ``taskset`` (hyper-parameters validated)."""
    if method not in ADAPTERS:
        raise InputError(f"unknown adaptive method {method!r}; choose one of {', '.join(ADAPTERS)}")
    try:
        return ADAPTERS[method].build(taskset, **hp)
    except TypeError as err:
        raise InputError(f"{method}: bad hyper-parameters {sorted(hp)} ({err})") from None


def adapt(
    method: str,
    taskset: TaskSet,
    forward: Forward,
    batches: Sequence[Iterator],
    *,
    objective: str | None = None,
    scalarization: str | None = None,
    preference: Sequence[float] | None = None,
    alpha: float = 1.0,
    iters: int = 250,
    lr: float = 1e-3,
    optimizer: str = "adam",
    anchor_batches: int = 2,
    record_every: int = 10,
    device: str = "cpu",
    bf16: bool = False,
    progress: Callable[[int, float], None] | None = None,
    **hp: Any,
) -> AdaptResult:
    """Adapt ``method``'s coefficients on unlabeled batches (one iterator per task, in task order).

    STCH anchors ``z_t`` are measured with only task t's update applied (001 Sec. 3); the TAS
    teachers are the fine-tuned models ``W_0 + ΔW_t``.
    """
    spec = ADAPTERS.get(method)
    model = build(method, taskset, **hp)
    objective = objective or spec.objective
    scalarization = scalarization or spec.scalarization
    if len(batches) != len(taskset):
        raise InputError(f"{len(batches)} batch streams for {len(taskset)} tasks; give one per task in task order")
    teachers = [task_weights(taskset, forward.base, t) for t in range(len(taskset))] if objective == "tas" else None
    z = anchors(objective, forward, taskset, batches, anchor_batches, teachers) if scalarization == "stch" else None
    result = run(model, forward, batches, objective=objective, scalarization=scalarization, preference=preference,
                 alpha=alpha, anchor_values=z, teachers=teachers, iters=iters, lr=lr, optimizer=optimizer,
                 record_every=record_every, device=device, bf16=bf16, progress=progress,
                 meta={"method": method, "space": "full", "hyper_parameters": dict(hp), "tasks": list(taskset.names),
                       "adaptive": True, "peft": peft_template(taskset)})
    result.history.attrs["method"] = method
    return result
