"""Model backends: named weight matrices, image/text features and a functional forward.

``BACKENDS[name](model, **kwargs) -> Backbone`` is the one registry of backends:

* ``open_clip``: any open_clip architecture (``"ViT-B-32"``, the project's ``"mergelab-micro"``,
  or a built ``open_clip.CLIP``), image tower with split q/k/v/out attention;
* ``hf_clip``: ``transformers.CLIPModel`` (vision tower + projection merged, text tower for heads);
* ``hf_clip_vision``: ``transformers.CLIPVisionModel`` (image features only);
* ``hf_seq_cls``: ``AutoModelForSequenceClassification`` (token ids in place of images).
"""

from __future__ import annotations

from collections.abc import Callable

from mergelab.model.attention import SplitAttention, split_attention
from mergelab.model.base import Backbone, run_functional
from mergelab.model.hf_backend import hf_clip_backbone, hf_clip_vision_backbone, hf_sequence_backbone
from mergelab.model.openclip_backend import MICRO_ARCH, OpenClipBackbone, open_clip_backbone
from mergelab.model.tokenizer import ClosedVocabTokenizer

__all__ = ["BACKENDS", "MICRO_ARCH", "Backbone", "ClosedVocabTokenizer", "OpenClipBackbone", "SplitAttention",
           "run_functional", "split_attention"]

BACKENDS: dict[str, Callable[..., Backbone]] = {
    "open_clip": open_clip_backbone,
    "hf_clip": hf_clip_backbone,
    "hf_clip_vision": hf_clip_vision_backbone,
    "hf_seq_cls": hf_sequence_backbone,
}
