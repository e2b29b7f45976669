"""LoRA modules and the base parameters they update: PEFT's module names mapped onto the base's (the tower
prefix, packed in-projections, ``modules_to_save`` copies), each module's rank and scaling as the config
declares them, and the orientation (``nn.Linear`` or ``Conv1D``) PEFT applies it in. Metadata only: ``mergelab
check`` uses these without loading torch.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergelab.checkpoints.adapter_configs import check_scaling
from mergelab.checkpoints.files import LORA_KEY, PEFT_PREFIX
from mergelab.errors import InputError

if TYPE_CHECKING:
    from torch import Tensor

    from mergelab.taskset import Update

__all__ = ["PACKED_QKV", "TOWER_PREFIXES", "check_declared_rank", "conv1d_oriented", "declared_rank", "guess_param", "lora_targets",
           "mha_out_proj_factor", "module_scaling", "packed_views", "resolve_prefix", "saved_names", "target_param", "target_views", "uses_conv1d"]


def _pattern_value(patterns: Mapping[str, Any], key: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first pattern matching a suffix of ``key``."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def module_scaling(config: Mapping[str, Any], peft_key: str, rank: int, where: str) -> tuple[float, float]:
    """(alpha, scaling) of one LoRA module: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA
    (bounded by :func:`~mergelab.checkpoints.adapter_configs.check_scaling`)."""
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, peft_key, config["lora_alpha"]))
    return alpha, check_scaling(alpha, rank, bool(config.get("use_rslora")), where)


def declared_rank(config: Mapping[str, Any], peft_key: str) -> int:
    """The rank the adapter config gives one module (``rank_pattern``, else ``r``): what PEFT builds
    the module with, so a ``lora_A`` of another rank makes PEFT refuse the adapter on load."""
    return int(_pattern_value(config.get("rank_pattern") or {}, peft_key, config["r"]))


def lora_targets(peft_modules: Iterable[str]) -> list[str]:
    """The modules PEFT wrapped to hold these LoRA factors (an MHA's ``attn.base_layer.out_proj`` belongs to ``attn``):
    the names its ``target_modules`` matched."""
    return sorted({m.split(".base_layer", 1)[0] for m in peft_modules})


def check_declared_rank(config: Mapping[str, Any], peft_key: str, rank: int, where: str) -> None:
    """Raise :class:`InputError` when the tensors' ``rank`` is not the config's :func:`declared_rank`."""
    declared = declared_rank(config, peft_key)
    if rank != declared:
        source = "its rank_pattern" if declared != config["r"] else "r"
        raise InputError(f"{where}: the tensors have rank {rank}, the adapter config declares {declared} ({source}), so PEFT "
                         "would refuse to load it; fix r / rank_pattern in adapter_config.json to match the weights")


def conv1d_oriented(param: str, lora_shape: tuple[int, int], base: Mapping[str, Tensor], uses_conv1d: bool) -> bool:
    """Whether the base holds ``param`` as transformers' ``Conv1D`` does, ``(in, out)``, so that the
    update is ``(B A)ᵀ`` (PEFT's ``fan_in_fan_out``), rather than as ``nn.Linear``'s ``(out, in)``.

    PEFT decides from the module's class and resets a config's ``fan_in_fan_out`` that disagrees
    (with a warning). A state dict shows the class in the shapes: a non-square weight by its own
    orientation (``lora_shape`` is ``(out, in)``), a square one by the model (``uses_conv1d``:
    :func:`uses_conv1d`). A packed projection the base holds split (q/k/v) is a Linear.
    """
    weight = base.get(param)
    if weight is None or weight.ndim != 2:
        return False
    out, in_ = lora_shape
    return tuple(weight.shape) == (in_, out) if out != in_ else uses_conv1d


def uses_conv1d(base: Mapping[str, Tensor]) -> bool:
    """Whether a state dict holds ``Conv1D`` weights: a non-square weight whose bias runs along its
    second axis (a Conv1D always has a bias; an ``nn.Linear``'s runs along the first)."""
    for key, weight in base.items():
        bias = base.get(key.removesuffix("weight") + "bias") if key.endswith(".weight") else None
        if bias is not None and weight.ndim == 2 and weight.shape[0] != weight.shape[1] and tuple(bias.shape) == (weight.shape[1],):
            return True
    return False


@functools.cache
def mha_out_proj_factor() -> float:
    """How many times the installed PEFT applies an ``nn.MultiheadAttention`` out_proj LoRA delta.

    PEFT 0.21 merges the out_proj delta twice, in ``merge()`` and therefore in every forward
    pass too (huggingface/peft PR #3774). The model a user trained and evaluated is the one
    PEFT runs, so mergelab loads the effective update (factor x delta) and divides the factor
    out again when it writes an adapter. Measured on a 4-dim MHA, not assumed from a version.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    torch.manual_seed(0)
    holder = nn.Sequential()
    holder.add_module("attn", nn.MultiheadAttention(4, 1))
    base = holder.attn.out_proj.weight.detach().clone()
    peft_model = get_peft_model(holder, LoraConfig(r=1, lora_alpha=1, target_modules=["attn"]))
    out_proj = peft_model.base_model.model.attn.base_layer.out_proj
    nn.init.ones_(out_proj.lora_B["default"].weight)
    delta = (out_proj.lora_B["default"].weight @ out_proj.lora_A["default"].weight).detach()
    merged = peft_model.merge_and_unload().attn.out_proj.weight.detach()
    return round(float(((merged - base) * delta).sum() / (delta * delta).sum()), 6)


def target_param(peft_module: str, base: Mapping[str, Any]) -> str | None:
    """The base parameter a PEFT LoRA module updates (``attn`` on an MHA -> ``attn.in_proj_weight``).

    A base whose attention was split (:func:`mergelab.model.split_attention`) holds the packed
    projection as ``attn.{q,k,v}_proj.weight``; the packed name is then returned too, and
    :func:`target_views` names the three projections the update lands on.
    """
    module = peft_module.replace(".base_layer", "")
    for candidate in (f"{module}.weight", f"{module}.in_proj_weight"):
        if candidate in base:
            return candidate
    if all(f"{module}.{kind}_proj.weight" in base for kind in "qkv"):
        return f"{module}.in_proj_weight"
    return None


def target_views(param: str, base: Mapping[str, Any] | None) -> list[str]:
    """The base parameters an update of ``param`` lands on: itself, or, for a packed in-projection
    on a base with split q/k/v, ``….{q,k,v}_proj.weight`` (split by
    :func:`packed_views`: ``ΔW_q = B[:d] A``, ``ΔW_k = B[d:2d] A``,
    ``ΔW_v = B[2d:] A``, exactly PEFT's packed ``ΔW = B A`` row by row)."""
    if base is None or param in base:
        return [param]
    parent = param.removesuffix(".in_proj_weight")
    return [f"{parent}.{kind}_proj.weight" for kind in "qkv"]


#: The sub-module of a whole checkpoint that an adapter trained on one tower sits under, by the
#: class PEFT records in ``auto_mapping.base_model_class``: open_clip's towers are ``model.visual``
#: (its text tower sits at the root under the same block names, so the names alone are ambiguous)
#: and, in a CustomTextCLIP, ``model.text``; a transformers ``CLIPModel``'s are ``vision_model`` and
#: ``text_model`` (both ``encoder.layers.N.self_attn.{q,k,v,out}_proj``: ViT-B/32 has 12 of each).
TOWER_PREFIXES: dict[str, str] = {"VisionTransformer": "visual.", "ModifiedResNet": "visual.", "TextTransformer": "text.",
                                  "CLIPVisionModel": "vision_model.", "CLIPVisionModelWithProjection": "vision_model.",
                                  "CLIPTextModel": "text_model.", "CLIPTextModelWithProjection": "text_model."}


def _module_prefix(base_module: str) -> str:
    """``--base-module visual`` as a parameter-name prefix (``visual.``; ``.`` or ``""``: the root)."""
    return "" if base_module.strip(".") == "" else base_module.strip(".") + "."


def resolve_prefix(names: Sequence[str], base: Mapping[str, Any], where: Path, *,
                    base_module: str | None = None, tower: str | None = None) -> str:
    """The prefix under which the base holds the adapter's modules ('' or e.g. 'visual.').

    Adapters trained on a sub-module (open_clip's ``model.visual``) name parameters relative to
    it; the base may be the whole model. The prefix must cover every module; ``base_module``
    names it, otherwise it must be unique, or be the one the adapter's recorded ``tower`` class
    sits under (:data:`TOWER_PREFIXES`).
    """
    probe = names[0].replace(".base_layer", "") + "."
    prefixes = {k[: k.index(probe)] for k in base if probe in k and (k.startswith(probe) or f".{probe}" in k)}
    covering = sorted(p for p in prefixes if (p == "" or p.endswith(".")) and all(target_param(p + n, base) for n in names))
    if base_module is not None:
        if _module_prefix(base_module) in covering:
            return _module_prefix(base_module)
        found = f"; it does under {', '.join(repr(p.rstrip('.') or '.') for p in covering)}" if covering else ""
        raise InputError(f"--base-module {base_module!r}: the base holds no module of adapter {where} there{found}")
    if len(covering) == 1:
        return covering[0]
    missing = [n for n in names if target_param(n, base) is None]
    if not covering:
        raise InputError(
            f"adapter {where} targets {len(names)} modules, the base lacks {len(missing)} of them "
            f"(e.g. {missing[0]!r}); pass the base model the adapter was trained on, or restrict with modules=[...]"
        )
    if TOWER_PREFIXES.get(tower or "") in covering:
        return TOWER_PREFIXES[tower or ""]
    candidates = ", ".join(repr(p.rstrip(".") or ".") for p in covering)
    raise InputError(f"adapter {where} matches the base in several sub-modules ({candidates}); "
                     f"name the one it was trained on with --base-module (e.g. --base-module {covering[-1].rstrip('.') or '.'})")


def saved_names(keys: Iterable[str], config: Mapping[str, Any]) -> set[str]:
    """Which of an adapter file's tensor keys are ``modules_to_save`` copies (PEFT stores whole
    parameters, e.g. a sequence classifier's ``score.weight``), by name relative to the adapted model."""
    wanted = config.get("modules_to_save") or ()
    names = set()
    for key in keys:
        short = key.removeprefix(PEFT_PREFIX)
        module = short.rsplit(".", 1)[0]
        if LORA_KEY.match(short) is None and any(module == m or module.endswith(f".{m}") for m in wanted):
            names.add(short)
    return names


def guess_param(peft_module: str, peft_modules: Sequence[str]) -> str:
    """Without a base model: the parameter name a PEFT module most likely updates."""
    if f"{peft_module}.base_layer.out_proj" in peft_modules:  # LoRA on an nn.MultiheadAttention
        return f"{peft_module}.in_proj_weight"
    return f"{peft_module.replace('.base_layer', '')}.weight"


#: Parameter-name patterns of packed q/k/v projections (rows stacked q, k, v).
PACKED_QKV = (re.compile(r"(.*)\.in_proj_weight$"), re.compile(r"(.*)\.qkv\.weight$"))


def packed_views(name: str, update: Update) -> dict[str, Update]:
    """Split a packed q/k/v projection into per-projection views for analysis.

    ``attn.in_proj_weight`` (open_clip / ``nn.MultiheadAttention``) and fused ``qkv.weight``
    stack the q, k and v rows; a LowRank view keeps the shared ``A`` and splits ``B``'s rows.
    Views are named ``<parent>.{q,k,v}_proj.weight``. Other parameters pass through unchanged.
    """
    from mergelab.taskset import Dense, LowRank  # torch: here, not for `mergelab check`, which reads headers only

    for pattern in PACKED_QKV:
        match = pattern.match(name)
        if match is None:
            continue
        out = update.shape[0]
        if out % 3:
            raise InputError(f"packed projection {name!r} has {out} rows, not a multiple of 3")
        d = out // 3
        parent = match.group(1)
        views: dict[str, Update] = {}
        for i, kind in enumerate("qkv"):
            rows = slice(i * d, (i + 1) * d)
            views[f"{parent}.{kind}_proj.weight"] = (
                LowRank(update.B[rows], update.A) if isinstance(update, LowRank) else Dense(update.delta[rows])
            )
        return views
    return {name: update}
