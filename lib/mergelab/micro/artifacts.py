"""Reading and writing the micro benchmark's model files (base CLIP, tokenizer, adapters, dense checkpoints)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import open_clip
from safetensors.torch import load_file
from torch import Tensor

from mergelab.errors import InputError, read_text
from mergelab.finetuning import write_adapter, write_tensors
from mergelab.model.openclip_backend import MICRO_ARCH, OpenClipBackbone, open_clip_backbone, register_configs
from mergelab.model.tokenizer import ClosedVocabTokenizer

__all__ = ["micro_backbone", "read_backbone", "vision_cfg", "write_adapter", "write_backbone", "write_tensors"]

MODEL_FILE, TOKENIZER_FILE, ARCH_FILE = "model.safetensors", "tokenizer.json", "arch.json"


def text_cfg(tokenizer: ClosedVocabTokenizer) -> dict[str, int]:
    """The micro text tower sized for a closed vocabulary."""
    return {"context_length": tokenizer.context_length, "vocab_size": tokenizer.vocab_size, "width": 64, "heads": 2, "layers": 3}


def vision_cfg(layers: int | None = None) -> dict[str, int] | None:
    """The micro image tower's config with ``layers`` blocks (None: the architecture's own, no override)."""
    if layers is None:
        return None
    register_configs()
    return {**open_clip.get_model_config(MICRO_ARCH)["vision_cfg"], "layers": layers}


def micro_backbone(tokenizer: ClosedVocabTokenizer, seed: int = 0, state: Mapping[str, Tensor] | None = None,
                   vision: Mapping[str, int] | None = None) -> OpenClipBackbone:
    """The ``mergelab-micro`` open_clip CLIP for ``tokenizer`` (random with ``seed``, or with ``state``);
    ``vision``: a whole image-tower config instead of the architecture's (:func:`vision_cfg`)."""
    import logging

    overrides = {"text_cfg": text_cfg(tokenizer), **({"vision_cfg": dict(vision)} if vision else {})}
    logging.getLogger().disabled, was = True, logging.getLogger().disabled  # open_clip warns about "no pretrained weights"
    try:
        backbone = open_clip_backbone(MICRO_ARCH, tokenizer=tokenizer, seed=seed, **overrides)
    finally:
        logging.getLogger().disabled = was
    if state is not None:
        backbone.model.load_state_dict(dict(state))
    return backbone


def write_backbone(directory: Path, state: Mapping[str, Tensor], tokenizer: ClosedVocabTokenizer,
                   vision: Mapping[str, int] | None = None) -> None:
    """``model.safetensors`` (whole CLIP), ``tokenizer.json`` and ``arch.json`` (with ``vision_cfg`` when
    the image tower is not the architecture's own) into ``directory``."""
    write_tensors(directory / MODEL_FILE, state)
    (directory / TOKENIZER_FILE).write_text(json.dumps(tokenizer.to_json(), indent=1))
    arch = {"arch": MICRO_ARCH, "text_cfg": text_cfg(tokenizer), **({"vision_cfg": dict(vision)} if vision else {})}
    (directory / ARCH_FILE).write_text(json.dumps(arch, indent=1))


def read_backbone(directory: Path) -> OpenClipBackbone:
    """The pre-trained micro CLIP written by :func:`write_backbone`."""
    missing = [f for f in (MODEL_FILE, TOKENIZER_FILE) if not (directory / f).is_file()]
    if missing:
        raise InputError(f"{directory} lacks {missing}; rebuild the micro benchmark with `mergelab build-micro`")
    tokenizer = ClosedVocabTokenizer.from_json(_json_object(directory / TOKENIZER_FILE))
    arch = _json_object(directory / ARCH_FILE) if (directory / ARCH_FILE).is_file() else {}
    vision = arch.get("vision_cfg")
    if vision is not None and not isinstance(vision, dict):
        raise InputError(f"{directory / ARCH_FILE}: vision_cfg must be an object; rebuild the micro benchmark with `mergelab build-micro`")
    return micro_backbone(tokenizer, state=load_file(str(directory / MODEL_FILE)), vision=vision)


def _json_object(path: Path) -> dict:
    """The JSON object in ``path`` (a file :func:`write_backbone` wrote); anything else is an InputError."""
    try:
        value = json.loads(read_text(path, "micro model file"))
    except (json.JSONDecodeError, RecursionError) as err:
        raise InputError(f"{path} is not valid JSON ({type(err).__name__}); rebuild the micro benchmark with `mergelab "
                         "build-micro`") from None
    if not isinstance(value, dict):
        raise InputError(f"{path} must hold a JSON object; rebuild the micro benchmark with `mergelab build-micro`")
    return value
