"""What an adaptation run reads from a classification benchmark: the functional forward and the
unlabeled batches (DESIGN §4, §6).

* :func:`classification_forward` — task ``t``'s logits are the merged encoder's normalised image
  features against task ``t``'s zero-shot head (``mergelab.evaluation.heads``), with the merged
  parameters passed by name (no module surgery); patch tokens for the TAS loss (004 App. H).
* :func:`unlabeled_batches` — one endless stream per task of shuffled images from one split,
  labels dropped. Adaptation reads the **validation** split (``split="val"``, the default): the
  test split is for reporting only (DESIGN §6: hyper-parameters and adaptation never see test).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from mergelab.adaptation.loop import Forward
from mergelab.data.tasks import ClassificationTask
from mergelab.evaluation.heads import image_logits, task_head
from mergelab.model.base import Backbone

__all__ = ["classification_forward", "unlabeled_batches"]


def classification_forward(backbone: Backbone, tasks: Sequence[ClassificationTask], modules: Sequence[str],
                           heads: Sequence[Tensor] | None = None) -> Forward:
    """A :class:`~mergelab.adaptation.loop.Forward` over ``tasks`` (in task order) for the ``modules`` being merged."""
    heads = [task_head(backbone, task) for task in tasks] if heads is None else list(heads)
    state = backbone.base_state()
    base = {m: state[m] for m in modules}

    def logits(t: int, images: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return image_logits(backbone, images, heads[t], params)

    def tokens(images: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return backbone.image_tokens(images, params)

    return Forward(base=base, logits=logits, tokens=tokens)


def _stream(images: Tensor, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    while True:
        order = torch.randperm(len(images), generator=generator)
        for i in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            yield images[order[i:i + batch_size]]


def unlabeled_batches(tasks: Sequence[ClassificationTask], batch_size: int = 16, seed: int = 0,
                      split: str = "val") -> list[Iterator[Tensor]]:
    """One endless iterator of shuffled ``(batch_size, 3, S, S)`` image batches per task (labels dropped).

    Each task reshuffles every epoch with its own generator seeded from ``(seed, task index)``, so
    a run is reproducible and independent of how many batches other tasks consumed.
    """
    streams = []
    for t, task in enumerate(tasks):
        images, _ = task.tensors(split)
        streams.append(_stream(images, batch_size, torch.Generator().manual_seed(seed * 1_000_003 + t)))
    return streams
