"""Zero-shot CLIP heads from class names × prompt templates (as KnOTS' ``generate_clip_heads``).

For each class, the text embeddings of its prompts are normalised, averaged over templates and
renormalised; the head is that matrix times the backbone's logit scale. Logits of an image are
``normalize(encode_image(x, params)) @ head.T``, so a merged model is evaluated by passing its
replaced encoder weights as ``params`` (e.g. ``MergedUpdate.apply(backbone.base_state())``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mergelab.data.tasks import ClassificationTask, JointLabels
from mergelab.model.base import Backbone

__all__ = ["head_logits", "image_logits", "joint_head", "task_head", "zero_shot_head"]


@torch.no_grad()
def zero_shot_head(backbone: Backbone, classnames: Sequence[str], templates: Sequence[str]) -> Tensor:
    """``(C, D)`` head: per class, mean of normalised prompt embeddings, renormalised, × logit scale."""
    texts = [t.format(c) for c in classnames for t in templates]
    emb = F.normalize(backbone.encode_text(texts).float(), dim=-1)
    emb = emb.view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1) * backbone.logit_scale


def task_head(backbone: Backbone, task: ClassificationTask) -> Tensor:
    """The zero-shot head of one task (its class names and templates)."""
    return zero_shot_head(backbone, task.classnames, task.templates)


@torch.no_grad()
def joint_head(backbone: Backbone, tasks: Sequence[ClassificationTask], joint: JointLabels) -> Tensor:
    """``(C_joint, D)`` head over the de-duplicated union; a shared class uses its first task's templates."""
    owner: dict[str, ClassificationTask] = {}
    for task in tasks:
        for name in task.classnames:
            owner.setdefault(name, task)
    rows = [zero_shot_head(backbone, [name], owner[name].templates) for name in joint.classnames]
    return torch.cat(rows)


def head_logits(backbone: Backbone, features: Tensor, head: Tensor) -> Tensor:
    """``(N, C)`` logits of unnormalised features ``(N, D)`` against a ``(C, D)`` head.

    A zero-shot head scores the normalised features (CLIP). A backbone with ``linear_heads`` (a
    sequence classifier whose tasks bring their own trained ``score`` heads, ``hf_seq_cls``) is
    scored as its model scores them: ``features @ head.T``, the classifier's own logits.
    """
    return (features if getattr(backbone, "linear_heads", False) else F.normalize(features, dim=-1)) @ head.T


def image_logits(backbone: Backbone, images: Tensor, head: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
    """``(N, C)`` logits of the images against a head (:func:`head_logits`; differentiable in ``params``)."""
    return head_logits(backbone, backbone.encode_image(images, params), head)
