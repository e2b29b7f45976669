"""Training loops of the micro build: contrastive pre-training, PEFT LoRA fine-tuning, dense fine-tuning.

* Pre-training: CLIP's symmetric contrastive loss (Radford et al., 2021) on image–caption pairs;
  identical captions in a batch are treated as positives of each other (multi-positive targets),
  since class-level captions repeat.
* LoRA: PEFT adapters on q, k, v, out of every vision block with the frozen zero-shot head as the
  classifier; AdamW, cosine schedule (001 App. C.2: r 16, alpha 16, dropout 0.1, lr 3e-4,
  weight decay 1e-4; the micro build scales the learning rate to its width, see
  :meth:`mergelab.micro.config.BuildConfig.lora`). With ``consistency > 0`` the task's
  cross-entropy is joined by a feature-consistency term on images *outside* the task
  (:func:`consistency_loss`), which keeps the update local to the task's inputs.
* Dense: the whole encoder and a linear decoder fine-tuned end to end per task (004 Sec. 4.1), with
  per-task lengths and learning rates (the source of 004 Fig. 5's norm imbalance).

Every loop is deterministic given its ``seed`` (batches from a ``torch.Generator``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mergelab.data.tasks import ClassificationTask, DenseTask, to_tensor
from mergelab.evaluation.dense import KINDS, decode, dense_features, make_decoder
from mergelab.finetuning import LoraConfig, cosine_schedule, train_lora
from mergelab.model.openclip_backend import OpenClipBackbone

__all__ = ["DenseConfig", "LoraConfig", "PretrainConfig", "consistency_loss", "contrastive_pretrain", "finetune_dense", "finetune_lora"]

Tick = Callable[[], None]


def _noop() -> None:
    return None


def _shift(images: Tensor, generator: torch.Generator, pad: int = 2) -> Tensor:
    """Random translation by up to ``pad`` pixels (one offset per batch; edge padding)."""
    if pad == 0:
        return images
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    return padded[..., dy:dy + images.shape[-2], dx:dx + images.shape[-1]]


# Contrastive pre-training ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainConfig:
    """Contrastive pre-training of the micro CLIP (sizes tuned to the 2-core budget, ENVIRONMENT.md)."""

    steps: int = 1200
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 50
    seen_fraction: float = 0.6
    name_prob: float = 0.8
    seed: int = 0


def multi_positive_clip_loss(image_emb: Tensor, text_emb: Tensor, caption_ids: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric CLIP loss over unique captions: image -> its caption, caption -> all its images.

    ``text_emb`` holds one row per unique caption, ``caption_ids`` (N,) indexes it per image.
    """
    logits = logit_scale * F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T  # (N, U)
    image_loss = F.cross_entropy(logits, caption_ids)
    positives = F.one_hot(caption_ids, text_emb.shape[0]).T.float()  # (U, N)
    text_loss = -(positives / positives.sum(1, keepdim=True) * logits.T.log_softmax(dim=-1)).sum(1).mean()
    return (image_loss + text_loss) / 2


def contrastive_pretrain(backbone: OpenClipBackbone, images: np.ndarray, captions: Sequence[str], config: PretrainConfig,
                         tick: Tick = _noop) -> dict[str, Tensor]:
    """Train the whole CLIP (both towers, logit scale) on image–caption pairs; returns its state dict."""
    model = backbone.model.train()
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    unique = sorted(set(captions))
    tokens = backbone.tokenizer(unique)
    index = {c: i for i, c in enumerate(unique)}
    caption_index = torch.tensor([index[c] for c in captions])
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=config.lr)
    sched = cosine_schedule(opt, config.steps, config.warmup)
    for _ in range(config.steps):
        batch = torch.randint(0, len(captions), (config.batch_size,), generator=generator)
        ids, inverse = torch.unique(caption_index[batch], return_inverse=True)
        x = _shift(to_tensor(images[batch.numpy()]), generator)
        loss = multi_positive_clip_loss(model.encode_image(x), model.encode_text(tokens[ids]), inverse, model.logit_scale.exp())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        tick()
    model.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# LoRA fine-tuning ---------------------------------------------------------------------------------


def consistency_loss(tuned: Tensor, reference: Tensor) -> Tensor:
    """``mean_n ‖normalize(f_θ(x_n)) − normalize(f_0(x_n))‖²``: how far the adapted encoder moves the
    normalised embeddings of images ``x_n`` from the pre-trained encoder's.

    On images outside the task it penalises what the update does off its own inputs: a large
    pre-trained model fine-tuned on one task barely changes its features of other domains, a
    96-wide one does not (its task vectors damage every other task, so task arithmetic falls below
    zero-shot). The micro build adds it to emulate that locality (data/micro/README.md).
    """
    return (F.normalize(tuned, dim=-1) - F.normalize(reference, dim=-1)).pow(2).sum(-1).mean()


def finetune_lora(backbone: OpenClipBackbone, task: ClassificationTask, head: Tensor, config: LoraConfig,
                  tick: Tick = _noop, outside: np.ndarray | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Fine-tune a PEFT LoRA adapter of the image tower with the frozen zero-shot ``head``
    (:func:`~mergelab.finetuning.train_lora`, images randomly shifted); returns (adapter tensors,
    adapter config). ``outside``: uint8 images not of this task (the other tasks' pre-training
    images), one batch of which enters :func:`consistency_loss` per step when ``config.consistency > 0``."""
    if config.consistency > 0 and outside is None:
        raise ValueError("consistency > 0 needs the images outside the task (outside=)")
    images, labels = task.tensors("train")

    def consistency(model: torch.nn.Module, generator: torch.Generator) -> Tensor:
        others = to_tensor(outside[torch.randint(0, len(outside), (config.batch_size,), generator=generator).numpy()])
        with torch.no_grad(), model.disable_adapter():
            reference = model(others)
        return config.consistency * consistency_loss(model(others), reference)

    return train_lora(backbone.vision, backbone.lora_targets(), images, labels, head, config,
                      lambda model, x, generator: model(_shift(x, generator)), tick,
                      consistency if config.consistency > 0 else None)


# Dense fine-tuning --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DenseConfig:
    """Full fine-tuning of the encoder with a linear decoder for one dense task."""

    steps: int
    lr: float
    batch_size: int = 64
    weight_decay: float = 0.0
    seed: int = 0


def finetune_dense(backbone: OpenClipBackbone, task: DenseTask, config: DenseConfig,
                   tick: Tick = _noop) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Fine-tune the whole encoder and a fresh decoder end to end; returns (encoder state, decoder state)."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    params = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in backbone.base_state().items()}
    decoder = make_decoder(backbone, task, config.seed)
    trainable = [p for p in params.values() if p.requires_grad] + list(decoder.parameters())
    opt = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    sched = cosine_schedule(opt, config.steps)
    images, targets = task.tensors("train")
    loss_fn = KINDS[task.kind].loss
    for _ in range(config.steps):
        batch = torch.randint(0, len(images), (config.batch_size,), generator=generator)
        loss = loss_fn(decode(decoder, dense_features(backbone, images[batch], task, params), task), targets[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        tick()
    return {k: v.detach().clone() for k, v in params.items()}, {k: v.detach().clone() for k, v in decoder.state_dict().items()}
