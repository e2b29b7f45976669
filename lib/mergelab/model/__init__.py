"""Model backends: named weight matrices, image/text features and a functional forward.

``BACKENDS[name](model, **kwargs) -> Backbone`` is the one registry of backends:

* ``open_clip``: any open_clip architecture (``"ViT-B-32"``, the project's ``"mergelab-micro"``,
  or a built ``open_clip.CLIP``), image tower with split q/k/v/out attention;
* ``hf_clip``: ``transformers.CLIPModel`` (vision tower + projection merged, text tower for heads);
* ``hf_clip_vision``: ``transformers.CLIPVisionModel`` (image features only);
* ``hf_seq_cls``: ``AutoModelForSequenceClassification`` (token ids in place of images).

Every name is imported from its submodule on first use (PEP 562): importing the protocol
(``Backbone``, what a bench session and study validation need) loads neither open_clip nor
transformers; ``BACKENDS`` loads the backends' modules when it is first read.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mergelab.model.attention import SplitAttention, split_attention
    from mergelab.model.base import Backbone, run_functional
    from mergelab.model.hf_backend import hf_clip_backbone, hf_clip_vision_backbone, hf_sequence_backbone
    from mergelab.model.openclip_backend import MICRO_ARCH, OpenClipBackbone, open_clip_backbone
    from mergelab.model.tokenizer import ClosedVocabTokenizer

    BACKENDS: dict[str, Callable[..., Backbone]]

__all__ = ["BACKENDS", "MICRO_ARCH", "Backbone", "ClosedVocabTokenizer", "OpenClipBackbone", "SplitAttention",
           "run_functional", "split_attention"]

#: The submodule defining each public name.
_DEFINED_IN = {"SplitAttention": "attention", "split_attention": "attention", "Backbone": "base", "run_functional": "base",
               "ClosedVocabTokenizer": "tokenizer",
               **dict.fromkeys(("hf_clip_backbone", "hf_clip_vision_backbone", "hf_sequence_backbone"), "hf_backend"),
               **dict.fromkeys(("MICRO_ARCH", "OpenClipBackbone", "open_clip_backbone"), "openclip_backend")}

#: ``BACKENDS``: each backend's name and the function that builds its :class:`Backbone`.
_BACKEND_FUNCTIONS = {"open_clip": "open_clip_backbone", "hf_clip": "hf_clip_backbone", "hf_clip_vision": "hf_clip_vision_backbone",
                      "hf_seq_cls": "hf_sequence_backbone"}


def __getattr__(name: str) -> Any:
    if name == "BACKENDS":  # built once, then a module attribute like any other
        backends = globals()["BACKENDS"] = {backend: __getattr__(fn) for backend, fn in _BACKEND_FUNCTIONS.items()}
        return backends
    if name not in _DEFINED_IN:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_DEFINED_IN[name]}"), name)
