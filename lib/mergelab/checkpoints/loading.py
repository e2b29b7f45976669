"""Checkpoints in: PEFT LoRA adapters and full fine-tunes -> TaskSet, with PEFT's scaling applied once
(see :mod:`mergelab.checkpoints`)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergelab.checkpoints.adapter_configs import compile_pattern, config_disagreements, read_adapter_config
from mergelab.checkpoints.files import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, FULL_WEIGHTS, LORA_KEY, PEFT_PREFIX, BaseLike, Source, base_ref,
                                        is_adapter_dir, load_state_dict, named_sources, read_tensors, weights_file)
from mergelab.checkpoints.modules import (check_declared_rank, conv1d_oriented, guess_param, lora_targets, mha_out_proj_factor,
                                          module_scaling, resolve_prefix, saved_names, target_param, target_views, uses_conv1d)
from mergelab.errors import InputError

if TYPE_CHECKING:  # torch loads with the first tensor: `mergelab check` reads metadata only (mergelab.checkpoints.modules)
    import torch
    from torch import Tensor

    from mergelab.taskset import LowRank, TaskSet, TaskUpdate, Update

__all__ = ["describe", "describe_sources", "load_taskset", "peft_template", "saved_modules", "task_heads"]


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


@dataclass(frozen=True)
class _Reading:
    """What every module of one adapter is read against: the task's name, the adapter's folder, weights file and
    config, the base (``None``: none given), whether it holds ``Conv1D`` weights, and the dtype of the updates."""

    name: str
    path: Path
    weights: Path
    config: Mapping[str, Any]
    base: Mapping[str, Tensor] | None
    model_conv1d: bool
    dtype: torch.dtype


def _load_adapter(
    name: str, path: Path, base: Mapping[str, Tensor] | None, keep: Callable[[str], bool], dtype: torch.dtype,
    base_module: str | None = None,
) -> TaskUpdate:
    """One PEFT LoRA adapter as a TaskUpdate: its LoRA factors (:func:`_read_factors`), each kept module's update
    as PEFT applies it (:func:`_module_update`) laid on the base's parameters (:func:`_base_views`), and a warning
    for an untrained adapter or a ``fan_in_fan_out`` PEFT would reset (:func:`_warn_unusual`)."""
    from mergelab.taskset import TaskUpdate

    config = read_adapter_config(path)
    weights, saved, factors = _read_factors(name, path, config)
    peft_modules = sorted(factors)
    disagreements = config_disagreements(config, lora_targets(peft_modules), sorted(saved))
    if disagreements:
        raise InputError(f"{path / ADAPTER_CONFIG}: {disagreements[0]}")
    tower = (config.get("auto_mapping") or {}).get("base_model_class")
    prefix = resolve_prefix(peft_modules, base, path, base_module=base_module, tower=tower) if base is not None else ""
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    reading = _Reading(name, path, weights, config, base, fan_in_fan_out if base is None else uses_conv1d(base), dtype)
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
        update, info = _module_update(reading, peft_module, param, A, B, embedding)
        untrained += int(not bool(B.any()) or not bool(A.any()))
        if not embedding and info["transposed"] != fan_in_fan_out:
            overridden.append(param)
        for view, (view_update, view_info) in _base_views(reading, param, update, info, len(targets), keep).items():
            modules[view], meta_modules[view] = view_update, view_info
    if not modules:
        raise InputError(f"modules filter keeps none of adapter {path}'s {len(peft_modules)} modules")
    _warn_unusual(name, untrained, len({info["peft_module"] for info in meta_modules.values()}), overridden, fan_in_fan_out)
    meta = {"format": "peft", "prefix": prefix, "adapter_config": config, "modules": meta_modules,
            **({"saved_modules": sorted(prefix + k for k in saved)} if saved else {})}
    return TaskUpdate(name=name, modules=modules, source=str(path), meta=meta)


def _read_factors(name: str, path: Path, config: Mapping[str, Any]) -> tuple[Path, set[str], dict[str, dict[str, Tensor]]]:
    """An adapter's weights file, its ``modules_to_save`` copies (:func:`saved_names`) and its LoRA factors by
    PEFT module (``{module: {"lora_A": A, "lora_B": B}}``); InputError for a tensor that is neither."""
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
    return weights, saved, factors


def _module_update(reading: _Reading, peft_module: str, param: str, A: Tensor, B: Tensor,
                   embedding: bool) -> tuple[LowRank, dict[str, Any]]:
    """The update of ``param`` by one LoRA module as PEFT applies it, ``scaling · B A`` with the config's rank and
    scaling (:func:`~mergelab.checkpoints.modules.module_scaling`), transposed for an embedding or a ``Conv1D``
    (:func:`~mergelab.checkpoints.modules.conv1d_oriented`) and, on an MHA's out_proj, times
    :func:`~mergelab.checkpoints.modules.mha_out_proj_factor`; and its record in the task's meta."""
    from mergelab.taskset import SUPPORTED_DTYPES, LowRank

    where = f"task {reading.name!r}, module {param!r}"
    for what, t in (("lora_A", A), ("lora_B", B)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise InputError(f"{where}: {what} has unsupported dtype {t.dtype}; save the adapter in float16, bfloat16 or float32")
        if t.ndim != 2:
            raise InputError(f"{where}: {what} has shape {tuple(t.shape)}; only Linear and Embedding LoRAs are supported")
    rank = A.shape[0]
    if rank == 0:
        raise InputError(f"{where}: rank 0 (lora_A has shape {tuple(A.shape)}); an adapter needs r >= 1")
    [target_key] = lora_targets([peft_module])
    check_declared_rank(reading.config, target_key, rank, f"{where} of {reading.weights}")
    alpha, scaling = module_scaling(reading.config, target_key, rank, f"{reading.path / ADAPTER_CONFIG}, module {peft_module!r}")
    base, dtype = reading.base, reading.dtype
    conv1d = reading.model_conv1d if base is None else conv1d_oriented(param, (B.shape[0], A.shape[1]), base, reading.model_conv1d)
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
    return update, info


def _base_views(reading: _Reading, param: str, update: LowRank, info: dict[str, Any], n_targets: int,
                keep: Callable[[str], bool]) -> dict[str, tuple[Update, dict[str, Any]]]:
    """The kept base parameters an update of ``param`` lands on (a packed in-projection split over q/k/v:
    :func:`~mergelab.checkpoints.modules.packed_views`), each with its update and record, checked to fit the base."""
    from mergelab.checkpoints.modules import packed_views

    base, name = reading.base, reading.name
    views = packed_views(param, update) if n_targets > 1 else {param: update}
    kept: dict[str, tuple[Update, dict[str, Any]]] = {}
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
        kept[view] = (view_update, info if len(views) == 1 else {**info, "packed": [index, len(views)]})
    return kept


def _warn_unusual(name: str, untrained: int, n_modules: int, overridden: Sequence[str], fan_in_fan_out: bool) -> None:
    """One warning when every one of an adapter's ``n_modules`` modules is ``untrained`` (a zero ``B A``), one when
    PEFT resets its ``fan_in_fan_out`` on the ``overridden`` modules; both name the line that called :func:`_load_adapter`."""
    if untrained == n_modules:
        warnings.warn(f"adapter {name!r} holds a zero update B A in every one of its {untrained} modules (an all-zero lora_B is how "
                      "PEFT initialises an adapter: untrained?), so it adds nothing to a merge; pass the trained adapter", UserWarning,
                      stacklevel=3)
    if overridden:
        held, meant = ("nn.Linear (out, in)", "false") if fan_in_fan_out else ("Conv1D (in, out)", "true")
        warnings.warn(f"adapter {name!r} sets fan_in_fan_out: {str(fan_in_fan_out).lower()}, but the base holds {len(overridden)} of its "
                      f"modules (e.g. {overridden[0]!r}) as {held}; read with fan_in_fan_out: {meant}, as PEFT does (it resets the "
                      "flag); fix adapter_config.json to silence this", UserWarning, stacklevel=3)


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
        raise InputError(f"checkpoint {path} has {len(unknown)} parameters the base lacks (e.g. {unknown[0]!r}); restrict with "
                         "modules=[...]")
    for key, tensor in state.items():
        if not keep(key) or not tensor.is_floating_point():
            continue
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise InputError(f"task {name!r}, parameter {key!r} has unsupported dtype {tensor.dtype}; save it in float16, bfloat16 or "
                             "float32")
        if tensor.shape != base[key].shape:
            raise InputError(f"task {name!r}, parameter {key!r} has shape {tuple(tensor.shape)}, base has {tuple(base[key].shape)}; pass "
                             "the matching base model")
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
