"""Checkpoints in and out: PEFT LoRA adapters and full fine-tunes -> TaskSet -> merged weights.

``load_taskset(base, sources)`` reads

* PEFT LoRA adapter directories (``adapter_config.json`` + ``adapter_model.safetensors`` or
  ``adapter_model.bin``). The scaling ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), per-module
  ``rank_pattern`` / ``alpha_pattern``, ``fan_in_fan_out`` and embedding LoRAs are applied here,
  once, so every downstream method sees ``delta = B @ A`` in the base parameter's orientation.
  (The KnOTS and Core Space reference code omit the scaling; REFERENCES §1.1.)
* full fine-tuned checkpoints (a safetensors state dict, or a directory holding
  ``model.safetensors``) as :class:`~mergelab.taskset.Dense` deltas against the base.

``save_merged(merged, out, format=...)`` writes merged full weights (``model.safetensors``) or,
when every module is low rank, a PEFT LoRA adapter directory that ``PeftModel.from_pretrained``
loads. Both are written to a temporary directory and renamed into place, so a crash never leaves
a half-written output.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mergelab.errors import InputError
from mergelab.hashing import content_hash
from mergelab.linalg import lowrank_svd, svd64
from mergelab.taskset import SUPPORTED_DTYPES, BaseRef, Dense, LowRank, MergedUpdate, TaskSet, TaskUpdate, Update

__all__ = ["Source", "cap_rank", "describe", "describe_sources", "load_state_dict", "load_taskset", "peft_template", "save_merged"]

StateDict = dict[str, Tensor]
Source = str | os.PathLike[str] | tuple[str, "str | os.PathLike[str]"]
BaseLike = str | os.PathLike[str] | Mapping[str, Tensor] | nn.Module

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
FULL_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?(?:\.weight)?$")


# Reading tensors ---------------------------------------------------------------------------


#: First bytes of a torch.save file: a zip archive (torch >= 1.6) or a legacy pickle stream.
_TORCH_MAGIC = (b"PK", b"\x80\x02")


def _read_tensors(path: Path) -> StateDict:
    """Read a safetensors or torch-pickle file into a CPU state dict, turning failures into InputError."""
    if path.suffix != ".safetensors":
        with path.open("rb") as f:
            if f.read(2) not in _TORCH_MAGIC:
                raise InputError(f"cannot read {path}: neither a safetensors nor a torch weights file; pass model weights")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path), device="cpu")
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise InputError(f"refused to unpickle {path}: it holds objects other than tensors, which mergelab never loads "
                         "(torch.load weights_only=True); convert it to safetensors with safetensors.torch.save_file") from err
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as err:
        kind = "safetensors" if path.suffix == ".safetensors" else "torch"
        raise InputError(f"cannot read {path}: corrupt or truncated {kind} file ({type(err).__name__}); re-save it") from err
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise InputError(f"{path} does not hold a flat state dict of tensors; save it with safetensors.torch.save_file")
    return dict(state)


def _weights_file(directory: Path, candidates: Sequence[str]) -> Path | None:
    for name in candidates:
        if (directory / name).is_file():
            return directory / name
    return None


def load_state_dict(base: BaseLike) -> StateDict:
    """A base model's state dict from a module, a mapping, a weights file or a directory holding one."""
    if isinstance(base, nn.Module):
        return {k: v.detach() for k, v in base.state_dict().items()}
    if isinstance(base, Mapping):
        return dict(base)
    path = Path(base)
    if not path.exists():
        raise InputError(f"base model path {path} does not exist; pass a weights file or a directory with model.safetensors")
    if path.is_dir():
        found = _weights_file(path, FULL_WEIGHTS)
        if found is None:
            raise InputError(f"{path} holds none of {', '.join(FULL_WEIGHTS)}; pass the weights file itself")
        path = found
    return _read_tensors(path)


_BASE_HASHES: dict[tuple[str, int, int], str] = {}


def _base_ref(base: BaseLike, state: StateDict) -> BaseRef:
    if isinstance(base, (str, os.PathLike)):
        path = Path(base).resolve()
        stat = path.stat()
        cache_key = (str(path), stat.st_mtime_ns, stat.st_size)
        if cache_key not in _BASE_HASHES:
            _BASE_HASHES[cache_key] = content_hash(state)
        return BaseRef(name=path.name, path=str(path), content_hash=_BASE_HASHES[cache_key])
    name = type(base).__name__ if isinstance(base, nn.Module) else "state_dict"
    return BaseRef(name=name, path=None, content_hash=content_hash(state))


# Sources -----------------------------------------------------------------------------------


def _named_sources(sources: Sequence[Source], names: Sequence[str] | None) -> list[tuple[str, Path]]:
    if not sources:
        raise InputError("empty source list; pass at least one adapter directory or checkpoint (CLI: mergelab inspect PATH...)")
    pairs: list[tuple[str, Path]] = []
    for i, src in enumerate(sources):
        if isinstance(src, tuple):
            name, path = src[0], Path(src[1])
        else:
            text = os.fspath(src)
            name, sep, rest = text.partition("=")
            if sep and name and not Path(text).exists():
                path = Path(rest)
            else:
                path = Path(text)
                name = path.stem if path.is_file() else path.name
        if names is not None:
            name = names[i]
        if not path.exists():
            raise InputError(f"source {path} does not exist; check the path (NAME=PATH names a task)")
        if name in (n for n, _ in pairs):
            raise InputError(f"duplicate task names: two sources are named {name!r}; name each task once (NAME=PATH)")
        pairs.append((name, path))
    if names is not None and len(names) != len(sources):
        raise InputError(f"{len(names)} names for {len(sources)} sources; give one name per source")
    return pairs


def _is_adapter_dir(path: Path) -> bool:
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


#: Adapter-config fields that shape training only, never the update ``ΔW = scaling · B A``:
#: dropped at load so that they stay out of every cache key (a changed ``lora_dropout`` is the
#: same task vector) and out of merged adapters, which are for inference.
TRAINING_ONLY = ("lora_dropout", "inference_mode", "init_lora_weights", "loftq_config", "runtime_config")


def _read_adapter_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path / ADAPTER_CONFIG} is not valid JSON ({err.msg} at line {err.lineno}); re-save the adapter") from err
    if not isinstance(config, dict):
        raise InputError(f"{path / ADAPTER_CONFIG} must hold a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise InputError(f"{path} is a {peft_type} adapter; mergelab reads LoRA adapters (peft_type LORA)")
    for field_name in ("r", "lora_alpha"):
        if field_name not in config:
            raise InputError(f"{path / ADAPTER_CONFIG} lacks {field_name!r}; a PEFT LoRA config needs r and lora_alpha")
    if not isinstance(config["r"], int) or config["r"] <= 0:
        raise InputError(f"{path / ADAPTER_CONFIG} has r = {config['r']!r}; LoRA rank must be a positive integer")
    if not _is_number(config["lora_alpha"]):
        raise InputError(f"{path / ADAPTER_CONFIG} has lora_alpha = {config['lora_alpha']!r}; it must be a number")
    for field_name, valid in (("rank_pattern", lambda v: isinstance(v, int) and v > 0), ("alpha_pattern", _is_number)):
        patterns = config.get(field_name) or {}
        if not isinstance(patterns, Mapping):
            raise InputError(f"{path / ADAPTER_CONFIG}: {field_name} must map module patterns to values, not {patterns!r}")
        for pattern, value in patterns.items():
            _compile(pattern, f"{path / ADAPTER_CONFIG}: {field_name} key")
            if not valid(value):
                raise InputError(f"{path / ADAPTER_CONFIG}: {field_name}[{pattern!r}] = {value!r} is not a valid {field_name.split('_')[0]}")
    for unsupported in ("use_dora", "lora_bias"):
        if config.get(unsupported):
            raise InputError(f"{path} uses {unsupported}=True, which mergelab cannot merge exactly; merge_and_unload it into a full checkpoint")
    return {k: v for k, v in config.items() if k not in TRAINING_ONLY}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _compile(pattern: str, where: str) -> re.Pattern[str]:
    """``re.compile`` with a one-line error naming where the bad expression came from."""
    try:
        return re.compile(pattern)
    except re.error as err:
        raise InputError(f"{where} {pattern!r} is not a regular expression ({err}); fix or quote it") from None


def _pattern_value(patterns: Mapping[str, Any], key: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first pattern matching a suffix of ``key``."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _scaling(config: Mapping[str, Any], peft_key: str, rank: int) -> tuple[float, float]:
    """(alpha, scaling) of one LoRA module: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, peft_key, config["lora_alpha"]))
    denom = math.sqrt(rank) if config.get("use_rslora") else rank
    return alpha, alpha / denom


@functools.cache
def mha_out_proj_factor() -> float:
    """How many times the installed PEFT applies an ``nn.MultiheadAttention`` out_proj LoRA delta.

    PEFT 0.21 merges the out_proj delta twice, in ``merge()`` and therefore in every forward
    pass too (huggingface/peft PR #3774). The model a user trained and evaluated is the one
    PEFT runs, so mergelab loads the effective update (factor x delta) and divides the factor
    out again when it writes an adapter. Measured on a 4-dim MHA, not assumed from a version.
    """
    from peft import LoraConfig, get_peft_model

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


def _target_param(peft_module: str, base: Mapping[str, Any]) -> str | None:
    """The base parameter a PEFT LoRA module updates (``attn`` on an MHA -> ``attn.in_proj_weight``)."""
    module = peft_module.replace(".base_layer", "")
    for candidate in (f"{module}.weight", f"{module}.in_proj_weight"):
        if candidate in base:
            return candidate
    return None


#: The sub-module of a whole checkpoint that an adapter trained on one tower sits under, by the
#: class PEFT records in ``auto_mapping.base_model_class``: open_clip's towers are ``model.visual``
#: (its text tower sits at the root under the same block names, so the names alone are ambiguous)
#: and, in a CustomTextCLIP, ``model.text``.
TOWER_PREFIXES: dict[str, str] = {"VisionTransformer": "visual.", "ModifiedResNet": "visual.", "TextTransformer": "text."}


def _module_prefix(base_module: str) -> str:
    """``--base-module visual`` as a parameter-name prefix (``visual.``; ``.`` or ``""``: the root)."""
    return "" if base_module.strip(".") == "" else base_module.strip(".") + "."


def _resolve_prefix(names: Sequence[str], base: Mapping[str, Any], where: Path, *,
                    base_module: str | None = None, tower: str | None = None) -> str:
    """The prefix under which the base holds the adapter's modules ('' or e.g. 'visual.').

    Adapters trained on a sub-module (open_clip's ``model.visual``) name parameters relative to
    it; the base may be the whole model. The prefix must cover every module; ``base_module``
    names it, otherwise it must be unique, or be the one the adapter's recorded ``tower`` class
    sits under (:data:`TOWER_PREFIXES`).
    """
    probe = names[0].replace(".base_layer", "") + "."
    prefixes = {k[: k.index(probe)] for k in base if probe in k and (k.startswith(probe) or f".{probe}" in k)}
    covering = sorted(p for p in prefixes if (p == "" or p.endswith(".")) and all(_target_param(p + n, base) for n in names))
    if base_module is not None:
        if _module_prefix(base_module) in covering:
            return _module_prefix(base_module)
        found = f"; it does under {', '.join(repr(p.rstrip('.') or '.') for p in covering)}" if covering else ""
        raise InputError(f"--base-module {base_module!r}: the base holds no module of adapter {where} there{found}")
    if len(covering) == 1:
        return covering[0]
    missing = [n for n in names if _target_param(n, base) is None]
    packed = next((n for n in missing if f"{n}.q_proj.weight" in base or any(k.endswith(f".{n}.q_proj.weight") for k in base)), None)
    if not covering and packed is not None:
        raise InputError(
            f"adapter {where} targets the packed attention {packed!r} (an nn.MultiheadAttention's in_proj_weight), the base "
            "has it split into q_proj / k_proj / v_proj (mergelab.model.split_attention); train the adapter on the split "
            "projections or on the MLP (c_fc, c_proj)"
        )
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


def _guess_param(peft_module: str, peft_modules: Sequence[str]) -> str:
    """Without a base model: the parameter name a PEFT module most likely updates."""
    if f"{peft_module}.base_layer.out_proj" in peft_modules:  # LoRA on an nn.MultiheadAttention
        return f"{peft_module}.in_proj_weight"
    return f"{peft_module.replace('.base_layer', '')}.weight"


def _load_adapter(
    name: str, path: Path, base: Mapping[str, Tensor] | None, keep: Callable[[str], bool], dtype: torch.dtype,
    base_module: str | None = None,
) -> TaskUpdate:
    config = _read_adapter_config(path)
    weights = _weights_file(path, ADAPTER_WEIGHTS)
    if weights is None:
        raise InputError(f"{path} has {ADAPTER_CONFIG} but no {' or '.join(ADAPTER_WEIGHTS)}; copy the adapter weights next to it")
    raw = _read_tensors(weights)
    factors: dict[str, dict[str, Tensor]] = {}
    for key, tensor in raw.items():
        short = key.removeprefix(PEFT_PREFIX)
        match = _LORA_KEY.match(short)
        if match is None:
            raise InputError(f"{weights} holds {key!r}, which is not a LoRA factor; mergelab reads plain LoRA adapters")
        factors.setdefault(match["module"], {})[match["kind"]] = tensor
    if not factors:
        raise InputError(f"{weights} holds no LoRA factors; is it a PEFT LoRA adapter?")
    peft_modules = sorted(factors)
    tower = (config.get("auto_mapping") or {}).get("base_model_class")
    prefix = _resolve_prefix(peft_modules, base, path, base_module=base_module, tower=tower) if base is not None else ""
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    modules: dict[str, Update] = {}
    meta_modules: dict[str, dict[str, Any]] = {}
    for peft_module in peft_modules:
        pair = factors[peft_module]
        embedding = "lora_embedding_A" in pair
        kinds = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        if set(pair) != set(kinds):
            raise InputError(f"{weights}: module {peft_module!r} has {sorted(pair)} but needs both {kinds[0]} and {kinds[1]}")
        param = _target_param(prefix + peft_module, base) if base is not None else _guess_param(peft_module, peft_modules)
        assert param is not None  # _resolve_prefix checked coverage
        if not keep(param):
            continue
        A, B = pair[kinds[0]], pair[kinds[1]]
        where = f"task {name!r}, module {param!r}"
        for what, t in (("lora_A", A), ("lora_B", B)):
            if t.dtype not in SUPPORTED_DTYPES:
                raise InputError(f"{where}: {what} has unsupported dtype {t.dtype}; save the adapter in float16, bfloat16 or float32")
            if t.ndim != 2:
                raise InputError(f"{where}: {what} has shape {tuple(t.shape)}; only Linear and Embedding LoRAs are supported")
        rank = A.shape[0]
        if rank == 0:
            raise InputError(f"{where}: rank 0 (lora_A has shape {tuple(A.shape)}); an adapter needs r >= 1")
        target_key = peft_module.split(".base_layer", 1)[0]
        alpha, scaling = _scaling(config, target_key, rank)
        peft_factor = mha_out_proj_factor() if param.endswith(".out_proj.weight") and ".base_layer.out_proj" in peft_module else 1.0
        scaling *= peft_factor
        try:
            if embedding or fan_in_fan_out:
                # Embedding (num_embeddings, dim) and Conv1D (in, out) weights: delta = (B A)^T.
                update = LowRank(A.T.to(dtype) * scaling, B.T.to(dtype))
            else:
                update = LowRank(B.to(dtype) * scaling, A.to(dtype))
        except InputError as err:
            raise InputError(f"{where}: {err}") from err
        if base is not None and update.shape != tuple(base[param].shape):
            raise InputError(
                f"{where}: update shape {update.shape} does not fit base parameter shape {tuple(base[param].shape)}; "
                "pass the base model the adapter was trained on"
            )
        modules[param] = update
        meta_modules[param] = {"peft_module": peft_module, "rank": rank, "alpha": alpha, "scaling": scaling,
                               "transposed": bool(embedding or fan_in_fan_out), "embedding": bool(embedding),
                               "peft_factor": peft_factor}
    if not modules:
        raise InputError(f"modules filter keeps none of adapter {path}'s {len(peft_modules)} modules")
    meta = {"format": "peft", "prefix": prefix, "adapter_config": config, "modules": meta_modules}
    return TaskUpdate(name=name, modules=modules, source=str(path), meta=meta)


def _load_full(
    name: str, path: Path, base: Mapping[str, Tensor], keep: Callable[[str], bool], dtype: torch.dtype
) -> TaskUpdate:
    if path.is_dir():
        found = _weights_file(path, FULL_WEIGHTS)
        if found is None:
            raise InputError(
                f"{path} is neither a PEFT adapter (no {ADAPTER_CONFIG}) nor a full checkpoint (no {' / '.join(FULL_WEIGHTS)}); "
                "pass an adapter directory or a .safetensors state dict"
            )
        path = found
    state = _read_tensors(path)
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
    dtype: torch.dtype = torch.float32,
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
        dtype: dtype of the loaded updates (float32 by default; SVD-based code upcasts further).
        base_module: the sub-module of a whole-model ``base`` that PEFT adapters were trained on
            (``"visual"``: open_clip's image tower); by default found from the names, or from the
            adapter's recorded base class when the names fit several (:data:`TOWER_PREFIXES`).
            Full checkpoints name their parameters in the base's own terms and ignore it.
    """
    pairs = _named_sources(sources, names)
    base_state = load_state_dict(base)
    patterns = [_compile(m, "modules pattern (--modules)") for m in modules or ()]
    keep = (lambda k: any(p.fullmatch(k) for p in patterns)) if patterns else (lambda k: True)
    tasks = []
    for name, path in pairs:
        tasks.append(_load_adapter(name, path, base_state, keep, dtype, base_module) if _is_adapter_dir(path)
                     else _load_full(name, path, base_state, keep, dtype))
    return TaskSet(tuple(tasks), _base_ref(base, base_state))


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
    if base is not None:
        return [describe(task) for task in load_taskset(base, sources, base_module=base_module)]
    tasks = []
    for name, path in _named_sources(sources, None):
        if not _is_adapter_dir(path):
            raise InputError(f"{path} is not a PEFT adapter directory (no {ADAPTER_CONFIG}); pass --base to inspect a full checkpoint")
        tasks.append(_load_adapter(name, path, None, lambda _: True, torch.float32))
    return [describe(task) for task in tasks]


# Writing -----------------------------------------------------------------------------------


def _publish_dir(out: Path, write: Callable[[Path], None], overwrite: bool) -> Path:
    """Write a directory under a temporary name next to ``out``, then rename it into place."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"output {out} already exists; choose another path or pass overwrite=True (CLI: --force)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        if out.exists() or out.is_symlink():
            _exchange(tmp, out)  # tmp now holds the old output
            _remove(tmp)
        else:
            os.replace(tmp, out)
    except BaseException:
        _remove(tmp)
        raise
    return out


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``): a kill at any point
    leaves the old output or the new one at ``b``, never neither. Elsewhere, two renames: a kill
    between them leaves the old output beside ``b`` as ``.<name>.old-*``."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        at_fdcwd, rename_exchange = -100, 2
        if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
            return
    except (AttributeError, OSError):
        pass
    old = Path(tempfile.mkdtemp(prefix=f".{b.name}.old-", dir=b.parent))
    os.replace(b, old / b.name)
    os.replace(a, b)
    os.replace(old / b.name, a)
    old.rmdir()


def _peft_layout(merged: MergedUpdate) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The adapter config template and per-parameter PEFT module info for writing an adapter."""
    peft = merged.meta.get("peft") or {}
    config = dict(peft.get("adapter_config") or {"peft_type": "LORA", "target_modules": None, "bias": "none"})
    layout = dict(peft.get("modules") or {})
    for param in merged.modules:
        if param not in layout:
            if not param.endswith(".weight"):
                raise InputError(f"cannot write {param!r} as a PEFT LoRA module (no template); save with format='weights'")
            layout[param] = {"peft_module": param.removesuffix(".weight"), "transposed": False, "embedding": False}
    return config, layout


def _adapter_tensors(merged: MergedUpdate, layout: Mapping[str, Mapping[str, Any]]) -> tuple[StateDict, dict[str, int]]:
    """PEFT adapter tensors (scaling 1) and the rank of every targeted module.

    Parameters that share one PEFT module (an MHA's packed in_proj and its out_proj) share its
    rank; the lower-rank factor is zero-padded, which leaves ``B @ A`` unchanged.
    """
    target = lambda p: layout[p]["peft_module"].split(".base_layer", 1)[0]  # noqa: E731
    ranks: dict[str, int] = {}
    for param, update in merged.modules.items():
        ranks[target(param)] = max(ranks.get(target(param), 0), update.rank)
    tensors: StateDict = {}
    for param, update in merged.modules.items():
        info = layout[param]
        B, A = (update.A.T, update.B.T) if info.get("transposed") else (update.B, update.A)
        B = B / info.get("peft_factor", 1.0)  # the installed PEFT multiplies it back (mha_out_proj_factor)
        r = ranks[target(param)]
        B = torch.cat([B, B.new_zeros(B.shape[0], r - B.shape[1])], dim=1).contiguous()
        A = torch.cat([A, A.new_zeros(r - A.shape[0], A.shape[1])], dim=0).contiguous()
        stem = PEFT_PREFIX + info["peft_module"]
        kind_a, kind_b = ("lora_embedding_A", "lora_embedding_B") if info.get("embedding") else ("lora_A.weight", "lora_B.weight")
        tensors[f"{stem}.{kind_a}"], tensors[f"{stem}.{kind_b}"] = A, B
    return tensors, ranks


def cap_rank(merged: MergedUpdate, max_rank: int) -> tuple[MergedUpdate, dict[str, float]]:
    """Every matrix module of rank above ``max_rank`` replaced by its best rank-``max_rank``
    approximation (Eckart–Young: the top singular triplets of ``ΔW``; from the factors by
    :func:`~mergelab.linalg.lowrank_svd` for a low-rank ``ΔW = B A``, by :func:`~mergelab.linalg.svd64`
    for a dense one), so the merge saves as a PEFT adapter that fits a server's ``max_lora_rank``
    (vLLM, LoRAX) even when the method returned dense updates (TIES in full space). Returns the
    capped merge (``meta["max_rank"]``, ``meta["rank_cap_error"]``) and per truncated module the
    relative error ``‖ΔW − ΔW_R‖_F / ‖ΔW‖_F = sqrt(Σ_{i>R} σ_i² / Σ σ_i²)``. Low-rank modules within
    the cap and non-matrix modules are kept as they are.
    """
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise InputError(f"--max-rank {max_rank!r} is not a rank; give an integer >= 1")
    modules: dict[str, Update] = dict(merged.modules)
    errors: dict[str, float] = {}
    for name, update in merged.modules.items():
        if (isinstance(update, LowRank) and update.rank <= max_rank) or len(update.shape) != 2:
            continue
        U, s, Vh = lowrank_svd(update.B, update.A, truncate=False) if isinstance(update, LowRank) else svd64(update.delta)
        total = float(s.square().sum())
        errors[name] = math.sqrt(float(s[max_rank:].square().sum()) / total) if total > 0 else 0.0
        modules[name] = LowRank((U[:, :max_rank] * s[:max_rank]).to(update.dtype), Vh[:max_rank].to(update.dtype))
    meta = {**merged.meta, "max_rank": max_rank, "rank_cap_error": errors}
    return MergedUpdate(modules, merged.base, meta), errors


def save_merged(
    merged: MergedUpdate,
    out: str | os.PathLike[str],
    *,
    format: Literal["peft", "weights"] = "peft",
    base: BaseLike | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Write a merged update as a PEFT LoRA adapter directory or as merged full weights.

    ``format="peft"`` needs every module low rank; the adapter's rank per module is the merged
    rank, ``lora_alpha = r`` (scaling 1, rsLoRA off) and the original adapters' target modules,
    ``task_type`` and ``base_model_name_or_path`` are kept. ``format="weights"`` needs ``base``
    and writes ``model.safetensors`` holding ``W_0 + delta`` for every base parameter.
    A ``merge.json`` with the merge's provenance goes into both.
    """
    info = {"method": merged.meta.get("method"), "space": merged.meta.get("space"),
            "space_options": merged.meta.get("space_options"),
            "hyper_parameters": merged.meta.get("hyper_parameters"), "tasks": merged.meta.get("tasks"),
            "base": merged.base.__dict__, "content_hash": merged.content_hash,
            **{k: merged.meta[k] for k in ("max_rank", "rank_cap_error") if k in merged.meta}}
    if format == "peft":
        dense = sorted(k for k, u in merged.modules.items() if not isinstance(u, LowRank))
        if dense:
            raise InputError(f"merged update has {len(dense)} dense modules (e.g. {dense[0]!r}), not a LoRA adapter; save with format='weights' (CLI: --format weights)")
        template, layout = _peft_layout(merged)
        tensors, ranks = _adapter_tensors(merged, layout)
        r = max(ranks.values())
        config = {**template, "r": r, "lora_alpha": r, "use_rslora": False, "lora_dropout": 0.0,
                  "rank_pattern": {k: v for k, v in ranks.items() if v != r}, "alpha_pattern": {k: v for k, v in ranks.items() if v != r},
                  "inference_mode": True}
        if not config.get("target_modules"):
            config["target_modules"] = sorted(ranks)

        def write(d: Path) -> None:
            save_file({k: v.to(dtype) for k, v in tensors.items()}, str(d / "adapter_model.safetensors"))
            (d / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
            (d / "merge.json").write_text(json.dumps(info, indent=2, default=str))

    elif format == "weights":
        if base is None:
            raise InputError("format='weights' needs the base model; pass base=... (CLI: --base)")
        weights = merged.apply(load_state_dict(base))

        def write(d: Path) -> None:
            save_file({k: v.contiguous() for k, v in weights.items()}, str(d / "model.safetensors"))
            (d / "merge.json").write_text(json.dumps(info, indent=2, default=str))

    else:
        raise InputError(f"unknown format {format!r}; choose 'peft' or 'weights'")
    return _publish_dir(Path(out), write, overwrite)
