"""HF transformers backends: CLIP (``CLIPModel`` / ``CLIPVisionModel``) and sequence classifiers.

CLIP: the merged encoder is the vision tower plus ``visual_projection`` under their ``CLIPModel``
attribute names (``vision_model.*``, ``visual_projection.weight``), so adapters trained on the whole
``CLIPModel`` (e.g. KnOTS' ``q_proj/k_proj/v_proj/out_proj`` LoRAs) load against
``base_state()`` unchanged. A bare ``CLIPVisionModel`` has no text tower: its embeddings are the
pooled vision features and ``encode_text`` raises :class:`InputError`.

Sequence classifiers (``AutoModelForSequenceClassification``, e.g. the LLaMA NLI adapters of 001
Sec. 4) map onto the protocol as follows:

* ``vision`` is the whole classifier (body + head), the module PEFT ``SEQ_CLS`` adapters target;
* the "images" are token-id tensors ``(N, L)`` (padding id = ``config.pad_token_id`` or 0);
* ``encode_image`` returns the pooled final hidden state the classification head reads
  (first token for encoder models with a ``classifier``, last non-padding token for decoder models
  with a ``score`` head), ``image_tokens`` the final hidden states ``(N, L, W)``;
* ``encode_text`` tokenizes with the given tokenizer and returns the same pooled features (label
  descriptions as zero-shot heads); ``logits`` runs the model's own head;
* ``logit_scale`` is 1 and ``image_size`` is the context length.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mergelab.errors import InputError
from mergelab.model.base import attention_linears, by_length, run_functional, vision_state

__all__ = ["HFClipBackbone", "HFClipVision", "HFSequenceBackbone", "hf_clip_backbone", "hf_clip_vision_backbone",
           "hf_sequence_backbone"]

Tokenizer = Callable[[Sequence[str]], Tensor]


class HFClipVision(nn.Module):
    """A ``CLIPModel``'s image encoder: ``vision_model`` + ``visual_projection`` (same names as in the model).

    Its forward returns the vision tower's output with ``pooler_output`` projected, so it reads like a
    bare ``CLIPVisionModel``'s output.
    """

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection

    def forward(self, pixel_values: Tensor):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        out = self.vision_model(pixel_values=pixel_values)
        return BaseModelOutputWithPooling(last_hidden_state=out.last_hidden_state, pooler_output=self.visual_projection(out.pooler_output))


@dataclass(eq=False)
class HFClipBackbone:
    """Backbone over an HF CLIP image encoder, with the ``CLIPModel``'s text tower when there is one."""

    vision: nn.Module  # HFClipVision, or a bare CLIPVisionModel
    clip: nn.Module | None = None
    tokenizer: Tokenizer | None = None
    name: str = "hf_clip"

    def __post_init__(self) -> None:
        self.vision.eval()
        if self.clip is not None:
            self.clip.eval()

    @property
    def logit_scale(self) -> float:
        return float(self.clip.logit_scale.detach().exp()) if self.clip is not None else 1.0

    @property
    def image_size(self) -> int:
        return int(getattr(self.vision, "vision_model", self.vision).config.image_size)

    def base_state(self) -> dict[str, Tensor]:
        return vision_state(self.vision)

    def lora_targets(self) -> list[str]:
        return attention_linears(self.vision)

    def encode_image(self, images: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
        return run_functional(self.vision, params, images).pooler_output

    def image_tokens(self, images: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
        return run_functional(self.vision, params, images).last_hidden_state[:, 1:]  # drop the class token

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        if self.clip is None:
            raise InputError(f"{self.name} has no text tower; build the backbone from a CLIPModel, or use a trainable head")
        if self.tokenizer is None:
            raise InputError(f"{self.name} needs a tokenizer for encode_text; pass tokenizer=... (texts -> (N, L) ids)")
        ids = self.tokenizer(list(texts))
        pooled = self.clip.text_model(input_ids=ids, attention_mask=(ids != 0).long()).pooler_output
        return self.clip.text_projection(pooled)


def hf_clip_backbone(model, *, tokenizer: Tokenizer | None = None) -> HFClipBackbone:
    """From a ``transformers.CLIPModel`` (or a ``CLIPConfig``: random weights)."""
    import transformers

    if isinstance(model, transformers.CLIPConfig):
        model = transformers.CLIPModel(model)
    if not isinstance(model, transformers.CLIPModel):
        raise InputError(f"hf_clip needs a transformers.CLIPModel or CLIPConfig, got {type(model).__name__}; use hf_clip_vision for a "
                         "CLIPVisionModel")
    return HFClipBackbone(HFClipVision(model.vision_model, model.visual_projection), model, tokenizer, name="hf_clip")


def hf_clip_vision_backbone(model) -> HFClipBackbone:
    """From a ``transformers.CLIPVisionModel`` (or a ``CLIPVisionConfig``): image features only."""
    import transformers

    if isinstance(model, transformers.CLIPVisionConfig):
        model = transformers.CLIPVisionModel(model)
    if not isinstance(model, transformers.CLIPVisionModel):
        raise InputError(f"hf_clip_vision needs a transformers.CLIPVisionModel or CLIPVisionConfig, got {type(model).__name__}")
    return HFClipBackbone(model, None, None, name="hf_clip_vision")


def _first_token(hidden: Tensor, ids: Tensor, pad: int) -> Tensor:
    return hidden[:, 0]


def _last_token(hidden: Tensor, ids: Tensor, pad: int) -> Tensor:
    last = ((ids != pad).long().cumsum(-1).argmax(-1))  # index of the last non-padding token
    return hidden[torch.arange(hidden.shape[0]), last]


#: Where a sequence classifier's head reads its input, keyed by the head's attribute name.
POOLERS: dict[str, Callable[[Tensor, Tensor, int], Tensor]] = {"classifier": _first_token, "score": _last_token}


@dataclass(eq=False)
class HFSequenceBackbone:
    """Backbone over an ``AutoModelForSequenceClassification`` model (see the module docstring)."""

    vision: nn.Module
    tokenizer: Tokenizer | None = None
    name: str = "hf_seq_cls"
    #: heads are the tasks' own trained ``score`` weights, scored on the raw pooled features
    #: (:func:`mergelab.evaluation.heads.head_logits`); off: zero-shot heads from label texts
    linear_heads: bool = False

    def __post_init__(self) -> None:
        self.vision.eval()
        heads = [h for h in POOLERS if isinstance(getattr(self.vision, h, None), nn.Module)]
        if not heads:
            raise InputError(f"{type(self.vision).__name__} has none of the heads {sorted(POOLERS)}; pass an "
                             "AutoModelForSequenceClassification model")
        self.pool = POOLERS[heads[0]]
        self.pad = int(getattr(self.vision.config, "pad_token_id", None) or 0)

    logit_scale: float = 1.0

    @property
    def image_size(self) -> int:
        return int(self.vision.config.max_position_embeddings)

    def base_state(self) -> dict[str, Tensor]:
        return vision_state(self.vision)

    def lora_targets(self) -> list[str]:
        return attention_linears(self.vision)

    def _hidden(self, ids: Tensor, params: Mapping[str, Tensor] | None) -> tuple[Tensor, Tensor]:
        out = run_functional(self.vision, params, input_ids=ids, attention_mask=(ids != self.pad).long(), output_hidden_states=True)
        return out.hidden_states[-1], out.logits

    def encode_image(self, images: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
        return by_length(lambda ids: self.pool(self._hidden(ids, params)[0], ids, self.pad), images, self.pad)

    def image_tokens(self, images: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
        return self._hidden(images, params)[0]

    def logits(self, images: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """The classifier's own logits ``(N, num_labels)``."""
        return by_length(lambda ids: self._hidden(ids, params)[1], images, self.pad)

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        if self.tokenizer is None:
            raise InputError(f"{self.name} needs a tokenizer for encode_text; pass tokenizer=... (texts -> (N, L) ids)")
        ids = self.tokenizer(list(texts))
        return self.encode_image(ids)


def hf_sequence_backbone(model, *, tokenizer: Tokenizer | None = None, linear_heads: bool = False) -> HFSequenceBackbone:
    """From an ``AutoModelForSequenceClassification`` model or its config (random weights);
    ``linear_heads``: the tasks bring trained heads (the ``hf_seq_cls`` bench)."""
    import transformers

    if isinstance(model, transformers.PretrainedConfig):
        model = transformers.AutoModelForSequenceClassification.from_config(model)
    if not isinstance(model, nn.Module):
        raise InputError(f"hf_seq_cls needs a sequence-classification model or config, got {type(model).__name__}")
    return HFSequenceBackbone(model, tokenizer, linear_heads=linear_heads)
