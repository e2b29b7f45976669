"""Checkpoints in: PEFT LoRA adapters and full fine-tunes -> TaskSet, with PEFT's scaling applied once
(see :mod:`mergelab.checkpoints`)."""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergelab.errors import InputError
from mergelab.checkpoints.adapter_configs import check_scaling, compile_pattern, config_disagreements, read_adapter_config
from mergelab.checkpoints.files import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, FULL_WEIGHTS, LORA_KEY, BaseLike, Source, base_ref, is_adapter_dir,
                                        load_state_dict, named_sources, read_tensors, weights_file)

if TYPE_CHECKING:  # torch loads with the first tensor: the name helpers serve `mergelab check`, which reads metadata only
    import torch
    from torch import Tensor

    from mergelab.taskset import TaskSet, TaskUpdate, Update

__all__ = ["describe", "describe_sources", "guess_param", "load_taskset", "lora_targets", "mha_out_proj_factor", "peft_template",
           "resolve_prefix", "saved_modules", "saved_names", "target_param", "target_views", "task_heads"]


def _pattern_value(patterns: Mapping[str, Any], key: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first pattern matching a suffix of ``key``."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _scaling(config: Mapping[str, Any], peft_key: str, rank: int, where: str) -> tuple[float, float]:
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
    :func:`~mergelab.taskset.packed_views`: ``ΔW_q = B[:d] A``, ``ΔW_k = B[d:2d] A``,
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


def saved_modules(path: str | Path) -> dict[str, Tensor]:
    """A PEFT adapter's ``modules_to_save`` tensors (a task's own trained head: ``{"score.weight": W}``),
    by name relative to the model the adapter was trained on; empty when it saves none."""
    path = Path(path)
    weights = weights_file(path, ADAPTER_WEIGHTS)
    if weights is None:
        raise InputError(f"{path} has no {' or '.join(ADAPTER_WEIGHTS)}; pass a PEFT adapter directory")
    tensors = read_tensors(weights)
    return {name: tensors[PEFT_PREFIX + name] if PEFT_PREFIX + name in tensors else tensors[name]
            for name in sorted(saved_names(tensors, read_adapter_config(path)))}


def task_heads(taskset: TaskSet) -> dict[str, dict[str, Tensor]] | None:
    """Every task's :func:`saved_modules` (``save_merged(..., heads=...)``), or ``None`` when no
    task's adapter saves any."""
    if not any(t.meta.get("saved_modules") for t in taskset.tasks):
        return None
    return {t.name: saved_modules(t.source) if t.meta.get("saved_modules") else {} for t in taskset.tasks}


def guess_param(peft_module: str, peft_modules: Sequence[str]) -> str:
    """Without a base model: the parameter name a PEFT module most likely updates."""
    if f"{peft_module}.base_layer.out_proj" in peft_modules:  # LoRA on an nn.MultiheadAttention
        return f"{peft_module}.in_proj_weight"
    return f"{peft_module.replace('.base_layer', '')}.weight"


def _load_adapter(
    name: str, path: Path, base: Mapping[str, Tensor] | None, keep: Callable[[str], bool], dtype: torch.dtype,
    base_module: str | None = None,
) -> TaskUpdate:
    from mergelab.taskset import SUPPORTED_DTYPES, LowRank, TaskUpdate, packed_views

    config = read_adapter_config(path)
    weights = weights_file(path, ADAPTER_WEIGHTS, f"adapter {name!r}")
    if weights is None:
        raise InputError(f"{path} has {ADAPTER_CONFIG} but no {' or '.join(ADAPTER_WEIGHTS)}; copy the adapter weights next to it")
    raw = read_tensors(weights)
    saved = saved_names(raw, config)
    factors: dict[str, dict[str, Tensor]] = {}
    for key, tensor in raw.items():
        short = key.removeprefix(PEFT_PREFIX)
        if short in saved:
            continue  # a modules_to_save copy (a task's own head): read by saved_modules, never merged
        match = LORA_KEY.match(short)
        if match is None:
            raise InputError(f"{weights} holds {key!r}, which is neither a LoRA factor nor in the config's modules_to_save; "
                             "mergelab reads LoRA adapters (with trained heads as modules_to_save)")
        factors.setdefault(match["module"], {})[match["kind"]] = tensor
    if not factors:
        raise InputError(f"{weights} holds no LoRA factors; is it a PEFT LoRA adapter?")
    peft_modules = sorted(factors)
    disagreements = config_disagreements(config, lora_targets(peft_modules), sorted(saved))
    if disagreements:
        raise InputError(f"{path / ADAPTER_CONFIG}: {disagreements[0]}")
    tower = (config.get("auto_mapping") or {}).get("base_model_class")
    prefix = resolve_prefix(peft_modules, base, path, base_module=base_module, tower=tower) if base is not None else ""
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    model_conv1d = fan_in_fan_out if base is None else uses_conv1d(base)
    overridden: list[str] = []
    untrained = 0  # modules whose lora_B or lora_A is all zero: B A = 0
    modules: dict[str, Update] = {}
    meta_modules: dict[str, dict[str, Any]] = {}
    for peft_module in peft_modules:
        pair = factors[peft_module]
        embedding = "lora_embedding_A" in pair
        kinds = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        if set(pair) != set(kinds):
            raise InputError(f"{weights}: module {peft_module!r} has {sorted(pair)} but needs both {kinds[0]} and {kinds[1]}")
        param = target_param(prefix + peft_module, base) if base is not None else guess_param(peft_module, peft_modules)
        assert param is not None  # resolve_prefix checked coverage
        targets = target_views(param, base)
        if not any(keep(t) for t in targets):
            continue
        A, B = pair[kinds[0]], pair[kinds[1]]
        where = f"task {name!r}, module {param!r}"
        for what, t in (("lora_A", A), ("lora_B", B)):
            if t.dtype not in SUPPORTED_DTYPES:
                raise InputError(f"{where}: {what} has unsupported dtype {t.dtype}; save the adapter in float16, bfloat16 or float32")
            if t.ndim != 2:
                raise InputError(f"{where}: {what} has shape {tuple(t.shape)}; only Linear and Embedding LoRAs are supported")
        untrained += int(not bool(B.any()) or not bool(A.any()))
        rank = A.shape[0]
        if rank == 0:
            raise InputError(f"{where}: rank 0 (lora_A has shape {tuple(A.shape)}); an adapter needs r >= 1")
        [target_key] = lora_targets([peft_module])
        check_declared_rank(config, target_key, rank, f"{where} of {weights}")
        alpha, scaling = _scaling(config, target_key, rank, f"{path / ADAPTER_CONFIG}, module {peft_module!r}")
        conv1d = model_conv1d if base is None else conv1d_oriented(param, (B.shape[0], A.shape[1]), base, model_conv1d)
        if not embedding and conv1d != fan_in_fan_out:
            overridden.append(param)
        peft_factor = mha_out_proj_factor() if param.endswith(".out_proj.weight") and ".base_layer.out_proj" in peft_module else 1.0
        scaling *= peft_factor
        try:
            if embedding or conv1d:
                # Embedding (num_embeddings, dim) and Conv1D (in, out) weights: delta = (B A)^T.
                update = LowRank(A.T.to(dtype) * scaling, B.T.to(dtype))
            else:
                update = LowRank(B.to(dtype) * scaling, A.to(dtype))
        except InputError as err:
            raise InputError(f"{where}: {err}") from err
        info = {"peft_module": peft_module, "rank": rank, "alpha": alpha, "scaling": scaling,
                "transposed": bool(embedding or conv1d), "embedding": bool(embedding), "peft_factor": peft_factor}
        views = packed_views(param, update) if len(targets) > 1 else {param: update}
        for index, (view, view_update) in enumerate(views.items()):
            if not keep(view):
                continue
            if base is not None and view_update.shape != tuple(base[view].shape):
                raise InputError(
                    f"task {name!r}, module {view!r}: update shape {view_update.shape} does not fit base parameter shape "
                    f"{tuple(base[view].shape)}; pass the base model the adapter was trained on"
                )
            if base is not None:
                _check_float_base(base, view, f"task {name!r} updates")
            modules[view] = view_update
            meta_modules[view] = info if len(views) == 1 else {**info, "packed": [index, len(views)]}
    if not modules:
        raise InputError(f"modules filter keeps none of adapter {path}'s {len(peft_modules)} modules")
    if untrained == len({info["peft_module"] for info in meta_modules.values()}):
        warnings.warn(f"adapter {name!r} holds a zero update B A in every one of its {untrained} modules (an all-zero lora_B is how "
                      "PEFT initialises an adapter: untrained?), so it adds nothing to a merge; pass the trained adapter", UserWarning,
                      stacklevel=2)
    if overridden:
        held, meant = ("nn.Linear (out, in)", "false") if fan_in_fan_out else ("Conv1D (in, out)", "true")
        warnings.warn(f"adapter {name!r} sets fan_in_fan_out: {str(fan_in_fan_out).lower()}, but the base holds {len(overridden)} of its "
                      f"modules (e.g. {overridden[0]!r}) as {held}; read with fan_in_fan_out: {meant}, as PEFT does (it resets the "
                      "flag); fix adapter_config.json to silence this", UserWarning, stacklevel=2)
    meta = {"format": "peft", "prefix": prefix, "adapter_config": config, "modules": meta_modules,
            **({"saved_modules": sorted(prefix + k for k in saved)} if saved else {})}
    return TaskUpdate(name=name, modules=modules, source=str(path), meta=meta)


def _check_float_base(base: Mapping[str, Tensor], param: str, what: str) -> None:
    """InputError when the base holds ``param``, which ``what`` (a task) updates, in an integer or
    boolean dtype: a float update added to it would be rounded away or cast without a word."""
    if not base[param].is_floating_point():
        raise InputError(f"base parameter {param!r} is {str(base[param].dtype).removeprefix('torch.')}, but {what} it with a "
                         "floating-point update; pass the base model's float weights (float32, float16, bfloat16 or float64)")


def _load_full(
    name: str, path: Path, base: Mapping[str, Tensor], keep: Callable[[str], bool], dtype: torch.dtype
) -> TaskUpdate:
    from mergelab.taskset import SUPPORTED_DTYPES, Dense, TaskUpdate

    if path.is_dir():
        found = weights_file(path, FULL_WEIGHTS, f"checkpoint {name!r}")
        if found is None:
            raise InputError(
                f"{path} is neither a PEFT adapter (no {ADAPTER_CONFIG}) nor a full checkpoint (no {' / '.join(FULL_WEIGHTS)}); "
                "pass an adapter directory or a .safetensors state dict"
            )
        path = found
    state = read_tensors(path)
    modules: dict[str, Update] = {}
    unknown = sorted(k for k, v in state.items() if keep(k) and v.is_floating_point() and k not in base)
    if unknown:
        raise InputError(f"checkpoint {path} has {len(unknown)} parameters the base lacks (e.g. {unknown[0]!r}); restrict with modules=[...]")
    for key, tensor in state.items():
        if not keep(key) or not tensor.is_floating_point():
            continue
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise InputError(f"task {name!r}, parameter {key!r} has unsupported dtype {tensor.dtype}; save it in float16, bfloat16 or float32")
        if tensor.shape != base[key].shape:
            raise InputError(f"task {name!r}, parameter {key!r} has shape {tuple(tensor.shape)}, base has {tuple(base[key].shape)}; pass the matching base model")
        _check_float_base(base, key, f"task {name!r} fine-tunes")
        try:
            modules[key] = Dense(tensor.to(dtype) - base[key].to(dtype))
        except InputError as err:
            raise InputError(f"task {name!r}, parameter {key!r}: {err}") from err
    if not modules:
        raise InputError(f"checkpoint {path} has no floating-point parameters in common with the base")
    return TaskUpdate(name=name, modules=modules, source=str(path), meta={"format": "full"})


def load_taskset(
    base: BaseLike,
    sources: Sequence[Source],
    *,
    names: Sequence[str] | None = None,
    modules: Sequence[str] | None = None,
    dtype: torch.dtype | None = None,
    base_module: str | None = None,
) -> TaskSet:
    """Load PEFT LoRA adapters and/or full fine-tuned checkpoints into a validated TaskSet.

    Args:
        base: the base model (a module, a state dict, a weights file or a directory).
        sources: adapter directories or checkpoint files; ``"NAME=PATH"`` or ``(name, path)``
            names a task, otherwise the directory / file name is used.
        names: task names, overriding those derived from ``sources``.
        modules: regular expressions over base parameter names (full match); only those
            parameters are kept.
        dtype: dtype of the loaded updates (None: float32; SVD-based code upcasts further).
        base_module: the sub-module of a whole-model ``base`` that PEFT adapters were trained on
            (``"visual"``: open_clip's image tower); by default found from the names, or from the
            adapter's recorded base class when the names fit several (:data:`TOWER_PREFIXES`).
            Full checkpoints name their parameters in the base's own terms and ignore it.
    """
    import torch

    from mergelab.taskset import TaskSet

    dtype = dtype or torch.float32
    pairs = named_sources(sources, names)
    base_state = load_state_dict(base)
    patterns = [compile_pattern(m, "modules pattern (--modules)") for m in modules or ()]
    keep = (lambda k: any(p.fullmatch(k) for p in patterns)) if patterns else (lambda k: True)
    tasks = []
    for name, path in pairs:
        tasks.append(_load_adapter(name, path, base_state, keep, dtype, base_module) if is_adapter_dir(path)
                     else _load_full(name, path, base_state, keep, dtype))
    return TaskSet(tuple(tasks), base_ref(base, base_state))


def peft_template(taskset: TaskSet) -> dict[str, Any] | None:
    """The PEFT layout (adapter config + per-parameter module info) a merged adapter is written with.

    Taken from the first task; None when the tasks are not PEFT adapters. Merges carry it in
    ``MergedUpdate.meta["peft"]`` so :func:`save_merged` can write a loadable adapter.
    """
    meta = taskset.tasks[0].meta
    if meta.get("format") != "peft":
        return None
    return {"adapter_config": meta["adapter_config"], "modules": meta["modules"]}


def describe(task: TaskUpdate) -> dict[str, Any]:
    """A JSON-able summary of one task: per module its shape, rank, alpha, scaling and ‖ΔW‖_F."""
    info = task.meta.get("modules", {})
    modules = []
    for name, update in task.modules.items():
        entry: dict[str, Any] = {"name": name, "shape": list(update.shape), "norm": update.norm()}
        if name in info:
            entry.update(rank=info[name]["rank"], alpha=info[name]["alpha"], scaling=info[name]["scaling"])
        modules.append(entry)
    return {"task": task.name, "source": task.source, "format": task.meta.get("format"), "content_hash": task.content_hash,
            "total_norm": math.sqrt(sum(m["norm"] ** 2 for m in modules)), "modules": modules}


def describe_sources(sources: Sequence[Source], base: BaseLike | None = None,
                     base_module: str | None = None) -> list[dict[str, Any]]:
    """:func:`describe` for every source. Adapters can be read without a base (names are then the
    adapter's own module paths); full checkpoints need the base to form their deltas."""
    import torch

    if base is not None:
        return [describe(task) for task in load_taskset(base, sources, base_module=base_module)]
    tasks = []
    for name, path in named_sources(sources, None):
        if not is_adapter_dir(path):
            raise InputError(f"{path} is not a PEFT adapter directory (no {ADAPTER_CONFIG}); pass --base to inspect a full checkpoint")
        tasks.append(_load_adapter(name, path, None, lambda _: True, torch.float32))
    return [describe(task) for task in tasks]
