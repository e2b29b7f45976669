"""``mergelab check``: a preflight of adapters, a base and task data from metadata only.

Nothing heavy loads: adapter configs are JSON, safetensors files are read by their header (the first ``8 + n``
bytes: names, dtypes and shapes), a base's shapes likewise, and data folders by file hashes; the values of the
adapters and the base are scanned for NaN / Inf from their raw bits (:func:`nonfinite_values`, in chunks: a
merge refuses them), without a tensor library. In seconds it reports per task the rank (and ``rank_pattern``),
``lora_alpha``, rsLoRA, the scaling, target modules and dtypes, and then what would stop or skew a merge:
modules not every task targets (a merge refuses them), factors that do not fit the base, adapters that a merge
of ``B A`` would get wrong (DoRA, ``lora_bias``, PEFT's ``bias`` option, a quantized base:
:data:`~mergelab.checkpoints.adapter_configs.UNMERGEABLE`), a config that disagrees with its tensors so that
PEFT would load another adapter (:func:`~mergelab.checkpoints.adapter_configs.config_disagreements`), mixed
dtypes, evaluation splits that hold no image, and images that sit in more than one evaluation split (a val
image that is also a test image makes selection on val see the test split; 004 §3's selection protocol assumes
disjoint splits).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergelab.checkpoints.adapter_configs import adapter_config, check_scaling, config_disagreements, unmergeable
from mergelab.checkpoints.files import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, FULL_WEIGHTS, LORA_KEY, PEFT_PREFIX, Source, is_adapter_dir,
                                        named_sources, read_tensors, weights_file)
from mergelab.checkpoints.modules import (check_declared_rank, guess_param, lora_targets, resolve_prefix, saved_names, target_param,
                                          target_views)
from mergelab.errors import InputError

if TYPE_CHECKING:
    from mergelab.config import StudySpec

__all__ = ["Preflight", "TaskReport", "check", "check_study", "empty_splits", "nonfinite_values", "split_images", "split_overlaps",
           "tensor_shapes"]

#: Splits whose images must be disjoint (the selection split and the reported one).
SPLITS = ("val", "test")


@dataclass(frozen=True)
class TaskReport:
    """One adapter as its metadata describes it."""

    task: str
    source: str
    rank: int
    rank_pattern: Mapping[str, int]
    alpha: float
    rslora: bool
    scaling: float  # lora_alpha / r (rsLoRA: / sqrt(r)); rank_pattern / alpha_pattern modules differ
    dtypes: list[str]
    modules: dict[str, dict[str, Any]]  # base parameter (or PEFT module) -> {"rank", "shape"}


@dataclass
class Preflight:
    """What ``check`` found: per-task reports and the problems (empty: ready to merge)."""

    tasks: list[TaskReport]
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"tasks": [t.__dict__ for t in self.tasks], "problems": self.problems, "notes": self.notes}


def tensor_shapes(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` of a safetensors file from its header alone; other formats are
    read (torch ``weights_only``), which loads them."""
    if path.suffix != ".safetensors":
        return {k: (str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in read_tensors(path).items()}
    entries, _ = _header(path)
    return {k: (dtype.lower(), shape) for k, (dtype, shape, _) in entries.items()}


def _header(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...], tuple[int, int]]], int]:
    """A safetensors file's header, ``{name: (dtype, shape, (start, end))}`` (data offsets), and where
    its data starts, checked against the file's size."""
    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        entries = {k: (str(v["dtype"]), tuple(v["shape"]), (int(v["data_offsets"][0]), int(v["data_offsets"][1])))
                   for k, v in header.items() if k != "__metadata__"}
        end = 8 + size + max((offsets[1] for _, _, offsets in entries.values()), default=0)
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError, OSError, AttributeError, KeyError, IndexError, TypeError,
            ValueError, OverflowError) as err:  # OverflowError: a header length beyond what a read can take (2^63)
        raise InputError(f"cannot read {path}: corrupt or truncated safetensors header ({type(err).__name__}); re-save it") from None
    if path.stat().st_size < end:
        raise InputError(f"{path} is truncated: its header places tensor data up to byte {end}, the file has "
                         f"{path.stat().st_size}; copy or re-save it whole")
    return entries, 8 + size


#: Floating-point dtypes of safetensors by their bits: the unsigned view and the exponent mask whose
#: bits are all set exactly for NaN and ±Inf.
_EXPONENT_BITS = {"F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80), "F32": ("<u4", 0x7F800000), "F64": ("<u8", 0x7FF0000000000000)}
#: Bytes read at a time when scanning values.
_CHUNK = 64 << 20


def nonfinite_values(path: Path) -> dict[str, int]:
    """``{name: count}`` of the floating-point tensors of a weights file that hold NaN or Inf values
    (a merge refuses them, as it would write them into its weights). A safetensors file is scanned
    from its raw bits in chunks (an all-ones exponent), so nothing loads a tensor library; another
    format is read (torch ``weights_only``)."""
    import numpy as np

    if path.suffix != ".safetensors":
        import torch

        return {k: int((~torch.isfinite(v)).sum()) for k, v in read_tensors(path).items()
                if v.is_floating_point() and not bool(torch.isfinite(v).all())}
    entries, data = _header(path)
    found: dict[str, int] = {}
    with path.open("rb") as f:
        for name, (dtype, _, (start, end)) in entries.items():
            bits = _EXPONENT_BITS.get(dtype.upper())
            if bits is None:
                continue
            view, mask = np.dtype(bits[0]), bits[1]
            f.seek(data + start)
            count, left = 0, end - start
            while left > 0:
                chunk = f.read(min(left, _CHUNK - _CHUNK % view.itemsize))
                if not chunk:
                    break
                left -= len(chunk)
                values = np.frombuffer(chunk[:len(chunk) - len(chunk) % view.itemsize], dtype=view)
                count += int(np.count_nonzero((values & view.type(mask)) == mask))
            if count:
                found[name] = count
    return found


def _nonfinite_problems(who: str, files: Sequence[Path]) -> list[str]:
    """One problem line for the first tensor of ``files`` holding NaN / Inf values (:func:`nonfinite_values`)."""
    for path in files:
        bad = nonfinite_values(path)
        if bad:
            name, count = next(iter(bad.items()))
            more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
            return [f"{who}: {path.name}: parameter {name!r} contains {count} NaN/Inf values{more}, which a merge would write into "
                    "its weights (a merge refuses it); re-export it from a finite state"]
    return []


#: A ``save_pretrained`` directory's index of sharded weights (large models: LLaMA-3-8B's four shards).
SHARD_INDEX = "model.safetensors.index.json"


def _base_shapes(files: Sequence[Path]) -> dict[str, tuple[int, ...]]:
    """The parameter shapes of a base's weights files (:func:`_base_files`), from their headers."""
    return {k: shape for path in files for k, (_, shape) in tensor_shapes(path).items()}


def _base_files(base: str | Path) -> list[Path]:
    """The weights file of ``base`` (a file or a model directory), or its shards (a sharded directory)."""
    path = Path(base)
    if path.is_dir() and weights_file(path, FULL_WEIGHTS) is None and (path / SHARD_INDEX).is_file():
        return _shards(path / SHARD_INDEX)
    if path.is_dir():
        found = weights_file(path, FULL_WEIGHTS)
        if found is None:
            raise InputError(f"--base {path} holds none of {', '.join(FULL_WEIGHTS)}; pass the base model's weights file")
        path = found
    if not path.is_file():
        raise InputError(f"--base {path} does not exist; pass the base model's weights file or directory")
    return [path]


def _shards(index: Path) -> list[Path]:
    """The shards of a sharded base (the index's ``weight_map`` names them)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise InputError(f"cannot read {index} ({type(err).__name__}); it must map every tensor to its shard (weight_map)") from None
    unsafe = [name for name in shards if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors")]
    if unsafe:
        raise InputError(f"{index} names the shard {unsafe[0]!r}; shards are .safetensors files beside the index")
    missing = [name for name in shards if not (index.parent / name).is_file()]
    if missing:
        raise InputError(f"{index} names {len(missing)} shard(s) that are not there (e.g. {missing[0]}); copy the whole model directory")
    return [index.parent / name for name in shards]


def _adapter_report(name: str, path: Path, base: Mapping[str, tuple[int, ...]] | None, base_module: str | None,
                    problems: list[str]) -> TaskReport:
    config = adapter_config(path)
    refused = unmergeable(config)
    problems += [f"{name}: {reason}" for reason in refused]
    weights = weights_file(path, ADAPTER_WEIGHTS)
    if weights is None:
        raise InputError(f"{path} has no {' or '.join(ADAPTER_WEIGHTS)}; copy the adapter weights next to its config")
    factors: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
    shapes = tensor_shapes(weights)
    problems += _nonfinite_problems(name, [weights])
    saved = saved_names(shapes, config)
    for key, entry in shapes.items():
        if key.removeprefix(PEFT_PREFIX) in saved:
            continue  # a task's own head (modules_to_save): kept per task, never merged
        match = LORA_KEY.match(key.removeprefix(PEFT_PREFIX))
        if match is None:
            if not refused:  # a DoRA magnitude vector: the feature's own line says it
                problems.append(f"{name}: {key!r} is neither a LoRA factor nor in the config's modules_to_save")
            continue
        factors.setdefault(match["module"], {})[match["kind"].replace("_embedding", "")] = entry
    peft_modules = sorted(factors)
    if peft_modules:
        problems += [f"{name}: {line}" for line in config_disagreements(config, lora_targets(peft_modules), sorted(saved))]
    tower = (config.get("auto_mapping") or {}).get("base_model_class")
    prefix = ""
    if base is not None and peft_modules:
        try:
            prefix = resolve_prefix(peft_modules, base, path, base_module=base_module, tower=tower)
        except InputError as err:
            problems.append(f"{name}: {err}")
            base = None
    modules: dict[str, dict[str, Any]] = {}
    for peft_module in peft_modules:
        pair = factors[peft_module]
        if set(pair) != {"lora_A", "lora_B"}:
            problems.append(f"{name}: module {peft_module!r} has {sorted(pair)}, needs lora_A and lora_B")
            continue
        (_, a_shape), (_, b_shape) = pair["lora_A"], pair["lora_B"]
        try:
            check_declared_rank(config, peft_module.split(".base_layer", 1)[0], a_shape[0], f"module {peft_module!r}")
        except InputError as err:
            problems.append(f"{name}: {err}")
        target = target_param(prefix + peft_module, base) if base is not None else guess_param(peft_module, peft_modules)
        shape = (b_shape[0], a_shape[-1])
        if base is not None and target is not None:
            views = [tuple(base[v]) for v in target_views(target, base)]  # a packed in_proj on split q/k/v: stacked rows
            held = (sum(v[0] for v in views), views[0][1]) if len(views) > 1 else views[0]
            if held not in (shape, shape[::-1]):  # (out, in); embeddings / Conv1D: (in, out)
                problems.append(f"{name}: {target} has shape {held} in the base, the LoRA gives {shape}")
        modules[target or peft_module] = {"rank": a_shape[0], "shape": list(shape)}
    rslora = bool(config.get("use_rslora"))
    scaling = check_scaling(float(config["lora_alpha"]), config["r"], rslora, str(path / ADAPTER_CONFIG))
    dtypes = sorted({dtype for pair in factors.values() for dtype, _ in pair.values()})
    return TaskReport(name, str(path), config["r"], dict(config.get("rank_pattern") or {}), float(config["lora_alpha"]),
                      rslora, scaling, dtypes, modules)


def split_images(data: Mapping[str, str | Path]) -> dict[tuple[str, str], list[Path]]:
    """The image files of every task's ``val`` and ``test`` split (``ROOT/<split>/<class>/<image>``),
    by ``(task, split)``; a root or split folder that is missing is an :class:`InputError`."""
    images: dict[tuple[str, str], list[Path]] = {}
    for task, root in data.items():
        root = Path(root)
        if not root.is_dir():
            raise InputError(f"--data {task}={root}: no such folder; give ROOT with ROOT/<split>/<class>/<image>")
        missing = [split for split in SPLITS if not (root / split).is_dir()]
        if missing:
            raise InputError(f"--data {task}={root} has no {' or '.join(missing)} split, so its overlap cannot be checked; "
                             f"give ROOT with ROOT/{'/, ROOT/'.join(SPLITS)}/<class>/<image>")
        for split in SPLITS:
            images[task, split] = sorted(p for p in (root / split).rglob("*") if p.is_file())
    return images


def empty_splits(images: Mapping[tuple[str, str], Sequence[Path]]) -> list[str]:
    """One line per split of :func:`split_images` that holds no image (nothing to select on or report)."""
    return [f"--data {task}: its {split} split holds no images, so a merge has nothing to {'select on' if split == 'val' else 'report'} "
            f"there; put them under ROOT/{split}/<class>/<image>" for (task, split), found in images.items() if not found]


def split_overlaps(images: Mapping[tuple[str, str], Sequence[Path]]) -> list[str]:
    """Images (by content hash) of :func:`split_images` that appear in more than one of the tasks'
    ``val`` / ``test`` splits, within a task or across tasks."""
    seen: dict[str, list[str]] = {}
    for (task, split), paths in images.items():
        for image in paths:
            seen.setdefault(hashlib.sha256(image.read_bytes()).hexdigest(), []).append(f"{task}/{split}")
    counts: dict[str, int] = {}
    for places in seen.values():
        if len(set(places)) > 1:
            where = " and ".join(sorted(set(places)))
            counts[where] = counts.get(where, 0) + 1
    return [f"{n} image(s) are in both {where}" for where, n in sorted(counts.items())]


def check(sources: Sequence[Source], *, base: str | Path | None = None, base_module: str | None = None,
          data: Mapping[str, str | Path] | None = None) -> Preflight:
    """The preflight report of ``sources`` (PEFT adapter directories; full checkpoints are listed
    by their tensor count), against ``base``'s shapes when given and with ``data``'s split overlap."""
    problems: list[str] = []
    notes: list[str] = []
    base_files = _base_files(base) if base is not None else None
    base_shapes = _base_shapes(base_files) if base_files is not None else None
    if base_files is not None:
        problems += _nonfinite_problems("base", base_files)
    reports = []
    named = named_sources(sources, None)
    unknown = sorted(set(data or {}) - {name for name, _ in named})
    if unknown:
        raise InputError(f"--data {unknown[0]}: no adapter is named {unknown[0]!r}; name one of the tasks "
                         f"{', '.join(name for name, _ in named)} (NAME=PATH names an adapter's task)")
    for name, path in named:
        if is_adapter_dir(path):
            reports.append(_adapter_report(name, path, base_shapes, base_module, problems))
        else:
            weights = path if path.is_file() else weights_file(path, FULL_WEIGHTS)
            if weights is None:
                raise InputError(f"{path} is neither a PEFT adapter nor a full checkpoint; pass an adapter directory or a state dict")
            notes.append(f"{name}: a full checkpoint ({len(tensor_shapes(weights))} tensors), merged as dense deltas")
    if reports:
        targets = [set(r.modules) for r in reports]
        common = set.intersection(*targets)
        partial = sorted(set.union(*targets) - common)
        if partial:
            problems.append(f"{len(partial)} module(s) are targeted by some tasks only (e.g. {partial[0]!r}); a merge needs "
                            f"the same modules in every task: restrict all to the {len(common)} common ones with --modules")
        dtypes = sorted({d for r in reports for d in r.dtypes})
        if len(dtypes) > 1:
            notes.append(f"the adapters mix dtypes {dtypes}; they are merged in float32")
    images = split_images(data or {})
    problems += empty_splits(images) + split_overlaps(images)
    return Preflight(reports, problems, notes)


def check_study(spec: StudySpec) -> Preflight:
    """``mergelab check --study``: the preflight of a real-model study's own files, before a GPU runs it.

    Every path the study names (the bench's base weights, each task's adapter or checkpoint and its
    data) must exist: a recipe whose placeholders are not yet replaced is one InputError naming them.
    Then :func:`check` of the tasks' adapters against the base's shapes (a base whose shapes cannot be
    read from metadata, such as a TorchScript archive, is a note and the adapters are checked alone);
    for ``ImageFolder`` tasks, the val / test splits (empty, overlapping) and the class folders
    against the task's class names; every prompt template must hold ``{}``.
    """
    from mergelab.bench import TaskSource

    tasks = spec.evaluated
    if not tasks or not all(isinstance(t, TaskSource) for t in tasks):
        raise InputError(f"check --study reads studies whose tasks are {{name, adapter, data}} entries (a real-model bench); "
                         f"the {spec.bench.kind} bench's tasks come with it")
    base = spec.bench.base_weights
    named = [("bench.weights", base)] if base is not None else []
    named += [(f"tasks: {t.name}.{field}", getattr(t, field)) for t in tasks for field in ("adapter", "checkpoint", "data")
              if getattr(t, field) is not None]
    missing = [f"{where} {path}" for where, path in named if not Path(path).exists()]
    if missing:
        raise InputError(f"{len(missing)} path(s) of study {spec.name} do not exist ({'; '.join(missing[:3])}"
                         f"{'; …' if len(missing) > 3 else ''}); replace the placeholders with your local files")
    notes: list[str] = []
    if base is not None:
        try:
            _base_shapes(_base_files(base))
        except InputError as err:
            notes.append(f"the base's shapes were not read from its metadata ({err}); the adapters are checked without them")
            base = None
    images = {t.name: Path(t.data) for t in tasks if spec.bench.image_folders and t.data is not None}
    carved = sorted(name for name, root in images.items() if not (root / "val").is_dir())
    if carved:
        notes.append(f"{', '.join(carved)}: no val folder, so val is carved from train (a seeded 20 %) and only test is checked")
    found = check([f"{t.name}={t.adapter or t.checkpoint}" for t in tasks], base=base,
                  data={name: root for name, root in images.items() if name not in carved})
    found.notes[:0] = notes
    for t in tasks:
        if t.name in images:
            found.problems += _class_folder_problems(t.name, images[t.name], t.classnames)
        found.problems += [f"{t.name}: template {template!r} has no {{}} for the class name" for template in t.templates or ()
                           if "{}" not in template]
    return found


def _class_folder_problems(task: str, root: Path, classnames: Sequence[str] | None) -> list[str]:
    """An ImageFolder task's class folders (sorted, as ``ImageFolder`` reads them) against its class names."""
    splits = {split: sorted(d.name for d in (root / split).iterdir() if d.is_dir())
              for split in ("train", "val", "test") if (root / split).is_dir()}
    if "train" not in splits or "test" not in splits:
        return [f"{task}: {root} lacks the split folder(s) {[s for s in ('train', 'test') if s not in splits]}; "
                "lay it out as ROOT/<split>/<class>/<image>"]
    problems = [f"{task}: {root / split} has {len(folders)} class folders, train has {len(splits['train'])}; every split needs "
                "the same class folders" for split, folders in splits.items() if folders != splits["train"]]
    if classnames is not None and len(classnames) != len(splits["train"]):
        problems.append(f"{task}: {len(classnames)} class names for {len(splits['train'])} class folders in {root / 'train'}; the "
                        "names are read in the folders' sorted order, one per folder")
    return problems
