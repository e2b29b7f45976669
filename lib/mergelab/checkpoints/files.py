"""Checkpoint files: tensors from safetensors / torch files, base weights, named sources, Gram matrices (adapter configs:
:mod:`mergelab.checkpoints.adapter_configs`)."""

from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Union

from safetensors import SafetensorError

from mergelab.errors import InputError
from mergelab.hashing import content_hash
from mergelab.strict import safe_name

if TYPE_CHECKING:  # torch loads with the first tensor: `mergelab check` reads names, configs and headers only
    from torch import Tensor, nn

    from mergelab.taskset import BaseRef, TaskSet

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "FULL_WEIGHTS", "LORA_KEY", "PEFT_PREFIX", "BaseLike", "Source", "StateDict", "base_ref",
           "check_finite", "is_adapter_dir", "load_grams", "load_state_dict", "named_sources", "read_tensors", "weights_file"]

StateDict = dict[str, "Tensor"]
Source = str | os.PathLike[str] | tuple[str, "str | os.PathLike[str]"]
BaseLike = Union[str, os.PathLike[str], Mapping[str, "Tensor"], "nn.Module"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
FULL_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?(?:\.weight)?$")

# Reading tensors ---------------------------------------------------------------------------


#: First bytes of a torch.save file: a zip archive (torch >= 1.6) or a legacy pickle stream.
_TORCH_MAGIC = (b"PK", b"\x80\x02")


def read_tensors(path: Path) -> StateDict:
    """Read a safetensors or torch-pickle file into a CPU state dict, turning failures into InputError."""
    import torch
    from safetensors.torch import load_file

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
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path} does not hold a flat state dict of tensors; save it with safetensors.torch.save_file")
    return dict(state)


def weights_file(directory: Path, candidates: Sequence[str], what: str | None = None) -> Path | None:
    """The first of ``candidates`` in ``directory`` (the order PEFT and transformers prefer: safetensors
    first). With ``what`` (``"adapter 'digits'"``), one warning when the folder holds other weights that are
    not read: another candidate or another ``.safetensors`` file (which holds nothing but tensors)."""
    found = next((directory / name for name in candidates if (directory / name).is_file()), None)
    if found is not None and what is not None:
        held = {name for name in candidates if (directory / name).is_file()} | {p.name for p in directory.glob("*.safetensors") if p.is_file()}
        others = sorted(held - {found.name})
        if others:
            warnings.warn(f"{what} at {directory} holds {found.name} and {', '.join(others)}; reading {found.name} only, as "
                          "PEFT / transformers do; remove the others or pass the weights file itself", UserWarning, stacklevel=3)
    return found


def load_state_dict(base: BaseLike, what: str = "base model") -> StateDict:
    """A base model's state dict from a module, a mapping, a weights file or a directory holding one,
    checked finite (:func:`check_finite`; ``what`` names it in the error)."""
    from torch import nn

    if isinstance(base, nn.Module):
        state = {k: v.detach() for k, v in base.state_dict().items()}
    elif isinstance(base, Mapping):
        state = dict(base)
    else:
        state = read_tensors(_weights_path(Path(base)))
    check_finite(state, what if isinstance(base, (nn.Module, Mapping)) else f"{what} {base}")
    return state


def _weights_path(path: Path) -> Path:
    """A base model's weights file: ``path`` itself, or the weights file in the directory ``path``."""
    if not path.exists():
        raise InputError(f"base model path {path} does not exist; pass a weights file or a directory with model.safetensors")
    if path.is_dir():
        found = weights_file(path, FULL_WEIGHTS, "base model")
        if found is None:
            raise InputError(f"{path} holds none of {', '.join(FULL_WEIGHTS)}; pass the weights file itself")
        path = found
    return path


_BASE_HASHES: dict[tuple[str, int, int], str] = {}


def base_ref(base: BaseLike, state: StateDict) -> BaseRef:
    from torch import nn

    from mergelab.taskset import BaseRef

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


def named_sources(sources: Sequence[Source], names: Sequence[str] | None) -> list[tuple[str, Path]]:
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
                if not rest:
                    raise InputError(f"{text!r} names task {name!r} but gives no path; write NAME=PATH")
                path = Path(rest)
            else:
                path = Path(text)
                name = path.stem if path.is_file() else path.name
        if names is not None:
            name = names[i]
        if not path.exists():
            raise InputError(f"source {path} does not exist; check the path (NAME=PATH names a task)")
        try:
            safe_name(name, "task name", "it names the task in records and output folders; name the task with NAME=PATH")
        except ValueError as err:
            raise InputError(str(err)) from None
        if name in (n for n, _ in pairs):
            raise InputError(f"duplicate task names: two sources are named {name!r}; name each task once (NAME=PATH)")
        pairs.append((name, path))
    if names is not None and len(names) != len(sources):
        raise InputError(f"{len(names)} names for {len(sources)} sources; give one name per source")
    return pairs


def is_adapter_dir(path: Path) -> bool:
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


def check_finite(state: Mapping[str, Tensor], what: str) -> None:
    """Raise :class:`InputError` naming the first floating-point tensor of ``state`` holding a NaN or
    an Inf (a merge would write it into the merged weights), as adapters are checked."""
    import torch

    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise InputError(f"{what}: parameter {key!r} contains {bad} NaN/Inf values, which a merge would write into its "
                             "weights; re-export it from a finite state")


def load_grams(path: Path, taskset: TaskSet) -> dict[str, dict[str, Tensor]]:
    """A safetensors file of ``"<task>::<module>"`` Gram matrices (RegMean's inputs) -> ``{task: {module: G}}``."""
    if not Path(path).is_file():
        raise InputError(f"--grams {path} is not a file; pass a safetensors file of '<task>::<module>' Gram matrices")
    grams: dict[str, dict[str, Tensor]] = {name: {} for name in taskset.names}
    for key, tensor in load_state_dict(path, "--grams").items():
        task, sep, module = key.partition("::")
        if not sep or task not in grams:
            raise InputError(f"--grams {path}: key {key!r} is not '<task>::<module>' for a task in {list(taskset.names)}")
        grams[task][module] = tensor
    return grams
