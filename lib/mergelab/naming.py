"""Parameter names -> (layer index, module kind, role), so figures can be drawn per layer and per
q, k, v, out, and AdaRank can tell attention and MLP matrices from the rest.

A :class:`ModuleLayout` describes a model family as data (which parameter belongs to which
numbered block, and which projection it is), as mergekit's architecture files do. Every bench kind
declares its own (:mod:`mergelab.bench.kinds`) and the task sets it loads carry it
(:attr:`mergelab.taskset.TaskSet.layout`); the analyses and AdaRank read it from there.
:data:`GENERIC` is the layout of a task set no bench describes (adapters merged from the command
line): it recognises the block naming of open_clip (``resblocks.N``), HF CLIP / BERT (``layers.N``,
``layer.N``), GPT-2 (``h.N``), LLaMA (``layers.N``) and timm (``blocks.N``), and the projection
names of those models.

| kind | role |
|---|---|
| ``q``, ``k``, ``v``, ``qkv`` (packed), ``out`` | ``attention`` |
| ``mlp_in``, ``mlp_out`` | ``mlp`` |
| ``other`` (embeddings, norms, heads, …) | ``other`` |
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

__all__ = ["GENERIC", "KINDS", "ROLES", "ModuleLayout", "module_coords", "module_kind", "module_layer"]

#: Each module kind's role: what AdaRank masks (attention and MLP matrices) and what figures group.
ROLES = {"q": "attention", "k": "attention", "v": "attention", "qkv": "attention", "out": "attention",
         "mlp_in": "mlp", "mlp_out": "mlp", "other": "other"}
#: The module kinds a layout may name, in the papers' order (001 Figs. 6–9: q, k, v, out).
KINDS = tuple(ROLES)


@dataclass(frozen=True)
class ModuleLayout:
    """Which parameter is which in one model family.

    ``blocks``: a regular expression whose first group is the block index (searched in the
    parameter name); ``kinds``: ``(kind, regular expression)`` pairs tried in order, the first
    that matches naming the parameter's kind (none: ``other``). Kinds are those of :data:`ROLES`.
    """

    blocks: str
    kinds: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        unknown = [k for k, _ in self.kinds if k not in ROLES or k == "other"]
        assert not unknown, f"module kinds {unknown} are not among {KINDS[:-1]}"

    @cached_property
    def _blocks(self) -> re.Pattern[str]:
        return re.compile(self.blocks)

    @cached_property
    def _kinds(self) -> tuple[tuple[str, re.Pattern[str]], ...]:
        return tuple((kind, re.compile(pattern)) for kind, pattern in self.kinds)

    def layer(self, name: str) -> int:
        """The block index of a parameter, or -1 for parameters outside the numbered blocks."""
        match = self._blocks.search(name)
        return int(match.group(1)) if match else -1

    def block(self, name: str) -> str:
        """The layer a parameter belongs to, as 004 Tab. 3 counts layers: the prefix of its numbered
        block (``"visual.transformer.resblocks.3."``), or the parameter itself outside the blocks
        (positional embedding, CLS token, patch convolution, final LayerNorm)."""
        match = self._blocks.search(name)
        return name[: match.end()] if match else name

    def kind(self, name: str) -> str:
        """The parameter's kind: one of :data:`KINDS`."""
        return next((kind for kind, pattern in self._kinds if pattern.search(name)), "other")

    def role(self, name: str) -> str:
        """``attention``, ``mlp`` or ``other`` (:data:`ROLES`)."""
        return ROLES[self.kind(name)]

    def coords(self, names: Sequence[str]) -> dict[str, tuple]:
        """xarray coordinates for a ``module`` dimension: the names plus ``layer`` and ``kind``."""
        names = list(names)
        return {
            "module": ("module", np.array(names, dtype=object)),
            "layer": ("module", np.array([self.layer(n) for n in names], dtype=np.int64)),
            "kind": ("module", np.array([self.kind(n) for n in names], dtype=object)),
        }


#: The layout of a task set no bench describes: the union of the common families' names.
GENERIC = ModuleLayout(
    blocks=r"(?:^|\.)(?:resblocks|layers|layer|h|blocks)\.(\d+)\.",
    kinds=(
        ("q", r"(?:^|\.)(?:q_proj|q|query|to_q)(?:\.|$)"),
        ("k", r"(?:^|\.)(?:k_proj|k|key|to_k)(?:\.|$)"),
        ("v", r"(?:^|\.)(?:v_proj|v|value|to_v)(?:\.|$)"),
        ("qkv", r"(?:in_proj_weight|qkv|c_attn|query_key_value)"),
        ("out", r"(?:^|\.)(?:out_proj|o_proj|attention\.output\.dense|to_out|c_proj(?=\.weight$)(?<=attn\.c_proj))"),
        ("mlp_in", r"(?:c_fc|fc1|up_proj|gate_proj|intermediate\.dense|w1|w3)"),
        ("mlp_out", r"(?:mlp\.c_proj|fc2|down_proj|output\.dense|w2)"),
    ),
)


def module_layer(name: str) -> int:
    """:meth:`ModuleLayout.layer` of :data:`GENERIC`."""
    return GENERIC.layer(name)


def module_kind(name: str) -> str:
    """:meth:`ModuleLayout.kind` of :data:`GENERIC`."""
    return GENERIC.kind(name)


def module_coords(names: Sequence[str], layout: ModuleLayout = GENERIC) -> dict[str, tuple]:
    """:meth:`ModuleLayout.coords` of ``layout``."""
    return layout.coords(names)
