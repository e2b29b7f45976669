"""Classification and dense tasks as in-memory splits, and the joint label space (KnOTS protocol).

A task holds uint8 images ``(N, S, S, 3)`` per split (``train`` / ``val`` / ``test``), integer
labels, natural-language class names and prompt templates. :func:`to_tensor` normalises images
for the backbones; :func:`joint_label_space` pools the class names of several tasks and
de-duplicates them (MNIST and SVHN share their ten digit labels in KnOTS' 748-label joint task,
001 App. C.4).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

from mergelab.errors import InputError
from mergelab.hashing import content_hash

__all__ = ["SPLITS", "ClassificationTask", "DenseTask", "JointLabels", "Split", "joint_label_space", "to_tensor"]

SPLITS = ("train", "val", "test")
#: Per-channel normalisation applied by :func:`to_tensor` (images in [0, 1] -> roughly [-2, 2]).
MEAN, STD = 0.5, 0.25


def to_tensor(images: np.ndarray) -> Tensor:
    """uint8 ``(N, S, S, 3)`` images -> normalised float ``(N, 3, S, S)`` tensors."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - MEAN) / STD


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] -> uint8 (rounded)."""
    return np.clip(np.rint(np.asarray(images) * 255.0), 0, 255).astype(np.uint8)


@dataclass(frozen=True, eq=False)
class Split:
    """Inputs and their targets: an int array of labels, or a mapping of named dense targets.

    The inputs are uint8 images ``(N, S, S, 3)``, or for a text task (:mod:`mergelab.data.text`)
    padded token ids ``(N, L)``.
    """

    images: np.ndarray
    labels: np.ndarray | Mapping[str, np.ndarray]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def tensors(self) -> tuple[Tensor, Tensor]:
        """``(images (N, 3, S, S) float | token ids (N, L) long, labels (N,) long)`` for a classification split."""
        inputs = torch.from_numpy(np.asarray(self.images)).long() if self.images.ndim == 2 else to_tensor(self.images)
        return inputs, torch.from_numpy(np.asarray(self.labels)).long()


@dataclass(frozen=True, eq=False)
class ClassificationTask:
    """An image-classification task whose splits are produced on first use by ``make_split``.

    ``make_split(split) -> Split`` must be deterministic (the micro tasks regenerate their data
    from a seed). ``source`` says where the images come from; ``analogue`` names the dataset of
    the papers' benchmark this task mirrors.
    """

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    make_split: Callable[[str], Split] = field(repr=False)
    source: str = ""
    analogue: str = ""
    caption: str = "a photo"
    _cache: dict[str, Split] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if len(set(self.classnames)) != len(self.classnames):
            raise InputError(f"task {self.name!r} has duplicate class names; give every class a distinct name")
        if not self.templates or any("{}" not in t for t in self.templates):
            raise InputError(f"task {self.name!r}: every template needs one '{{}}' for the class name")

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def split(self, split: str) -> Split:
        if split not in self._cache:
            self._cache[split] = self.make_split(split)
        return self._cache[split]

    def tensors(self, split: str) -> tuple[Tensor, Tensor]:
        return self.split(split).tensors()

    def prompts(self, classname: str) -> list[str]:
        return [t.format(classname) for t in self.templates]

    @cached_property
    def content_hash(self) -> str:
        """Hash of the names, templates and every split's images and labels."""
        splits = {s: {"images": self.split(s).images, "labels": np.asarray(self.split(s).labels)} for s in SPLITS}
        return content_hash({"name": self.name, "classnames": self.classnames, "templates": self.templates, "splits": splits})


@dataclass(frozen=True, eq=False)
class DenseTask:
    """One task of the heterogeneous dense suite: a target name, its kind and the shared images.

    ``kind`` selects the decoder, loss and metric in :mod:`mergelab.evaluation.dense`.
    """

    name: str
    kind: str
    target: str
    num_outputs: int
    make_split: Callable[[str], Split] = field(repr=False)
    _cache: dict[str, Split] = field(default_factory=dict, repr=False)

    def split(self, split: str) -> Split:
        if split not in self._cache:
            self._cache[split] = self.make_split(split)
        return self._cache[split]

    def tensors(self, split: str) -> tuple[Tensor, Tensor]:
        """``(images, targets)``; targets are long for class-valued kinds, float otherwise."""
        part = self.split(split)
        y = torch.from_numpy(np.asarray(part.labels[self.target]))
        return to_tensor(part.images), (y.long() if y.dtype in (torch.int64, torch.int32) else y.float())


@dataclass(frozen=True)
class JointLabels:
    """The de-duplicated union of several tasks' class names and each task's local -> joint map."""

    classnames: tuple[str, ...]
    local_to_joint: Mapping[str, tuple[int, ...]]

    def map_labels(self, task: str, labels: Tensor) -> Tensor:
        return torch.tensor(self.local_to_joint[task], dtype=torch.long)[labels]


def joint_label_space(tasks: Sequence[ClassificationTask]) -> JointLabels:
    """Pool the class names of ``tasks`` in order, keeping the first occurrence of each name.

    Identical names (the two digit tasks' "zero" … "nine") share one joint label, as MNIST and
    SVHN do in KnOTS' joint task (001 App. C.4).
    """
    names: list[str] = []
    index: dict[str, int] = {}
    mapping: dict[str, tuple[int, ...]] = {}
    for task in tasks:
        ids = []
        for name in task.classnames:
            if name not in index:
                index[name] = len(names)
                names.append(name)
            ids.append(index[name])
        mapping[task.name] = tuple(ids)
    return JointLabels(tuple(names), mapping)
