"""What the model-dependent analyses share: validation batches and per-task losses.

The analyses of :mod:`mergelab.experiments.model_analyses` run the model on a task's
**validation** images only (never select or adapt on the test split):

- :func:`image_batches` — the first ``batches × batch_size`` images of a split, in batches
  (``batches=None``: every image), with their labels only when a labelled loss asks for them;
- :func:`task_loss` — ``f_t``: mean prediction entropy (label-free; AdaMerging, 002 Eq. 6,
  001 Sec. 3) or, when ``labels`` are given, the cross-entropy task loss;
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from torch import Tensor

from mergelab.adaptation.objectives import cross_entropy, entropy
from mergelab.errors import InputError
from mergelab.evaluation.heads import image_logits

if TYPE_CHECKING:
    from mergelab.data.tasks import ClassificationTask
    from mergelab.model.base import Backbone

__all__ = ["Batch", "image_batches", "task_loss", "validate_batching"]

Batch = tuple[Tensor, Tensor | None]


def validate_batching(batch_size: int, batches: int | None) -> None:
    """InputError unless ``batch_size ≥ 1`` and ``batches`` is ``None`` or ``≥ 1``."""
    if int(batch_size) < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if batches is not None and int(batches) < 1:
        raise InputError(f"batches must be >= 1 (or None for every image), got {batches}")


def image_batches(task: ClassificationTask, *, batch_size: int = 64, batches: int | None = None,
                  split: str = "val", labels: bool = False) -> list[Batch]:
    """The first ``batches`` batches of ``split`` (all of it when ``batches`` is None).

    Labels are returned only when ``labels`` is true (a labelled loss was asked for); every
    label-free analysis receives ``None`` in their place.
    """
    validate_batching(batch_size, batches)
    images, targets = task.tensors(split)
    n = len(images) if batches is None else min(len(images), batch_size * batches)
    return [(images[i:i + batch_size], targets[i:i + batch_size] if labels else None) for i in range(0, n, batch_size)]


def task_loss(backbone: Backbone, head: Tensor, images: Tensor, labels: Tensor | None,
              params: Mapping[str, Tensor]) -> Tensor:
    """``f_t`` on one batch: mean softmax entropy of the zero-shot logits, or cross-entropy with labels."""
    logits = image_logits(backbone, images, head, params)
    return entropy(logits) if labels is None else cross_entropy(logits, labels)
