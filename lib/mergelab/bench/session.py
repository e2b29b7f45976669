"""One benchmark in one run: the only place that builds heads, applies updates and draws batches.

A :class:`BenchSession` wraps a :class:`~mergelab.bench.Bench` and gives every experiment (the
study's nodes, the adaptation studies, the model-dependent analyses, ``merge --select`` and
``adapt``) the same answers to the questions they all ask:

* ``head(name)`` — task ``name``'s zero-shot head (:func:`mergelab.evaluation.heads.task_head`), built once,
  and ``joint_head()`` the head over every task's labels (the joint task);
* ``weights(update)`` — the replacement parameters ``W_0 + ΔW`` of a merged update
  (:func:`mergelab.taskset.add_updates`), formed a block at a time while a forward runs
  (:meth:`BenchSession.streamed`); ``finetuned(t)`` the same for task ``t``'s own update;
* ``tensors(name, split)`` — a split's images and labels, converted once;
* ``val_batches`` — the first ``batches × batch_size`` validation images (the analyses' fixed
  batches) and ``val_streams`` — endless shuffled validation batches, one generator per task
  seeded ``seed + t`` (the one rule of adaptation: a study's adaptive runs and its adaptation
  studies draw the same images);
* ``features`` / ``accuracy`` / ``tas`` / ``forward`` — image features, top-1 accuracy with the
  task's head, TAS against the task's fine-tuned model (004 Eq. 2; its features computed once), and
  the functional forward adaptation runs. One encoder pass of a split serves both accuracy and TAS.

Nothing here reads the test split unless a caller asks for it by name.
``for_thread()`` gives a worker thread its own copy of the backbone (a functional forward swaps a
module's parameters while it runs) sharing every cache.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mergelab.adaptation.loop import Forward
from mergelab.adaptation.objectives import entropy
from mergelab.analysis.batches import Batch, image_batches
from mergelab.analysis.proxies import check_distance
from mergelab.bench.benches import Bench
from mergelab.data.tasks import joint_label_space
from mergelab.errors import InputError
from mergelab.evaluation.heads import head_logits, image_logits, joint_head, task_head
from mergelab.evaluation.metrics import image_features
from mergelab.model import Backbone
from mergelab.model.streaming import StreamedParams
from mergelab.taskset import MergedUpdate, TaskSet, Update, add_updates

__all__ = ["BenchSession", "shuffled_batches"]

Params = Mapping[str, Tensor]


@dataclass(eq=False)
class _Shared:
    """What every thread's copy of one session shares: the task set, base weights, heads, tensors."""

    lock: threading.RLock = field(default_factory=threading.RLock)
    values: dict[Any, Any] = field(default_factory=dict)

    def get(self, key: Any, make: Any) -> Any:
        with self.lock:
            if key not in self.values:
                self.values[key] = make()
            return self.values[key]


def shuffled_batches(images: Tensor, labels: Tensor | None, batch_size: int, seed: int) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
    """Endless shuffled batches (a new permutation per epoch, the last partial batch dropped);
    labelled only when ``labels`` is given."""
    g = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(images))
    while True:
        order = torch.randperm(len(images), generator=g)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            take = order[i:i + batch_size]
            yield images[take] if labels is None else (images[take], labels[take])


@dataclass(eq=False)
class BenchSession:
    """A bench's model and tasks with everything derived from them computed once (see module doc)."""

    bench: Bench
    _shared: _Shared = field(default_factory=_Shared, repr=False)

    def __post_init__(self) -> None:
        # The encoder is frozen: merges supply its weights and only an adaptive method's coefficients learn.
        # A parameter left requiring grad would gather a model-sized ``.grad`` at every adaptation step.
        self.bench.backbone.vision.requires_grad_(False)

    @property
    def backbone(self) -> Backbone:
        return self.bench.backbone

    @property
    def names(self) -> list[str]:
        """The tasks in the bench's (= the task set's) order."""
        return list(self.bench.tasks)

    @property
    def taskset(self) -> TaskSet:
        return self._shared.get("taskset", lambda: self.bench.taskset)

    @property
    def base(self) -> dict[str, Tensor]:
        """``W_0``: the encoder's pre-trained weights by state-dict name."""
        return self._shared.get("base", self.backbone.base_state)

    def for_thread(self) -> BenchSession:
        """A session with a private copy of the backbone's modules and the caches of this one. The copy
        shares the weight tensors (a functional forward swaps the copy's own parameter slots and never
        writes a weight), so a thread costs no second copy of a model's weights."""
        backbone = self.bench.backbone
        weights = {id(t): t for t in (*backbone.vision.parameters(), *backbone.vision.buffers())}  # the encoder's
        with self._shared.lock:
            return BenchSession(replace(self.bench, backbone=copy.deepcopy(backbone, memo=weights)), self._shared)

    def warm(self) -> None:
        """Build the task set, base weights, heads and val/test tensors now (before threads start)."""
        _ = self.taskset, self.base
        for name in self.names:
            self.head(name)
            self.tensors(name, "val"), self.tensors(name, "test")

    # Heads, weights, data -------------------------------------------------------------------------

    def head(self, name: str) -> Tensor:
        """Task ``name``'s head: its own trained one when the bench has them (``Bench.heads``),
        otherwise its zero-shot head (class names × templates through the text tower)."""
        if self.bench.heads is not None:
            return self.bench.heads[name]
        return self._shared.get(("head", name), lambda: task_head(self.backbone, self.bench.tasks[name]))

    def joint_head(self) -> Tensor:
        """The head over the de-duplicated union of every task's labels (the joint task; built once)."""
        if self.bench.heads is not None:
            raise InputError(f"joint: the {self.bench.name} bench's tasks bring their own classifier heads, so there is no "
                             "shared label space to score jointly; set joint: false")
        tasks = list(self.bench.tasks.values())
        return self._shared.get("joint_head", lambda: joint_head(self.backbone, tasks, joint_label_space(tasks)))

    def tensors(self, name: str, split: str) -> tuple[Tensor, Tensor]:
        """``(images, labels)`` of task ``name``'s ``split``."""
        return self._shared.get(("tensors", name, split), lambda: self.bench.tasks[name].tensors(split))

    def weights(self, update: MergedUpdate | Mapping[str, Update] | None) -> StreamedParams | None:
        """``W_0 + ΔW`` for every parameter ``update`` (a merged update or its modules) changes (``None``: the
        base model's own weights); :meth:`streamed` weights."""
        if update is None:
            return None
        return self.streamed(update.modules if isinstance(update, MergedUpdate) else update)

    def finetuned(self, name: str) -> StreamedParams:
        """Task ``name``'s fine-tuned weights ``W_0 + ΔW_t`` (:meth:`streamed`)."""
        return self.streamed(self.taskset.tasks[self.taskset.names.index(name)].modules)

    def streamed(self, modules: Mapping[str, Update]) -> StreamedParams:
        """``W_0 + ΔW`` of each module, formed by :func:`~mergelab.taskset.add_updates` whenever a forward reads
        it, a repeated block at a time (:mod:`mergelab.model.streaming`), and never kept: an evaluation holds
        one block's weights beside the model, never a second copy of its adapted matrices, and its outputs
        are those of the weights formed up front, bit for bit. The base is never written (nothing is applied
        in place and reverted, which ``W_0 + ΔW - ΔW`` would not undo exactly in floating point); ``modules``
        may read each update when asked (a stored merge, :class:`~mergelab.taskset.StoredUpdates`)."""
        base = self.base
        return StreamedParams(modules, lambda name: add_updates(base, {name: modules[name]})[name])

    def val_batches(self, name: str, *, batch_size: int = 64, batches: int | None = None,
                    labels: bool = False) -> list[Batch]:
        """The first ``batches × batch_size`` validation images of task ``name`` (all when ``None``)."""
        return image_batches(self.bench.tasks[name], batch_size=batch_size, batches=batches, labels=labels)

    def val_streams(self, names: Sequence[str], batch_size: int, seed: int,
                    labels: bool = False) -> list[Iterator[Tensor | tuple[Tensor, Tensor]]]:
        """Endless shuffled validation batches of each named task, the ``t``-th seeded ``seed + t``."""
        streams = []
        for t, name in enumerate(names):
            images, targets = self.tensors(name, "val")
            streams.append(shuffled_batches(images, targets if labels else None, batch_size, seed + t))
        return streams

    # What experiments measure ---------------------------------------------------------------------

    def features(self, name: str, split: str, params: Params | None) -> Tensor:
        """``f(x; params)``: the unnormalised image features of task ``name``'s ``split`` (no gradients)."""
        return image_features(self.backbone, self.tensors(name, split)[0], params)

    def accuracy(self, name: str, split: str, params: Params | None, features: Tensor | None = None) -> tuple[float, Tensor]:
        """Top-1 accuracy of task ``name`` on ``split`` with its head (:meth:`head`), and the normalised
        image features (the joint head reuses them); ``features``: :meth:`features` of that split, when at hand."""
        features = self.features(name, split, params) if features is None else features
        return float(self.hits(name, split, params, features).float().mean()), F.normalize(features, dim=-1)

    def hits(self, name: str, split: str, params: Params | None, features: Tensor | None = None) -> Tensor:
        """``(N,)`` booleans: which of task ``name``'s ``split`` images the model classifies correctly (top-1
        with :meth:`head`); the per-example outcomes paired bootstrap intervals resample."""
        features = self.features(name, split, params) if features is None else features
        return head_logits(self.backbone, features, self.head(name)).argmax(dim=-1) == self.tensors(name, split)[1]

    def entropy(self, name: str, split: str, params: Params | None, features: Tensor | None = None) -> float:
        """The mean Shannon entropy of task ``name``'s predictions on ``split`` with its head: AdaMerging's
        surrogate (001 Sec. 3, after Yang et al., 2023), recorded so a study can show whether it tracks accuracy."""
        features = self.features(name, split, params) if features is None else features
        return float(entropy(head_logits(self.backbone, features, self.head(name))))

    def tas(self, name: str, params: Params | None, features: Tensor | None = None, distance: str = "l2") -> float:
        """``TAS_t`` (004 Eq. 2): the mean ``d(f(x; params), f(x; θ_t))`` over task ``name``'s validation
        images against its fine-tuned model ``θ_t`` (whose features are computed once); lower is better.
        ``features``: :meth:`features` of the val split under ``params``, when at hand."""
        merged = self.features(name, "val", params) if features is None else features
        teacher = self._shared.get(("teacher", name), lambda: self.features(name, "val", self.finetuned(name)))
        return float(check_distance(distance)(merged.double(), teacher.double()).mean())

    def forward(self, names: Sequence[str] | None = None, modules: Sequence[str] | None = None) -> Forward:
        """The functional forward adaptation runs over the named tasks (in order; ``None``: all) for
        the ``modules`` being merged (``None``: every module of the task set)."""
        names = self.names if names is None else list(names)
        heads = [self.head(n) for n in names]
        return Forward(base={m: self.base[m] for m in (self.taskset.module_names if modules is None else modules)},
                       logits=lambda t, x, p: image_logits(self.backbone, x, heads[t], p),
                       tokens=self.backbone.image_tokens)
