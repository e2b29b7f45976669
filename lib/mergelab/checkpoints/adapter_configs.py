"""Adapter configs: a PEFT LoRA ``adapter_config.json`` read and checked as a merge reads it.

Its fields are checked against the types PEFT's ``LoraConfig`` gives them (:data:`CONFIG_FIELDS`), what
mergelab cannot merge is named (:data:`UNMERGEABLE`), and which modules it targets and saves is read as
PEFT reads it (:func:`targets`, :func:`unsaved`, :func:`config_disagreements`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergelab.checkpoints.files import ADAPTER_CONFIG
from mergelab.errors import InputError, read_text

__all__ = ["BIAS", "CONFIG_FIELDS", "MAX_SCALING", "TASK_HEADS", "TRAINING_ONLY", "UNMERGEABLE", "ConfigField", "Unmergeable",
           "adapter_config", "check_config_fields", "check_scaling", "compile_pattern", "config_disagreements", "is_number",
           "is_rank", "layer_index", "read_adapter_config", "targets", "unmergeable", "unsaved"]


#: Adapter-config fields that shape training only, never the update ``ΔW = scaling · B A``:
#: dropped at load so that they stay out of every cache key (a changed ``lora_dropout`` is the
#: same task vector) and out of merged adapters, which are for inference.
TRAINING_ONLY = ("lora_dropout", "inference_mode", "init_lora_weights", "loftq_config", "runtime_config")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_rank(value: Any) -> bool:
    """A LoRA rank: a positive integer (JSON ``true`` is not one, though Python counts it as 1)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


#: The largest ``|lora_alpha / r|`` (rsLoRA: ``/ sqrt(r)``) read as a trained adapter's scaling;
#: trained LoRAs use about 0.1 to 64, and a larger one scales the update past anything a model holds.
MAX_SCALING = 1e4


def check_scaling(alpha: float, rank: int, rslora: bool, where: str) -> float:
    """PEFT's scaling ``alpha / r`` (rsLoRA: ``alpha / sqrt(r)``), refused when its magnitude passes
    :data:`MAX_SCALING` (``lora_alpha: 1e38`` would write a merge of huge weights without a word)."""
    scaling = alpha / (math.sqrt(rank) if rslora else rank)
    if abs(scaling) > MAX_SCALING:
        raise InputError(f"{where}: lora_alpha {alpha:g} at rank {rank} gives scaling {scaling:g}, beyond the {MAX_SCALING:g} "
                         "any trained adapter uses; fix lora_alpha (or alpha_pattern) in adapter_config.json")
    return scaling


def compile_pattern(pattern: str, where: str) -> re.Pattern[str]:
    """``re.compile`` with a one-line error naming where the bad expression came from."""
    try:
        return re.compile(pattern)
    except (re.error, OverflowError, RecursionError) as err:  # OverflowError: a repeat count such as a{99999999999}
        raise InputError(f"{where} {pattern!r} is not a regular expression ({err}); fix or quote it") from None


def read_adapter_config(path: Path) -> dict[str, Any]:
    """A PEFT LoRA ``adapter_config.json`` as a merge reads it (:func:`adapter_config`, without its
    :data:`TRAINING_ONLY` fields); an adapter using an :data:`UNMERGEABLE` feature is refused (one line:
    why, and what would be needed)."""
    config = adapter_config(path)
    reasons = unmergeable(config)
    if reasons:
        raise InputError(f"{path}: {reasons[0]}")
    return {k: v for k, v in config.items() if k not in TRAINING_ONLY}


def _is_bool(value: Any) -> bool:
    """A JSON boolean (a string such as ``"false"`` is truthy in Python, so it is not one)."""
    return isinstance(value, bool)


def _is_names(value: Any) -> bool:
    """A list of strings (module names)."""
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_layer(value: Any) -> bool:
    """A layer index: an integer >= 0 (JSON ``true`` is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _optional(valid: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """``valid``, or JSON ``null`` (PEFT's ``Optional[...]``)."""
    return lambda value: value is None or valid(value)


@dataclass(frozen=True)
class ConfigField:
    """A field of ``adapter_config.json`` that mergelab reads, with the type PEFT's ``LoraConfig``
    (or its base ``PeftConfig``) gives it; ``expected`` completes "has NAME = VALUE; ..."."""

    name: str
    valid: Callable[[Any], bool]
    expected: str
    required: bool = False


#: PEFT's ``LoraConfig.bias`` values.
BIAS = ("none", "all", "lora_only")

_BOOLEAN = "it must be true or false (a JSON boolean; a string such as \"false\" would read as true)"

#: Every adapter-config field the loader reads. Required: what PEFT cannot load an adapter without
#: (``peft_type`` picks the config class; a saved LoRA config always lists its ``target_modules``).
CONFIG_FIELDS: tuple[ConfigField, ...] = (
    ConfigField("peft_type", lambda v: isinstance(v, str), "it must be a string (LORA)", required=True),
    ConfigField("r", is_rank, "LoRA rank must be a positive integer", required=True),
    ConfigField("lora_alpha", is_number, "it must be a number", required=True),
    ConfigField("target_modules", lambda v: isinstance(v, str) or _is_names(v),
                "it must be a list of module names or one regular expression (a string)", required=True),
    ConfigField("exclude_modules", _optional(lambda v: isinstance(v, str) or _is_names(v)),
                "it must be null, a list of module names or one regular expression"),
    ConfigField("layers_to_transform", _optional(lambda v: _is_layer(v) or (isinstance(v, list) and all(map(_is_layer, v)))),
                "it must be null, a layer index or a list of layer indices (integers >= 0)"),
    ConfigField("layers_pattern", _optional(lambda v: isinstance(v, str) or _is_names(v)),
                "it must be null, a name or a list of names of the model's layer list"),
    ConfigField("modules_to_save", _optional(_is_names), "it must be null or a list of module names"),
    ConfigField("rank_pattern", _optional(lambda v: isinstance(v, dict)), "it must map module patterns to ranks"),
    ConfigField("alpha_pattern", _optional(lambda v: isinstance(v, dict)), "it must map module patterns to alphas"),
    ConfigField("bias", lambda v: v in BIAS, f"it must be one of {', '.join(BIAS)}"),
    *(ConfigField(flag, _is_bool, _BOOLEAN) for flag in ("use_rslora", "fan_in_fan_out", "use_dora", "lora_bias", "use_qalora")),
    ConfigField("init_lora_weights", lambda v: isinstance(v, (bool, str)), "it must be true, false or the name of an initialisation"),
    ConfigField("loftq_config", _optional(lambda v: isinstance(v, dict)), "it must be null or an object"),
    ConfigField("auto_mapping", _optional(lambda v: isinstance(v, dict)), "it must be null or an object"),
    ConfigField("base_model_name_or_path", _optional(lambda v: isinstance(v, str)), "it must be null or a string"),
)


def check_config_fields(config: Mapping[str, Any], where: Path) -> None:
    """Raise :class:`InputError` on the first :data:`CONFIG_FIELDS` field that is missing (when
    required) or not of its type, and on a ``target_modules`` / ``exclude_modules`` /
    ``layers_pattern`` string that is not a regular expression (PEFT matches them as ones)."""
    for spec in CONFIG_FIELDS:
        if spec.name not in config:
            if spec.required:
                raise InputError(f"{where} lacks {spec.name!r}; PEFT cannot load a LoRA config without it (it writes r, lora_alpha, "
                                 "peft_type and target_modules with every adapter): re-save the adapter with PEFT")
            continue
        if not spec.valid(config[spec.name]):
            raise InputError(f"{where} has {spec.name} = {config[spec.name]!r}; {spec.expected}")
    for name in ("target_modules", "exclude_modules"):
        if isinstance(config.get(name), str):
            compile_pattern(config[name], f"{where}: {name}")
    layers = config.get("layers_pattern")
    for pattern in [layers] if isinstance(layers, str) else layers or ():
        compile_pattern(pattern, f"{where}: layers_pattern")


def adapter_config(path: Path) -> dict[str, Any]:
    """A PEFT LoRA ``adapter_config.json``, its fields checked against the types PEFT gives them
    (:data:`CONFIG_FIELDS`; ``mergelab check`` reads it so, and reports what :func:`unmergeable`
    finds instead of stopping)."""
    where = path / ADAPTER_CONFIG
    text = read_text(where, "adapter config")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{where} is not valid JSON ({err.msg} at line {err.lineno}); re-save the adapter") from err
    except RecursionError:
        raise InputError(f"{where} nests deeper than Python can read; a PEFT config is a flat object, re-save the adapter") from None
    if not isinstance(config, dict):
        raise InputError(f"{where} must hold a JSON object")
    if isinstance(config.get("peft_type"), str) and config["peft_type"].upper() != "LORA":
        raise InputError(f"{path} is a {config['peft_type'].upper()} adapter; mergelab reads LoRA adapters (peft_type LORA)")
    check_config_fields(config, where)
    for field_name, valid in (("rank_pattern", is_rank), ("alpha_pattern", is_number)):
        for pattern, value in (config.get(field_name) or {}).items():
            compile_pattern(pattern, f"{where}: {field_name} key")
            if not valid(value):
                raise InputError(f"{where}: {field_name}[{pattern!r}] = {value!r} is not a valid {field_name.split('_')[0]}")
    return config


#: What a merge of ``B A`` alone needs next: fold the adapter into its base, merge the result as a full fine-tune.
_MERGE_AND_UNLOAD = ("merge_and_unload it onto the model it was trained on (PeftModel.from_pretrained(base, adapter)"
                     ".merge_and_unload()), save that and pass it as a full checkpoint (merged as a dense delta)")
#: ``base_model_name_or_path`` of a checkpoint published already quantized (bitsandbytes, GPTQ, AWQ, …).
_QUANTIZED_NAME = re.compile(r"(?i)(bnb|[-_.][48]-?bit|gptq|awq|nf4|gguf)")


@dataclass(frozen=True)
class Unmergeable:
    """An adapter-config feature under which the update is not ``ΔW = scaling · B A`` on a float
    base, so a merge of the LoRA factors alone is silently not the adapter the user trained."""

    feature: str
    applies: Callable[[Mapping[str, Any]], str | None]  # config -> what in it shows the feature, or None
    why: str
    needs: str


def _quantized_base(config: Mapping[str, Any]) -> str | None:
    """What in an adapter config records a quantized base: LoftQ, QA-LoRA, or a pre-quantized base's name."""
    if config.get("loftq_config") or config.get("init_lora_weights") == "loftq":
        return "LoftQ initialisation (loftq_config)"
    if config.get("use_qalora"):
        return "use_qalora=true"
    name = str(config.get("base_model_name_or_path") or "")
    return f"base_model_name_or_path {name!r}" if _QUANTIZED_NAME.search(name) else None


#: Features mergelab refuses (none of the merging papers it implements defines their merge). DoRA: Liu et al.
#: 2024 (PEFT ``use_dora``); LoftQ: Li et al. 2023; QA-LoRA: Xu et al. 2023 (PEFT ``use_qalora``).
UNMERGEABLE: tuple[Unmergeable, ...] = (
    Unmergeable("DoRA", lambda c: "use_dora=true" if c.get("use_dora") else None,
                "DoRA rescales every column of W0 + B A by a trained magnitude vector (lora_magnitude_vector), so its update "
                "is not B A", _MERGE_AND_UNLOAD),
    Unmergeable("lora_bias", lambda c: "lora_bias=true" if c.get("lora_bias") else None,
                "it also trains a bias on every lora_B, an update of the layers' biases that a merge of A and B drops",
                _MERGE_AND_UNLOAD),
    Unmergeable("PEFT's bias option", lambda c: f"bias={c['bias']!r}" if c.get("bias", "none") != "none" else None,
                "it also trains the layers' biases (saved beside the factors as bias tensors, or missing from the adapter), "
                "an update that a merge of A and B would silently drop", _MERGE_AND_UNLOAD),
    Unmergeable("a quantized base", _quantized_base,
                "B A was trained against the quantized weights (it corrects their quantization error, or with QA-LoRA reads "
                "group-pooled inputs), so it is no update of the float base",
                "dequantize the base it was trained on, merge_and_unload the adapter onto that float base and pass the result "
                "as a full checkpoint with the dequantized base as --base"),
)


def unmergeable(config: Mapping[str, Any]) -> list[str]:
    """One line per :data:`UNMERGEABLE` feature ``config`` (an ``adapter_config.json``) uses: what shows
    it, why a merge of ``B A`` would be wrong and what would be needed instead."""
    found = []
    for entry in UNMERGEABLE:
        shown = entry.applies(config)
        if shown is not None:
            found.append(f"trained with {entry.feature} ({shown}), which mergelab cannot merge: {entry.why}; {entry.needs}")
    return found


# The config against its tensors ----------------------------------------------------------------

#: The heads PEFT adds to ``modules_to_save`` by ``task_type`` (``PeftModelForSequenceClassification`` and
#: friends add both names; a model has one of them, so one saved suffices).
TASK_HEADS: dict[str, tuple[str, ...]] = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                                          "QUESTION_ANS": ("qa_outputs",)}


def _names_in(names: Sequence[str], key: str) -> bool:
    """PEFT's list matching: ``key`` is one of ``names`` or ends with ``.NAME`` for one of them."""
    return any(key == name or key.endswith(f".{name}") for name in names)


def layer_index(config: Mapping[str, Any], key: str) -> int | None:
    """The layer a module sits in as PEFT reads it for ``layers_to_transform``: the number after one
    of ``layers_pattern``'s names, or without one, after the second dotted name (the first numbered one)."""
    patterns = config.get("layers_pattern")
    patterns = [patterns] if isinstance(patterns, str) else patterns or []
    searches = [rf"(?:^|.*?\.){p}\.(\d+)\." for p in patterns] or [r".*?\.[^.]*\.(\d+)\."]
    for search in searches:
        found = re.match(search, key)
        if found:
            return int(found[1])
    return None


def targets(config: Mapping[str, Any], key: str) -> bool:
    """Whether PEFT wraps the module ``key`` (a name in the adapted model) with a LoRA layer under
    ``config``: not excluded (``exclude_modules``, ``modules_to_save``), matched by ``target_modules``
    (a string: a full regular-expression match; a list: a name or a dotted suffix), and, for a suffix
    match, in one of ``layers_to_transform``'s layers. A module PEFT does not wrap keeps no LoRA
    tensors on load: PEFT drops them as unexpected keys."""
    excluded = config.get("exclude_modules")
    if excluded and (re.fullmatch(excluded, key) if isinstance(excluded, str) else _names_in(excluded, key)):
        return False
    if any(f".{m}." in f".{key}." for m in config.get("modules_to_save") or ()):
        return False
    wanted = config["target_modules"]
    if isinstance(wanted, str):
        return re.fullmatch(wanted, key) is not None
    if key in wanted:
        return True
    layers = config.get("layers_to_transform")
    layers = [layers] if isinstance(layers, int) else layers
    if not layers:
        return _names_in(wanted, key)
    return _names_in(wanted, key) and layer_index(config, key) in layers


def unsaved(config: Mapping[str, Any], saved: Sequence[str]) -> list[str]:
    """The ``modules_to_save`` entries none of the ``saved`` parameters (names in the adapted model)
    belongs to; the heads PEFT adds by ``task_type`` (:data:`TASK_HEADS`) count as one entry, any one saved."""
    listed = config.get("modules_to_save") or []
    heads = [h for h in TASK_HEADS.get(str(config.get("task_type")), ()) if h in listed]
    modules = [name.rsplit(".", 1)[0] for name in saved]

    def held(names: Sequence[str]) -> bool:
        return any(_names_in(names, m) for m in modules)

    missing = [m for m in listed if m not in heads and not held([m])]
    return missing + ([" or ".join(heads)] if heads and not held(heads) else [])


def config_disagreements(config: Mapping[str, Any], modules: Sequence[str], saved: Sequence[str]) -> list[str]:
    """One line per way ``config`` disagrees with the tensors beside it, each of which PEFT would load
    as another adapter than the one merged: LoRA ``modules`` (names in the adapted model) the config
    does not target (PEFT drops their tensors), ``layers_to_transform`` layers that hold none of them,
    and ``modules_to_save`` entries with no ``saved`` tensor (a trained head missing from the adapter)."""
    found = []
    layers = config.get("layers_to_transform")
    held = {layer_index(config, m) for m in modules} - {None}
    empty = sorted(set([layers] if isinstance(layers, int) else layers or ()) - held)
    if empty:
        found.append(f"layers_to_transform names layer(s) {empty} that hold no LoRA factors (the weights' layers: "
                     f"{sorted(held) or 'none found'})")
    untargeted = [m for m in modules if not targets(config, m)]
    if untargeted and len(untargeted) == len(modules):
        found.append(f"target_modules {config['target_modules']!r} matches none of the {len(modules)} modules the weights hold "
                     f"LoRA factors for (e.g. {modules[0]!r}), so PEFT would refuse to load it")
    elif untargeted:
        found.append(f"the weights hold LoRA factors for {len(untargeted)} module(s) the config does not target (e.g. "
                     f"{untargeted[0]!r}), which PEFT would drop on load")
    missing = unsaved(config, saved)
    if missing:
        found.append(f"modules_to_save names {missing[0]!r}, but the weights save no tensor of it: its trained weights would be "
                     "missing from the merge (PEFT would load the base's untrained module in its place)")
    return [f"{line}; fix adapter_config.json to match the weights, or re-save the adapter" for line in found]
