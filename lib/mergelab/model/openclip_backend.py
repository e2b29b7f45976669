"""open_clip backend: any open_clip architecture, with split q/k/v/out attention in the image tower.

``ViT-B-32`` (and every other built-in config) constructs with random weights offline; the
project's own tiny architecture is registered as ``mergelab-micro`` (``configs/``). The image
tower's ``nn.MultiheadAttention`` modules are replaced by the exactly equivalent
:class:`~mergelab.model.attention.SplitAttention`, so PEFT adapters sit on separate
``q_proj``/``k_proj``/``v_proj``/``out_proj`` like the papers' HF CLIP setup (001 App. C.2).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
from torch import Tensor, nn

from mergelab.errors import InputError
from mergelab.model.attention import split_attention
from mergelab.model.base import attention_linears, capture_output, run_functional, vision_state

__all__ = ["MICRO_ARCH", "OpenClipBackbone", "open_clip_backbone", "register_configs"]

MICRO_ARCH = "mergelab-micro"
_CONFIGS = Path(__file__).parent / "configs"


def register_configs() -> None:
    """Register the project's open_clip architecture configs (``configs/*.json``) once."""
    if MICRO_ARCH not in open_clip.list_models():
        open_clip.add_model_config(_CONFIGS)


@dataclass(eq=False)
class OpenClipBackbone:
    """A :class:`~mergelab.model.base.Backbone` over an ``open_clip.CLIP`` (image tower split)."""

    model: nn.Module
    tokenizer: Callable[[Sequence[str]], Tensor]
    name: str = "open_clip"
    text_batch: int = field(default=256, repr=False)

    def __post_init__(self) -> None:
        split_attention(self.model.visual)
        self.model.eval()

    @property
    def vision(self) -> nn.Module:
        return self.model.visual

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def base_state(self) -> dict[str, Tensor]:
        return vision_state(self.vision)

    def lora_targets(self) -> list[str]:
        return attention_linears(self.vision)

    def encode_image(self, images: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
        return run_functional(self.vision, params, images)

    def image_tokens(self, images: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
        with capture_output(self.vision.transformer) as seen:
            run_functional(self.vision, params, images)
        return seen[-1][:, 1:]  # drop the class token: (N, L, W)

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        texts = list(texts)
        chunks = [self.model.encode_text(self.tokenizer(texts[i:i + self.text_batch]))
                  for i in range(0, len(texts), self.text_batch)]
        return torch.cat(chunks)


def open_clip_backbone(model: str | nn.Module = MICRO_ARCH, *, tokenizer: Callable[[Sequence[str]], Tensor] | None = None,
                       seed: int = 0, **model_kwargs) -> OpenClipBackbone:
    """An open_clip backbone from an architecture name (random weights, seeded) or a built model.

    ``model_kwargs`` override the architecture config (e.g. ``text_cfg`` with a small
    ``vocab_size`` for a closed-vocabulary tokenizer). Without ``tokenizer`` the architecture's
    own open_clip tokenizer is used (its vocabulary ships with the package).
    """
    register_configs()
    name = model if isinstance(model, str) else type(model).__name__
    if isinstance(model, str):
        if model not in open_clip.list_models():
            raise InputError(f"unknown open_clip architecture {model!r}; choose one of open_clip.list_models(), e.g. 'ViT-B-32' or "
                             f"{MICRO_ARCH!r}")
        torch.manual_seed(seed)
        model = open_clip.create_model(model, pretrained=None, **model_kwargs)
    if tokenizer is None:
        if name == MICRO_ARCH:
            raise InputError(f"{MICRO_ARCH!r} has a closed-vocabulary text tower; pass its tokenizer (mergelab.micro.benchmark.load_micro "
                             "builds it)")
        tokenizer = open_clip.get_tokenizer(name if name in open_clip.list_models() else "ViT-B-32")
    return OpenClipBackbone(model, tokenizer, name=name)
