"""Classification metrics: per-task top-1, normalised accuracy, joint-task Hits@k (as the KnOTS code measures them).

* per-task top-1 accuracy with each task's own zero-shot head (001 Tab. 1, KnOTS protocol);
* normalised accuracy ``acc / acc_finetuned`` against the task's own fine-tuned model, measured
  (never a hard-coded table as in the reference code);
* joint-task Hits@k over the de-duplicated union of labels, a micro average
  ``Σ hits / Σ images`` over all tasks' test images (001 Sec. 4 "Joint Task Evaluation", App. C.4);
* normalised performance for heterogeneous tasks (004 Sec. 4.1): ``ρ(merged) / ρ(fine-tuned)`` with
  ``ρ = 1 / metric`` where lower is better.

Every function that runs the model takes ``params`` (replaced encoder weights), so merged models
and adaptation code use them directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mergelab.data.tasks import ClassificationTask, joint_label_space
from mergelab.errors import InputError
from mergelab.evaluation.heads import joint_head, task_head
from mergelab.model.base import Backbone, length_batches

__all__ = ["embed", "evaluate_task", "evaluate_tasks", "hits_at_k", "image_features", "joint_hit_counts", "joint_hits",
           "normalized_accuracy", "normalized_performance", "predict", "top1_accuracy"]


def top1_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of rows whose arg-max equals the label."""
    return float((logits.argmax(dim=-1) == labels).float().mean())


def hits_at_k(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 3, 5)) -> dict[int, int]:
    """Per k, how many rows have their label among the k highest logits (counts, for micro averages)."""
    top = logits.topk(min(max(ks), logits.shape[-1]), dim=-1).indices
    found = top == labels[:, None]
    return {k: int(found[:, :k].any(dim=-1).sum()) for k in ks}


def normalized_accuracy(accuracy: float, finetuned_accuracy: float) -> float:
    """``accuracy / finetuned_accuracy`` (001 Tab. 1 reports it × 100)."""
    if finetuned_accuracy <= 0:
        raise InputError(f"fine-tuned accuracy {finetuned_accuracy} must be positive to normalise by it")
    return accuracy / finetuned_accuracy


def normalized_performance(metric: float, finetuned_metric: float, higher_is_better: bool) -> float:
    """``ρ(merged) / ρ(fine-tuned)`` with ``ρ = metric`` (higher is better) or ``1 / metric`` (004 Sec. 4.1)."""
    if metric <= 0 or finetuned_metric <= 0:
        raise InputError(f"normalised performance needs positive metrics, got {metric} and {finetuned_metric}")
    return metric / finetuned_metric if higher_is_better else finetuned_metric / metric


@torch.no_grad()
def image_features(backbone: Backbone, images: Tensor, params: Mapping[str, Tensor] | None = None,
                   batch_size: int = 500) -> Tensor:
    """``f(x; params)``: unnormalised image embeddings for many images in batches, without gradients, in
    the order given; a token-id backbone's rows (it has a ``pad`` id) run grouped by length over the
    whole pass (:func:`~mergelab.model.base.length_batches`)."""
    pad = getattr(backbone, "pad", None)
    if pad is None:
        return torch.cat([backbone.encode_image(images[i:i + batch_size], params) for i in range(0, len(images), batch_size)])
    batches = length_batches(images, batch_size, pad)
    features = torch.cat([backbone.encode_image(images[rows], params) for rows in batches])
    return features[torch.argsort(torch.cat(batches))]


def embed(backbone: Backbone, images: Tensor, params: Mapping[str, Tensor] | None = None, batch_size: int = 500) -> Tensor:
    """Normalised image embeddings for many images in batches, without gradients: logits against
    any head are ``embed(...) @ head.T`` (one encoder pass serves a task head and the joint head)."""
    return F.normalize(image_features(backbone, images, params, batch_size), dim=-1)


@torch.no_grad()
def predict(backbone: Backbone, images: Tensor, head: Tensor, params: Mapping[str, Tensor] | None = None,
            batch_size: int = 500) -> Tensor:
    """Logits for many images in batches, without gradients."""
    return embed(backbone, images, params, batch_size) @ head.T


def evaluate_task(backbone: Backbone, task: ClassificationTask, params: Mapping[str, Tensor] | None = None,
                  split: str = "test", head: Tensor | None = None) -> float:
    """Top-1 accuracy on one task's split with its zero-shot head (or the given one)."""
    images, labels = task.tensors(split)
    head = task_head(backbone, task) if head is None else head
    return top1_accuracy(predict(backbone, images, head, params), labels)


def evaluate_tasks(backbone: Backbone, tasks: Sequence[ClassificationTask], params: Mapping[str, Tensor] | None = None,
                   split: str = "test") -> dict[str, float]:
    """Per-task top-1 accuracy of one model (base, merged or fine-tuned) on every task."""
    return {task.name: evaluate_task(backbone, task, params, split) for task in tasks}


def joint_hit_counts(backbone: Backbone, tasks: Sequence[ClassificationTask], params: Mapping[str, Tensor] | None = None,
                     split: str = "test", ks: Sequence[int] = (1, 3, 5), features: Mapping[str, Tensor] | None = None,
                     images_of: Sequence[str] | None = None, head: Tensor | None = None) -> dict[str, dict[int, int]]:
    """Per task, how many of its images have their label among the ``k`` highest logits against one
    head over the de-duplicated union of every task's labels (001 Tab. 10's per-task columns).

    Returns ``{task: {0: images, k: hits, …}}`` (key 0: the task's image count, for averages).
    ``features``: the tasks' :func:`embed` of that split under ``params``, when already computed.
    ``images_of``: score only these tasks' images (still against the whole union): a task's own
    fine-tuned model on its own images, the experts' reference for the joint task. ``head``: the
    :func:`joint_head` of ``tasks``, when already built (it depends on the text tower only).

    It takes 8 parameters: the model, the tasks, the weights, the split and the ``ks``, and three ways callers skip work
    (precomputed ``features``, a subset ``images_of``, a given ``head``).
    """
    joint = joint_label_space(tasks)
    head = joint_head(backbone, tasks, joint) if head is None else head
    counts = {}
    for task in (t for t in tasks if images_of is None or t.name in images_of):
        images, labels = task.tensors(split)
        emb = features[task.name] if features is not None else embed(backbone, images, params)
        counts[task.name] = {0: len(labels), **hits_at_k(emb @ head.T, joint.map_labels(task.name, labels), ks)}
    return counts


def joint_hits(backbone: Backbone, tasks: Sequence[ClassificationTask], params: Mapping[str, Tensor] | None = None,
               split: str = "test", ks: Sequence[int] = (1, 3, 5), features: Mapping[str, Tensor] | None = None,
               images_of: Sequence[str] | None = None) -> dict[str, float]:
    """Joint-task Hits@k (001 Tab. 3): ``{"hits@1": …, "hits@3": …, "hits@5": …}``, micro averages
    over every scored image of :func:`joint_hit_counts` (same arguments).

    It takes 7 parameters: those of :func:`joint_hit_counts` but ``head``, passed on unchanged."""
    counts = joint_hit_counts(backbone, tasks, params, split, ks, features, images_of).values()
    total = sum(c[0] for c in counts)
    return {f"hits@{k}": sum(c[k] for c in counts) / total for k in ks}
