"""The test-time adaptation loop: label-free, preference-aware, on unlabeled validation batches.

One step draws one batch per task, evaluates each task's objective ``f_t`` on the functional
merged model (``W_0 + ΔW(c)`` passed as replacement parameters, no module surgery), scalarises
``f`` under the preference ``ρ`` and takes an optimiser step on the coefficients only. Defaults
follow the papers: Adam, lr 1e-3, batch 16 per task (AdaMerging; 002 App. A; 004 App. H.2).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from mergelab.adaptation.adapter import Adapter
from mergelab.adaptation.models import CoefficientModel
from mergelab.adaptation.objectives import SCALARIZATIONS, EmaStandardizer, alignment_loss, cross_entropy, entropy, validate_preference
from mergelab.errors import InputError
from mergelab.naming import module_coords
from mergelab.taskset import MergedUpdate, TaskSet, add_updates

__all__ = ["OBJECTIVES", "OPTIMIZERS", "AdaptResult", "Forward", "Schedule", "anchors", "mean_abs_change", "objective_losses", "peek",
           "run", "task_weights"]

Params = Mapping[str, Tensor]


@dataclass(frozen=True)
class Forward:
    """How to run the model being merged.

    ``base``: ``W_0`` of every merged parameter. ``logits(t, images, params)``: task ``t``'s
    logits with ``params`` replacing those parameters (zero-shot head of task t).
    ``tokens(images, params)``: patch tokens ``(N, L, W)`` for the alignment loss.
    """

    base: Params
    logits: Callable[[int, Tensor, Params], Tensor] | None = None
    tokens: Callable[[Tensor, Params], Tensor] | None = None


@dataclass
class _Alignment:
    """State of the TAS loss: teacher parameters and EMA standardisers per task (004 App. H)."""

    teachers: list[dict[str, Tensor]]
    student_norms: list[EmaStandardizer] = field(default_factory=list)
    teacher_norms: list[EmaStandardizer] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.student_norms = [EmaStandardizer() for _ in self.teachers]
        self.teacher_norms = [EmaStandardizer() for _ in self.teachers]


def task_weights(taskset: TaskSet, base: Params, t: int) -> dict[str, Tensor]:
    """``W_0 + ΔW_t``: the fine-tuned model of task ``t`` (one task at a time, no grad)."""
    return add_updates(base, taskset.tasks[t].modules)


def _batch(item) -> tuple[Tensor, Tensor | None]:
    return (item[0], item[1]) if isinstance(item, (tuple, list)) else (item, None)


def _entropy_loss(forward: Forward, t: int, images: Tensor, labels: Tensor | None, params: Params, alignment) -> Tensor:
    return entropy(forward.logits(t, images, params))


def _labelled_loss(forward: Forward, t: int, images: Tensor, labels: Tensor | None, params: Params, alignment) -> Tensor:
    if labels is None:
        raise InputError("objective 'labels' needs labelled batches; set allow_labels in the study or use 'entropy'")
    return cross_entropy(forward.logits(t, images, params), labels)


def _alignment_loss(forward: Forward, t: int, images: Tensor, labels: Tensor | None, params: Params, alignment: _Alignment) -> Tensor:
    with torch.no_grad():
        teacher = alignment.teacher_norms[t](forward.tokens(images, alignment.teachers[t]))
    return alignment_loss(alignment.student_norms[t](forward.tokens(images, params)), teacher)


#: Per-task objective ``f_t`` by name: entropy (label-free), tas (004 App. H), labels (opt-in).
OBJECTIVES = {"entropy": _entropy_loss, "tas": _alignment_loss, "labels": _labelled_loss}
#: The optimisers a schedule names (Adam: AdaMerging, AdaRank; AdamW: TARA).
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


@dataclass(frozen=True)
class Schedule:
    """How an adaptive run steps, one value from the study file to the loop.

    ``iters`` optimiser steps at learning rate ``lr``, each on ``batch_size`` unlabeled validation
    images per task (whoever draws the batches reads it); ``objective`` (``f_t``: entropy, TAS
    alignment, or labels where a study allows them), ``scalarization`` of ``f`` under the preference
    ``ρ`` (``preference``; ``None``: uniform) with STCH smoothing ``alpha`` (001 Eq. 10), and the
    ``optimizer``. ``None`` for objective, scalarization or optimizer takes the method's paper
    setting (:meth:`for_method`). Defaults follow the papers: Adam, lr 1e-3, 16 images per task
    (AdaMerging; 002 App. A; 004 App. H.2), 250 steps (001 Tab. 1).
    """

    iters: int = 250
    lr: float = 1e-3
    batch_size: int = 16
    objective: str | None = None
    scalarization: str | None = None
    optimizer: str | None = None
    alpha: float = 1.0
    preference: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.preference is not None:
            object.__setattr__(self, "preference", tuple(float(w) for w in self.preference))
        for value, known, what in ((self.objective, OBJECTIVES, "objective"), (self.scalarization, SCALARIZATIONS, "scalarization"),
                                   (self.optimizer, OPTIMIZERS, "optimizer")):
            if value is not None and value not in known:
                raise InputError(f"unknown {what} {value!r}; choose one of {', '.join(known)}")
        if self.iters < 0 or self.batch_size < 1:
            raise InputError(f"a schedule needs iters >= 0 and batch_size >= 1, got {self.iters} and {self.batch_size}")

    def for_method(self, adapter: Adapter) -> Schedule:
        """This schedule with ``adapter``'s paper settings wherever it leaves one ``None``."""
        return replace(self, objective=self.objective or adapter.objective,
                       scalarization=self.scalarization or adapter.scalarization, optimizer=self.optimizer or adapter.optimizer)


def objective_losses(objective: str, forward: Forward, params: Params, batch: Sequence, alignment: _Alignment | None = None) -> Tensor:
    """``f = (f_1 … f_T)`` on one batch per task."""
    loss = OBJECTIVES[objective]
    return torch.stack([loss(forward, t, *_batch(item), params, alignment) for t, item in enumerate(batch)])


def peek(streams: Sequence[Iterator], n: int) -> tuple[list[list], list[Iterator]]:
    """The first ``n`` items of every stream, and the streams with those items put back in front.

    What a method reads before its loop (the STCH anchors) must not shift the batches the loop
    sees: every adaptive method of a study then steps on the same batches in the same order
    (common random numbers), whether it measures anchors or not.
    """
    heads = [list(itertools.islice(stream, n)) for stream in streams]
    return heads, [itertools.chain(head, stream) for head, stream in zip(heads, streams, strict=True)]


def anchors(objective: str, forward: Forward, taskset: TaskSet, batches: Sequence[Sequence],
            teachers: list[dict[str, Tensor]] | None = None) -> Tensor:
    """``z_t``: task t's objective when only task t's own update is applied (001 Sec. 3), the mean
    over the validation batches ``batches[t]`` of task t (see :func:`peek`)."""
    loss = OBJECTIVES[objective]
    alignment = _Alignment(teachers) if teachers is not None else None
    values = []
    for t in range(len(taskset)):
        weights = task_weights(taskset, forward.base, t)
        with torch.no_grad():
            values.append(np.mean([float(loss(forward, t, *_batch(item), weights, alignment)) for item in batches[t]]))
    return torch.tensor(values)


def mean_abs_change(first: Mapping[str, np.ndarray], last: Mapping[str, np.ndarray]) -> float:
    """Mean ``|c_final − c_initial|`` over every learned coefficient (all tensors pooled): how far a
    run moved from its starting point (0 means the merge is its initialisation)."""
    deltas = [np.abs(np.asarray(last[k], dtype=np.float64) - np.asarray(first[k], dtype=np.float64)).ravel() for k in first]
    return float(np.concatenate(deltas).mean()) if deltas else 0.0


@dataclass
class AdaptResult:
    merged: MergedUpdate
    history: xr.Dataset
    seconds_per_iter: float


def run(
    model: CoefficientModel,
    forward: Forward,
    batches: Sequence[Iterator],
    schedule: Schedule,
    *,
    anchor_values: Tensor | None = None,
    teachers: list[dict[str, Tensor]] | None = None,
    record_every: int = 10,
    device: str | torch.device = "cpu",
    bf16: bool = False,
    progress: Callable[[int, float], None] | None = None,
    meta: Mapping | None = None,
) -> AdaptResult:
    """Optimise ``model``'s coefficients as ``schedule`` says (its objective, scalarisation and
    optimiser given: :meth:`Schedule.for_method`); return the merged update and the training history.

    ``history`` holds ``loss(iteration, task)``, ``objective(iteration)``, every learned tensor at
    the recorded iterations (``coef_<name>(record, …)``) and the model's per ``(record, module, task)``
    summaries (:meth:`~mergelab.adaptation.models.CoefficientModel.summary`: ``coefficient_mean``, and
    ``mask_kept_fraction`` / ``lambda`` for AdaRank) for 004 Fig. 14 / 002 Fig. 5, AdaRank's
    ``mask(record, module, task, component)`` (1-based components by decreasing σ, NaN past a task's
    last; :meth:`~mergelab.adaptation.models.CoefficientModel.components`), and in its attrs
    ``mean_abs_delta_coef`` (:func:`mean_abs_change` from the first to the last record).
    It takes 11 parameters: what it optimises, what only some methods add (anchors, teachers), how it records and runs."""
    objective, scalarization, optimizer = _checked_schedule(schedule, forward, teachers)
    iters, lr, alpha = schedule.iters, schedule.lr, schedule.alpha
    rho = validate_preference(schedule.preference, model.n_tasks)
    scalarize = SCALARIZATIONS[scalarization].fn
    device = torch.device(device)
    model.to_device(device)
    base = {m: forward.base[m].to(device) for m in model.module_names}
    alignment = _Alignment(teachers) if objective == "tas" else None
    opt = OPTIMIZERS[optimizer](model.parameters(), lr=lr)
    losses = np.zeros((iters, model.n_tasks))
    totals = np.zeros(iters)
    records = _Records()
    records.take(model, 0)
    start = time.perf_counter()
    for it in range(iters):
        batch = [next(stream) for stream in batches]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            f = objective_losses(objective, forward, model.weights(base), batch, alignment)
            total = scalarize(f, rho, anchor_values, alpha)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        losses[it], totals[it] = f.detach().float().cpu().numpy(), float(total.detach())
        if (it + 1) % record_every == 0 or it + 1 == iters:
            records.take(model, it + 1)
        if progress is not None:
            progress(it + 1, totals[it])
    seconds = (time.perf_counter() - start) / max(iters, 1)
    history = _history(model, losses, totals, records.states, records.summaries, records.at)
    history.attrs.update({"objective": objective, "scalarization": scalarization, "alpha": alpha, "space": model.space,
                          "preference": rho.tolist(), "lr": lr, "optimizer": optimizer, "iters": iters,
                          "seconds_per_iter": seconds, "mean_abs_delta_coef": mean_abs_change(records.states[0], records.states[-1]),
                          "anchors": None if anchor_values is None else anchor_values.tolist()})
    return AdaptResult(model.merged_update(meta=meta), history, seconds)


def _checked_schedule(schedule: Schedule, forward: Forward, teachers: list[dict[str, Tensor]] | None) -> tuple[str, str, str]:
    """Step 1 of :func:`run`: the schedule's objective, scalarization and optimizer, all set, and what the objective needs."""
    objective, scalarization, optimizer = schedule.objective, schedule.scalarization, schedule.optimizer
    if objective is None or scalarization is None or optimizer is None:
        raise InputError("the loop runs a schedule with its objective, scalarization and optimizer set; "
                         "take the method's with Schedule.for_method")
    if objective == "tas" and (teachers is None or forward.tokens is None):
        raise InputError("objective 'tas' needs patch tokens (a backbone with image_tokens) and the fine-tuned teachers")
    return objective, scalarization, optimizer


@dataclass
class _Records:
    """What :func:`run` records at the recorded iterations (0: the initialisation): the learned tensors and the model's summaries."""

    states: list[dict[str, np.ndarray]] = field(default_factory=list)
    summaries: list[dict[str, np.ndarray]] = field(default_factory=list)
    at: list[int] = field(default_factory=list)

    def take(self, model: CoefficientModel, iteration: int) -> None:
        """Record ``model``'s learned tensors and per-(module, task) summaries after ``iteration`` steps."""
        self.states.append(model.state())
        self.summaries.append({**model.summary(), **model.components()})
        self.at.append(iteration)


def _history(model: CoefficientModel, losses: np.ndarray, totals: np.ndarray, records, summaries, recorded_at) -> xr.Dataset:
    ds = xr.Dataset(
        {"loss": (("iteration", "task"), losses), "objective": (("iteration",), totals)},
        coords={"iteration": np.arange(1, len(totals) + 1), "task": np.array(model.task_names, dtype=object),
                "record": np.array(recorded_at), **module_coords(model.module_names, model.layout)},
    )
    for name, first in summaries[0].items():  # (record, module, task): coefficient_mean, mask_kept_fraction, lambda, …
        dims = ("record", "module", "task") + (("component",) if first.ndim == 3 else ())  # … and AdaRank's mask
        ds[name] = (dims, np.stack([s[name] for s in summaries]))
    if "component" in ds.dims:
        ds = ds.assign_coords(component=np.arange(1, ds.sizes["component"] + 1))
    for name, first in records[0].items():
        dims = ("record",) + tuple(f"{name.replace('.', '_')}_dim{i}" for i in range(first.ndim))
        ds[f"coef_{name.replace('.', '_')}"] = (dims, np.stack([r[name] for r in records]))
    return ds
