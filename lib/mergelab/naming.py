"""Parameter names -> (layer index, module kind), so figures can be drawn per layer and per q, k, v, out.

Recognises the block naming of open_clip (``resblocks.N``), HF CLIP / BERT (``layers.N``,
``layer.N``), GPT-2 (``h.N``), LLaMA (``layers.N``) and timm (``blocks.N``), and the projection
names used by those models.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

__all__ = ["module_block", "module_coords", "module_kind", "module_layer"]

_LAYER = re.compile(r"(?:^|\.)(?:resblocks|layers|layer|h|blocks)\.(\d+)\.")
_KINDS = (
    ("q", re.compile(r"(?:^|\.)(?:q_proj|q|query|to_q)(?:\.|$)")),
    ("k", re.compile(r"(?:^|\.)(?:k_proj|k|key|to_k)(?:\.|$)")),
    ("v", re.compile(r"(?:^|\.)(?:v_proj|v|value|to_v)(?:\.|$)")),
    ("qkv", re.compile(r"(?:in_proj_weight|qkv|c_attn|query_key_value)")),
    ("out", re.compile(r"(?:^|\.)(?:out_proj|o_proj|attention\.output\.dense|to_out|c_proj(?=\.weight$)(?<=attn\.c_proj))")),
    ("mlp_in", re.compile(r"(?:c_fc|fc1|up_proj|gate_proj|intermediate\.dense|w1|w3)")),
    ("mlp_out", re.compile(r"(?:mlp\.c_proj|fc2|down_proj|output\.dense|w2)")),
)


def module_layer(name: str) -> int:
    """The block index of a parameter, or -1 for parameters outside the numbered blocks."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else -1


def module_block(name: str) -> str:
    """The layer a parameter belongs to, as 004 Tab. 3 counts layers: the prefix of its numbered
    block (``"visual.transformer.resblocks.3."``), or the parameter itself outside the blocks
    (positional embedding, CLS token, patch convolution, final LayerNorm)."""
    match = _LAYER.search(name)
    return name[: match.end()] if match else name


def module_kind(name: str) -> str:
    """``q``, ``k``, ``v``, ``qkv`` (packed), ``out``, ``mlp_in``, ``mlp_out`` or ``other``."""
    for kind, pattern in _KINDS:
        if pattern.search(name):
            return kind
    return "other"


def module_coords(names: Sequence[str]) -> dict[str, tuple]:
    """xarray coordinates for a ``module`` dimension: the names plus ``layer`` and ``kind``."""
    names = list(names)
    return {
        "module": ("module", np.array(names, dtype=object)),
        "layer": ("module", np.array([module_layer(n) for n in names], dtype=np.int64)),
        "kind": ("module", np.array([module_kind(n) for n in names], dtype=object)),
    }
