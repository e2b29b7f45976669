"""torchvision-style ``ImageFolder`` datasets as :class:`~mergelab.data.tasks.ClassificationTask` (the real-data path).

Layout: ``ROOT/<split>/<class>/<image>`` with ``split`` in train / val / test (a missing ``val``
is carved from ``train`` with a seeded permutation, as KnOTS carves val from test for datasets
without one, as the KnOTS code). Class folder names become class names (``_`` -> space) unless
``classnames`` are given. Images are resized to ``image_size`` and kept as uint8 in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mergelab.data.tasks import ClassificationTask, Split
from mergelab.errors import InputError

__all__ = ["folder_task"]

DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.")


def _read(dataset, image_size: int) -> Split:
    from PIL import Image

    images = np.stack([np.asarray(Image.open(path).convert("RGB").resize((image_size, image_size), Image.BILINEAR))
                       for path, _ in dataset.samples]) if dataset.samples else np.zeros((0, image_size, image_size, 3), np.uint8)
    return Split(images.astype(np.uint8), np.array([label for _, label in dataset.samples], dtype=np.int64))


def folder_task(root: str | Path, *, name: str | None = None, image_size: int = 224, classnames: Sequence[str] | None = None,
                templates: Sequence[str] = DEFAULT_TEMPLATES, val_fraction: float = 0.2, seed: int = 0) -> ClassificationTask:
    """A classification task from ``ROOT/{train,val,test}/<class>/*`` image folders.

    It takes 7 parameters because each keyword is one field of a folder bench's task entry or a split setting (name,
    image size, class names, templates, val fraction, seed)."""
    from torchvision.datasets import ImageFolder

    root = Path(root)
    missing = [s for s in ("train", "test") if not (root / s).is_dir()]
    if missing:
        raise InputError(f"{root} lacks the split folder(s) {missing}; lay it out as ROOT/<split>/<class>/<image> with train and test")
    datasets = {s: ImageFolder(str(root / s)) for s in ("train", "val", "test") if (root / s).is_dir()}
    classes = datasets["train"].classes
    for split, ds in datasets.items():
        if ds.classes != classes:
            raise InputError(f"{root / split} has classes {ds.classes[:3]}…, train has {classes[:3]}…; every split needs the same class "
                             "folders")
    if classnames is not None and len(classnames) != len(classes):
        raise InputError(f"{len(classnames)} class names for {len(classes)} class folders in {root}; give one name per folder")
    names = tuple(classnames) if classnames is not None else tuple(c.replace("_", " ") for c in classes)

    def make(split: str) -> Split:
        if split not in ("train", "val", "test"):
            raise InputError(f"unknown split {split!r}; choose train, val or test")
        if split == "test" or "val" in datasets:
            return _read(datasets[split], image_size)
        full = _read(datasets["train"], image_size)  # no val folder: carve val out of train
        order = np.random.default_rng(seed).permutation(len(full))
        cut = int(round(val_fraction * len(full)))
        take = np.sort(order[:cut] if split == "val" else order[cut:])
        return Split(full.images[take], full.labels[take])

    return ClassificationTask(name or root.name, names, tuple(templates), make, source=str(root), analogue="ImageFolder")
