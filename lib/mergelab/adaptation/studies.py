"""Shared machinery of the adaptation studies (DESIGN §4, §6): adapt on validation images, report
per-task accuracy, and the AdaRank learning ablation (002 Tab. 4).

An :class:`AdaptationSetting` binds a backbone, its classification tasks (in the task set's order)
and their task set, computes each task's zero-shot head once, and offers the two operations every
study repeats: :meth:`~AdaptationSetting.adapt` (label-free adaptation on **validation** batches only)
and :meth:`~AdaptationSetting.accuracy` (top-1 accuracy per task and split, for reporting; the test
split may be evaluated here, never read by adaptation). Study functions return xarray Datasets with
named dims, ready for ``Store.put_dataset``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from mergelab.adaptation import AdaptResult, adapt, build
from mergelab.adaptation.inputs import classification_forward, unlabeled_batches
from mergelab.adaptation.loop import Forward, task_weights
from mergelab.data.tasks import ClassificationTask
from mergelab.errors import InputError
from mergelab.evaluation.heads import task_head
from mergelab.evaluation.metrics import predict, top1_accuracy
from mergelab.model.base import Backbone
from mergelab.taskset import MergedUpdate, TaskSet

if TYPE_CHECKING:
    from mergelab.bench import Bench

__all__ = ["ABLATION_CONFIGS", "AdaptationSetting", "adarank_ablation", "check_splits", "final_losses"]

Params = Mapping[str, Tensor]


@dataclass(eq=False)
class AdaptationSetting:
    """A backbone, its tasks (same order as ``taskset``) and the task set being merged.

    ``iters``, ``batch_size``, ``lr`` and ``seed`` apply to every :meth:`adapt` call; every call draws
    the same batch sequence (one generator per task from ``seed``), so runs that differ only in a
    preference or a hyper-parameter see the same images (common random numbers).
    """

    backbone: Backbone
    tasks: Sequence[ClassificationTask]
    taskset: TaskSet
    iters: int = 250
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    forward: Forward = field(init=False)
    _images: dict[tuple[int, str], tuple[Tensor, Tensor]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.tasks = list(self.tasks)
        names = [t.name for t in self.tasks]
        if names != list(self.taskset.names):
            raise InputError(f"tasks {names} do not match the task set's {list(self.taskset.names)}; give them in task-set order")
        if self.iters < 0 or self.batch_size < 1:
            raise InputError(f"iters must be >= 0 and batch_size >= 1, got {self.iters} and {self.batch_size}")
        self.heads = [task_head(self.backbone, task) for task in self.tasks]
        self.forward = classification_forward(self.backbone, self.tasks, self.taskset.module_names, self.heads)

    @classmethod
    def from_bench(cls, bench: Bench, tasks: Sequence[str] | None = None, **schedule: Any) -> AdaptationSetting:
        """The setting of a :class:`~mergelab.bench.Bench` (optionally a subset of its tasks)."""
        setting = cls(bench.backbone, bench.task_list, bench.taskset, **schedule)
        return setting if tasks is None else setting.subset(tasks)

    def subset(self, names: Sequence[str]) -> AdaptationSetting:
        """The same backbone and schedule on the named tasks (in the given order)."""
        by_name = {t.name: t for t in self.tasks}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise InputError(f"unknown task(s) {unknown}; this setting has {self.names}")
        return AdaptationSetting(self.backbone, [by_name[n] for n in names], self.taskset.subset(names),
                                 self.iters, self.batch_size, self.lr, self.seed)

    @property
    def names(self) -> list[str]:
        return list(self.taskset.names)

    def adapt(self, method: str, *, preference: Sequence[float] | None = None, alpha: float = 1.0,
              **hp: Any) -> AdaptResult:
        """``mergelab.adaptation.adapt`` on the validation split, this setting's schedule."""
        batches = unlabeled_batches(self.tasks, self.batch_size, self.seed, split="val")
        return adapt(method, self.taskset, self.forward, batches, preference=preference, alpha=alpha,
                     iters=self.iters, lr=self.lr, record_every=max(1, self.iters // 25), **hp)

    def params(self, merged: MergedUpdate | None) -> dict[str, Tensor] | None:
        """Replacement encoder weights ``W_0 + ΔW`` of a merged update (``None``: the base model)."""
        if merged is None:
            return None
        return {m: self.forward.base[m] + u.dense(torch.float32) for m, u in merged.modules.items()}

    def task_params(self, t: int) -> dict[str, Tensor]:
        """Task ``t``'s fine-tuned weights ``W_0 + ΔW_t``."""
        return task_weights(self.taskset, self.forward.base, t)

    def task_arithmetic(self, lam: float = 0.3) -> dict[str, Tensor]:
        """``W_0 + λ Σ_t ΔW_t`` (Ilharco et al., 2023; λ = 0.3 as AdaMerging's and 001's TA baseline)."""
        return {m: w + lam * sum(u.dense(torch.float32) for u in self.taskset.updates(m)) for m, w in self.forward.base.items()}

    def _split(self, t: int, split: str) -> tuple[Tensor, Tensor]:
        if (t, split) not in self._images:
            self._images[t, split] = self.tasks[t].tensors(split)
        return self._images[t, split]

    def accuracy(self, params: Params | None, splits: Sequence[str], tasks: Sequence[int] | None = None) -> np.ndarray:
        """``(task, split)`` top-1 accuracies of one model (``params`` replaces encoder weights)."""
        tasks = range(len(self.tasks)) if tasks is None else tasks
        out = np.zeros((len(tasks), len(splits)))
        for i, t in enumerate(tasks):
            for j, split in enumerate(splits):
                images, labels = self._split(t, split)
                out[i, j] = top1_accuracy(predict(self.backbone, images, self.heads[t], params), labels)
        return out

    def attrs(self, **extra: Any) -> dict[str, Any]:
        """Provenance attrs shared by every study Dataset."""
        return {"tasks": self.names, "iters": self.iters, "batch_size": self.batch_size, "lr": self.lr,
                "seed": self.seed, "taskset": self.taskset.content_hash, "adaptation_split": "val", **extra}


def final_losses(result: AdaptResult, last: int = 10) -> np.ndarray:
    """Per-task objective averaged over the last ``last`` iterations (NaN when nothing ran)."""
    loss = result.history["loss"].values
    return loss[-last:].mean(0) if len(loss) else np.full(loss.shape[1], np.nan)


def check_splits(splits: Sequence[str]) -> list[str]:
    splits = list(splits)
    bad = [s for s in splits if s not in ("val", "test")]
    if not splits or bad:
        raise InputError(f"report splits must be 'val' and/or 'test', got {splits}")
    return splits


#: 002 Tab. 4's rows: which of λ and the mask B are learned.
ABLATION_CONFIGS = {"none": (False, False), "lambda": (True, False), "mask": (False, True), "both": (True, True)}


def adarank_ablation(setting: AdaptationSetting, *, origins: Sequence[str] = ("ta", "cart"), space: str = "full",
                     splits: Sequence[str] = ("val", "test"), dataset: str | None = None, **hp: Any) -> xr.Dataset:
    """002 Tab. 4: AdaRank learning only λ, only the mask B, both, or neither, from the TA and CART origins.

    Returns ``accuracy(origin, config, task, split)`` and ``average_accuracy(origin, config, split)``
    with ``config`` in ``none, lambda, mask, both`` (coords ``learn_lambda`` / ``learn_mask``).
    ``none`` is the initial model (TA: all components, λ = 0.3; CART: top ``rank_ratio`` components
    around the mean, λ = 1.0), evaluated without adaptation.
    """
    splits = check_splits(splits)
    acc = np.zeros((len(origins), len(ABLATION_CONFIGS), len(setting.tasks), len(splits)))
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
