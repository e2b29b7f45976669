"""The micro benchmark written out of the store (:func:`mergelab.micro.build.build_micro`'s export).

The export writes ``base/``, ``adapters/r{rank}/<task>/``, ``dense/<task>/``, ``manifest.json`` and a
``README.md`` whose numbers are the micro benchmark's own.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mergelab.data.tasks import ClassificationTask
from mergelab.errors import InputError
from mergelab.micro.artifacts import vision_cfg, write_adapter, write_backbone, write_tensors
from mergelab.micro.config import BuildConfig, BuildRun
from mergelab.micro.readme import render_readme
from mergelab.model.tokenizer import ClosedVocabTokenizer
from mergelab.store import Store

__all__ = ["DEFAULT_RANK", "VARIANTS_FILE", "build_manifest", "check_out", "export_micro", "split_dense", "wall_time", "write_adapters",
           "write_readme"]

#: The build-variant search's record beside the exported benchmark (``benchmarks/variants.py``).
VARIANTS_FILE = "variants.json"
#: The rank of the default adapter set: r/d = 4/96 = 1/24 and T·r/d = 32/96 = 1/3.
DEFAULT_RANK = 4


def split_dense(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A stored dense checkpoint's tensors split into its encoder's and its decoder's (``encoder.`` / ``decoder.`` prefixes off)."""
    encoder = {k.removeprefix("encoder."): v for k, v in tensors.items() if k.startswith("encoder.")}
    decoder = {k.removeprefix("decoder."): v for k, v in tensors.items() if k.startswith("decoder.")}
    return encoder, decoder


def write_adapters(store: Store, adapters: Mapping[int, Mapping[str, tuple[str, str]]], root: Path,
                   dtypes: Mapping[int, torch.dtype] | None = None) -> dict[int, dict[str, Path]]:
    """The stored adapters ``{rank: {task: (tensors key, config key)}}`` as PEFT directories ``root/r{rank}/<task>``,
    each rank's tensors in ``dtypes[rank]`` where given (as trained otherwise)."""
    paths: dict[int, dict[str, Path]] = {}
    for rank, per_task in adapters.items():
        paths[rank] = {}
        dtype = (dtypes or {}).get(rank)
        for name, (key, cfg_key) in per_task.items():
            paths[rank][name] = root / f"r{rank}" / name
            tensors = store.get_tensors(key)
            write_adapter(paths[rank][name], tensors if dtype is None else {k: v.to(dtype) for k, v in tensors.items()},
                          store.get_json(cfg_key))
    return paths


def wall_time(store: Store, key: str) -> float:
    """The seconds the producer of ``key`` recorded (0 when it recorded none)."""
    return float(store.info(key).attrs.get("wall_time_s", 0.0))


def build_manifest(run: BuildRun[BuildConfig], base_key: str, adapters: Mapping[int, Mapping[str, tuple[str, str]]],
                   dense_keys: Mapping[str, str], eval_key: str, tasks: Mapping[str, ClassificationTask]) -> dict[str, Any]:
    """``manifest.json`` of a build: its config, where each artifact is exported and under which key, the tasks, the
    evaluation's metrics and each step's recorded wall time."""
    timings = {"pretrain": wall_time(run.store, base_key),
               "lora": sum(wall_time(run.store, k) for per in adapters.values() for k, _ in per.values()),
               "dense": sum(wall_time(run.store, k) for k in dense_keys.values()),
               "evaluation": wall_time(run.store, eval_key)}
    return {
        "format": 1, "profile": run.config.profile, "seed": run.seed, "config": run.config.as_dict(),
        "base": {"dir": "base", "key": base_key},
        "adapters": {**{str(r): {t: f"adapters/r{r}/{t}" for t in per} for r, per in adapters.items()},
                     "mixed": {t: f"adapters/r{r}/{t}" for t, r in run.config.mixed(list(tasks)).items()}},
        "default_rank": DEFAULT_RANK,
        "adapter_keys": {str(r): {t: k for t, (k, _) in per.items()} for r, per in adapters.items()},
        "dense": {t: {"dir": f"dense/{t}", "key": k} for t, k in dense_keys.items()},
        "tasks": {name: {"analogue": task.analogue, "source": task.source, "num_classes": task.num_classes}
                  for name, task in tasks.items()},
        "metrics": run.store.get_json(eval_key), "eval_key": eval_key,
        "timings_s": {k: round(v, 1) for k, v in timings.items()}, "build_time_s": round(sum(timings.values()), 1),
    }


def export_micro(out: Path, store: Store, manifest: Mapping[str, Any], backbone_key: str, vocab: Mapping[str, Any],
                 adapters: Mapping[int, Mapping[str, tuple[str, str]]], dense_keys: Mapping[str, str]) -> None:
    """Write the built benchmark from the store into ``out`` (layout: module docstring), the README last.

    It takes 7 parameters: the folder, the store and the manifest, and what it writes from the store: the backbone's
    key, the vocabulary, the adapters' and the dense checkpoints' keys."""
    write_backbone(out / "base", store.get_tensors(backbone_key), ClosedVocabTokenizer.from_json(vocab),
                   vision_cfg(manifest["config"].get("vision_layers")))
    write_adapters(store, adapters, out / "adapters")
    for name, key in dense_keys.items():
        encoder, decoder = split_dense(store.get_tensors(key))
        write_tensors(out / "dense" / name / "model.safetensors", encoder)
        write_tensors(out / "dense" / name / "decoder.safetensors", decoder)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    write_readme(out, manifest)


def write_readme(out: Path, manifest: Mapping[str, Any]) -> None:
    """``out/README.md`` from the manifest, the artifacts' size and the variant search's record beside them
    (``variants.json``, written by ``benchmarks/variants.py``), when there is one."""
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and p.name not in ("README.md", VARIANTS_FILE))
    variants = json.loads((out / VARIANTS_FILE).read_text()) if (out / VARIANTS_FILE).is_file() else None
    (out / "README.md").write_text(render_readme(manifest, size, variants))


def check_out(out: Path) -> None:
    """Refuse, before any work, an ``out`` that exists and is not a micro benchmark folder (the export
    writes ``README.md``, ``manifest.json``, ``base/``, ``adapters/`` and ``dense/`` into it)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.json").is_file())):
        raise InputError(f"{out} exists and is not a micro benchmark folder (no manifest.json); pass --out a new or empty folder")
