"""Heterogeneous dense tasks: trainable decoders on a (merged) encoder, metrics, refitting (004 Sec. 4.1).

Each task kind fixes what the decoder reads (final-block patch tokens or the pooled embedding),
its loss, its metric and the metric's direction. After merging, the encoder is frozen and a fresh
decoder is fitted on its features ("ablation protocol" of 004 Sec. 4.1, linear heads); performance
is then normalised by the same protocol run on the task's own fine-tuned encoder
(:func:`mergelab.evaluation.metrics.normalized_performance`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergelab.data.tasks import DenseTask
from mergelab.model.base import Backbone

__all__ = ["KINDS", "DenseKind", "decode", "dense_features", "dense_metric", "fit_decoder", "make_decoder", "refit_score"]


def _miou(pred: Tensor, y: Tensor) -> float:
    """Mean intersection-over-union over the classes present in prediction or target."""
    labels = pred.argmax(-1)
    ious = []
    for c in range(pred.shape[-1]):
        union = ((labels == c) | (y == c)).sum()
        if union > 0:
            ious.append(float(((labels == c) & (y == c)).sum() / union))
    return sum(ious) / len(ious)


def _rmse(pred: Tensor, y: Tensor) -> float:
    return float(((pred - y) ** 2).mean().sqrt())


def _l2_error(pred: Tensor, y: Tensor) -> float:
    return float((pred - y).norm(dim=-1).mean())


def _accuracy(pred: Tensor, y: Tensor) -> float:
    return float((pred.argmax(-1) == y).float().mean())


def _ce(pred: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), y.reshape(-1))


@dataclass(frozen=True)
class DenseKind:
    """What a task kind's decoder reads, how it is trained and scored."""

    features: str  # "tokens" (N, L, W) or "pooled" (N, D)
    loss: Callable[[Tensor, Tensor], Tensor]
    metric: Callable[[Tensor, Tensor], float]
    metric_name: str
    higher_is_better: bool
    squeeze: bool = False  # one output per token: drop the last dim


KINDS: dict[str, DenseKind] = {
    "segmentation": DenseKind("tokens", _ce, _miou, "mIoU", True),
    "depth": DenseKind("tokens", F.mse_loss, _rmse, "RMSE", False, squeeze=True),
    "keypoint": DenseKind("pooled", F.mse_loss, _l2_error, "mean L2 error", False),
    "classification": DenseKind("pooled", _ce, _accuracy, "accuracy", True),
}


def dense_features(backbone: Backbone, images: Tensor, task: DenseTask, params: Mapping[str, Tensor] | None = None) -> Tensor:
    """The encoder features a task's decoder reads (differentiable in ``params``)."""
    if KINDS[task.kind].features == "tokens":
        return backbone.image_tokens(images, params)
    return backbone.encode_image(images, params)


def make_decoder(backbone: Backbone, task: DenseTask, seed: int = 0) -> nn.Module:
    """A linear decoder (004's "ablation protocol" uses linear heads) sized for the task's features."""
    probe = dense_features(backbone, torch.zeros(1, 3, backbone.image_size, backbone.image_size), task)
    torch.manual_seed(seed)
    return nn.Sequential(nn.LayerNorm(probe.shape[-1]), nn.Linear(probe.shape[-1], task.num_outputs))


def decode(decoder: nn.Module, features: Tensor, task: DenseTask) -> Tensor:
    out = decoder(features)
    return out.squeeze(-1) if KINDS[task.kind].squeeze else out


def dense_metric(decoder: nn.Module, features: Tensor, targets: Tensor, task: DenseTask) -> float:
    with torch.no_grad():
        return KINDS[task.kind].metric(decode(decoder, features, task), targets)


@torch.no_grad()
def _features(backbone: Backbone, task: DenseTask, split: str, params: Mapping[str, Tensor] | None) -> tuple[Tensor, Tensor]:
    images, targets = task.tensors(split)
    feats = torch.cat([dense_features(backbone, images[i:i + 500], task, params) for i in range(0, len(images), 500)])
    return feats, targets


def fit_decoder(backbone: Backbone, task: DenseTask, features: Tensor, targets: Tensor, *, steps: int = 300,
                lr: float = 1e-2, seed: int = 0) -> nn.Module:
    """Fit a fresh decoder on frozen features with full-batch Adam (deterministic given ``seed``).

    It takes 7 parameters: the backbone, the task and its features and targets, and the fit's three settings (steps,
    learning rate, seed), which :func:`refit_score` passes on."""
    decoder = make_decoder(backbone, task, seed)
    opt = torch.optim.Adam(decoder.parameters(), lr=lr)
    loss_fn = KINDS[task.kind].loss
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(decode(decoder, features, task), targets).backward()
        opt.step()
    return decoder.eval()


def refit_score(backbone: Backbone, task: DenseTask, params: Mapping[str, Tensor] | None = None, *, split: str = "test",
                steps: int = 300, lr: float = 1e-2, seed: int = 0) -> float:
    """Freeze the (merged) encoder, fit the task's decoder on its train features, score ``split``.

    It takes 7 parameters: the backbone, the task, the encoder's weights and the split scored, and the three settings of
    the decoder fit passed on to :func:`fit_decoder`."""
    train_x, train_y = _features(backbone, task, "train", params)
    decoder = fit_decoder(backbone, task, train_x, train_y, steps=steps, lr=lr, seed=seed)
    test_x, test_y = _features(backbone, task, split, params)
    return dense_metric(decoder, test_x, test_y, task)
