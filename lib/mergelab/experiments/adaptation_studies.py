"""Shared machinery of the adaptation studies: adapt on validation images, report
per-task accuracy, and the AdaRank learning ablation (002 Tab. 4).

An :class:`AdaptationSetting` is a :class:`~mergelab.bench.BenchSession`, some of its
tasks (in the task set's order) and an adaptation schedule. It offers the two operations every
study repeats: :meth:`~AdaptationSetting.adapt` (label-free adaptation on **validation** batches
only) and :meth:`~AdaptationSetting.accuracy` (top-1 accuracy per task and split, for reporting;
the test split may be evaluated here, never read by adaptation). Study functions return xarray
Datasets with named dims, ready for ``Store.put_dataset``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import xarray as xr
from torch import Tensor

from mergelab.adaptation import AdaptResult, Schedule, adapt, build
from mergelab.errors import InputError
from mergelab.bench import BenchSession
from mergelab.merging import merge
from mergelab.taskset import MergedUpdate, TaskSet

__all__ = ["ABLATION_CONFIGS", "AdaptationSetting", "adarank_ablation", "check_splits", "final_losses"]

Params = Mapping[str, Tensor]


@dataclass(eq=False)
class AdaptationSetting:
    """A session, the tasks being merged (``names``, in task-set order) and the adaptation schedule.

    ``schedule`` (its iterations, learning rate and batch size; the method's paper objective,
    scalarisation and optimiser) and ``seed`` apply to every :meth:`adapt` call; every call draws
    the same batch sequence (:meth:`BenchSession.val_streams`), so runs that differ only in a
    preference or a hyper-parameter see the same images (common random numbers).
    """

    session: BenchSession
    names: Sequence[str] | None = None
    schedule: Schedule = Schedule()
    seed: int = 0

    def __post_init__(self) -> None:
        full = self.session.names
        self.names = full if self.names is None else list(self.names)
        unknown = [n for n in self.names if n not in full]
        if unknown:
            raise InputError(f"unknown task(s) {unknown}; this setting has {full}")
        self.taskset: TaskSet = self.session.taskset if self.names == full else self.session.taskset.subset(self.names)

    def subset(self, names: Sequence[str]) -> AdaptationSetting:
        """The same session and schedule on the named tasks (in the given order)."""
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise InputError(f"unknown task(s) {unknown}; this setting has {self.names}")
        return AdaptationSetting(self.session, list(names), self.schedule, self.seed)

    def adapt(self, method: str, **settings: Any) -> AdaptResult:
        """``mergelab.adaptation.adapt`` on the validation split with this setting's schedule; ``settings``:
        the method's hyper-parameters and any of the schedule's (``preference``, ``alpha``,
        ``scalarization``, …), which replace this setting's for this call."""
        fields = {f.name for f in dataclasses.fields(Schedule)}
        schedule = replace(self.schedule, **{k: v for k, v in settings.items() if k in fields})
        hp = {k: v for k, v in settings.items() if k not in fields}
        forward = self.session.forward(self.names, self.taskset.module_names)
        batches = self.session.val_streams(self.names, schedule.batch_size, self.seed)
        return adapt(method, self.taskset, forward, batches, schedule, record_every=max(1, schedule.iters // 25), **hp)

    def params(self, merged: MergedUpdate | None) -> Params | None:
        """Replacement encoder weights ``W_0 + ΔW`` of a merged update (``None``: the base model)."""
        return self.session.weights(merged)

    def task_params(self, t: int) -> Params:
        """Task ``t``'s fine-tuned weights ``W_0 + ΔW_t``."""
        return self.session.finetuned(self.names[t])

    def task_arithmetic(self, lam: float = 0.3) -> Params | None:
        """``W_0 + λ Σ_t ΔW_t`` (Ilharco et al., 2023; λ = 0.3 as AdaMerging's and 001's TA baseline)."""
        return self.session.weights(merge(self.taskset, "task_arithmetic", "full", alpha=lam))

    def accuracy(self, params: Params | None, splits: Sequence[str], tasks: Sequence[int] | None = None) -> np.ndarray:
        """``(task, split)`` top-1 accuracies of one model (``params`` replaces encoder weights)."""
        tasks = range(len(self.names)) if tasks is None else tasks
        return np.array([[self.session.accuracy(self.names[t], split, params)[0] for split in splits] for t in tasks])

    def attrs(self, **extra: Any) -> dict[str, Any]:
        """Provenance attrs shared by every study Dataset."""
        schedule = self.schedule
        return {"tasks": list(self.names), "iters": schedule.iters, "batch_size": schedule.batch_size, "lr": schedule.lr, "seed": self.seed,
                "taskset": self.taskset.content_hash, "adaptation_split": "val", **extra}


def final_losses(result: AdaptResult, last: int = 10) -> np.ndarray:
    """Per-task objective averaged over the last ``last`` iterations (NaN when nothing ran)."""
    loss = result.history["loss"].values
    return loss[-last:].mean(0) if len(loss) else np.full(loss.shape[1], np.nan)


#: The splits a study reports (a study's setting is checked against it when the study loads).
Splits = Sequence[Literal["val", "test"]]


def check_splits(splits: Sequence[str]) -> list[str]:
    splits = list(splits)
    bad = [s for s in splits if s not in ("val", "test")]
    if not splits or bad:
        raise InputError(f"report splits must be 'val' and/or 'test', got {splits}")
    return splits


#: 002 Tab. 4's rows: which of λ and the mask B are learned.
ABLATION_CONFIGS = {"none": (False, False), "lambda": (True, False), "mask": (False, True), "both": (True, True)}


def adarank_ablation(setting: AdaptationSetting, *, origins: Sequence[Literal["ta", "cart"]] = ("ta", "cart"),
                     space: Literal["full", "core"] = "full",
                     splits: Splits = ("val", "test"), dataset: str | None = None, **hp: Any) -> xr.Dataset:
    """002 Tab. 4: AdaRank learning only λ, only the mask B, both, or neither, from the TA and CART origins.

    Returns ``accuracy(origin, config, task, split)`` and ``average_accuracy(origin, config, split)``
    with ``config`` in ``none, lambda, mask, both`` (coords ``learn_lambda`` / ``learn_mask``).
    ``none`` is the initial model (TA: all components, λ = 0.3; CART: top ``rank_ratio`` components
    around the mean, λ = 1.0), evaluated without adaptation.
    """
    splits = check_splits(splits)
    acc = np.zeros((len(origins), len(ABLATION_CONFIGS), len(setting.names), len(splits)))
    for o, origin in enumerate(origins):
        for c, (learn_lambda, learn_mask) in enumerate(ABLATION_CONFIGS.values()):
            kw = {"origin": origin, "space": space, "learn_lambda": learn_lambda, "learn_mask": learn_mask, **hp}
            if learn_lambda or learn_mask:
                merged = setting.adapt("adarank", **kw).merged
            else:
                merged = build("adarank", setting.taskset, **kw).merged_update()
            acc[o, c] = setting.accuracy(setting.params(merged), splits)
    ds = xr.Dataset(
        {"accuracy": (("origin", "config", "task", "split"), acc),
         "average_accuracy": (("origin", "config", "split"), acc.mean(axis=2))},
        coords={"origin": list(origins), "config": list(ABLATION_CONFIGS), "task": setting.names, "split": splits,
                "learn_lambda": ("config", [v[0] for v in ABLATION_CONFIGS.values()]),
                "learn_mask": ("config", [v[1] for v in ABLATION_CONFIGS.values()])},
        attrs=setting.attrs(study="adarank_ablation", paper="002 Tab. 4", space=space, hyper_parameters=dict(hp)),
    )
    if dataset:
        ds.attrs["dataset"] = dataset
    return ds
