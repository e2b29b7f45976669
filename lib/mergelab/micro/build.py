"""``build_micro``: the micro benchmark built through the store, exported to ``data/micro`` (issue 3).

Steps, each published under a content key (producer, version, inputs) so a rerun is a no-op:

1. ``micro.pretrain``: the tiny open_clip CLIP contrastively pre-trained on the mixture of the
   tasks' ``pretrain`` splits (never their val / test images), and its closed vocabulary;
2. ``micro.lora``: one PEFT LoRA adapter per task and rank (16 and 4), frozen zero-shot heads;
3. ``micro.dense``: fully fine-tuned encoders + decoders of the dense suite, with per-task
   lengths and learning rates (imbalanced task-vector norms, 004 Fig. 5);
4. ``micro.eval``: zero-shot and fine-tuned accuracies (adapters read back through
   ``load_taskset``, exactly as users load them), joint Hits@k, dense metrics and task-vector norms.

The export (:mod:`mergelab.micro.export`) writes ``base/``, ``adapters/r{rank}/<task>/``, ``dense/<task>/``,
``manifest.json`` and a ``README.md``.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergelab.checkpoints import load_taskset
from mergelab.micro.benchmark import aliases, dense_suite, micro_tasks, pretrain_captions
from mergelab.data.tasks import ClassificationTask
from mergelab.errors import InputError
from mergelab.evaluation.dense import KINDS, dense_features, dense_metric, make_decoder, refit_score
from mergelab.evaluation.heads import task_head
from mergelab.evaluation.metrics import evaluate_task, joint_hits
from mergelab.finetuning import config_dict
from mergelab.micro.artifacts import micro_backbone
from mergelab.micro.config import CONFIGS, BuildConfig, BuildRun, Progress
from mergelab.micro.export import build_manifest, check_out, export_micro, split_dense, write_adapters
from mergelab.micro.training import DenseConfig, PretrainConfig, contrastive_pretrain, finetune_dense, finetune_lora
from mergelab.model.openclip_backend import OpenClipBackbone
from mergelab.model.tokenizer import ClosedVocabTokenizer
from mergelab.store import Store

__all__ = ["CONFIGS", "BuildConfig", "BuildResult", "build_micro", "finetuned_accuracies", "ticker"]

#: Bumped whenever a producer's code changes what it makes (enters every content key).
VERSION = "2"

def ticker(progress: Progress, description: str, total: int) -> Callable[[], None]:
    """A callable that advances a new ``total``-step bar of ``progress`` (a no-op without one)."""
    if progress is None:
        return lambda: None
    task_id = progress.add_task(description, total=total)
    return lambda: progress.advance(task_id)


# Pre-training -------------------------------------------------------------------------------------


def build_tokenizer(tasks: Mapping[str, ClassificationTask], captions: Sequence[str]) -> ClosedVocabTokenizer:
    """The closed vocabulary of every evaluation prompt of the tasks and every pre-training caption."""
    texts = [p for t in tasks.values() for c in t.classnames for p in t.prompts(c)] + list(captions)
    return ClosedVocabTokenizer.from_texts(texts, context_length=16)


def pretrain_mixture(tasks: Mapping[str, ClassificationTask], config: PretrainConfig, seed: int) -> tuple[np.ndarray, list[str]]:
    """Images of every task's ``pretrain`` split and their captions (a seeded subset of classes is named
    by its class name, the others by made-up aliases)."""
    images, captions = [], []
    for index, task in enumerate(tasks.values()):
        rng = np.random.default_rng([seed, index, 99])
        seen = np.zeros(task.num_classes, dtype=bool)
        seen[rng.permutation(task.num_classes)[: max(1, round(config.seen_fraction * task.num_classes))]] = True
        split = task.split("pretrain")
        images.append(split.images)
        captions += pretrain_captions(task, np.asarray(split.labels), seen, aliases(task.num_classes, rng), rng, config.name_prob)
    return np.concatenate(images), captions


def _pretrained(run: BuildRun[BuildConfig], tasks: Mapping[str, ClassificationTask]) -> tuple[str, str, OpenClipBackbone]:
    """(weights key, vocabulary key, backbone), pre-training when the store lacks them."""
    inputs = {"config": config_dict(run.config.pretrain), "seed": run.seed, "profile": run.config.profile, "tasks": list(tasks),
              **({"vision": run.config.vision} if run.config.vision else {})}
    key, vocab_key = run.store.key("micro.pretrain", VERSION, **inputs), run.store.key("micro.vocab", VERSION, **inputs)
    if not run.store.exists(key):
        start = time.perf_counter()
        images, captions = pretrain_mixture(tasks, run.config.pretrain, run.seed)
        tokenizer = build_tokenizer(tasks, captions)
        backbone = micro_backbone(tokenizer, seed=run.seed, vision=run.config.vision)
        tick = ticker(run.progress, f"pre-training on {len(captions)} image-caption pairs", run.config.pretrain.steps)
        state = contrastive_pretrain(backbone, images, captions, run.config.pretrain, tick)
        run.store.put_json(vocab_key, tokenizer.to_json())
        run.store.put_tensors(key, state, attrs={"wall_time_s": time.perf_counter() - start, "pairs": len(captions)})
    tokenizer = ClosedVocabTokenizer.from_json(run.store.get_json(vocab_key))
    return key, vocab_key, micro_backbone(tokenizer, state=run.store.get_tensors(key), vision=run.config.vision)


# Fine-tuning ----------------------------------------------------------------------------------------


def _adapters(run: BuildRun[BuildConfig], backbone: OpenClipBackbone, base_key: str,
              tasks: Mapping[str, ClassificationTask]) -> dict[int, dict[str, tuple[str, str]]]:
    """``{rank: {task: (tensors key, config key)}}``, training what the store lacks."""
    out: dict[int, dict[str, tuple[str, str]]] = {}
    pretrain = {n: t.split("pretrain").images for n, t in tasks.items()} if run.config.consistency > 0 else {}

    def outside(name: str) -> np.ndarray | None:
        """The other tasks' pre-training images (the consistency term's inputs), built per run."""
        return np.concatenate([images for n, images in pretrain.items() if n != name]) if pretrain else None

    for rank in run.config.ranks:
        out[rank] = {}
        for index, (name, task) in enumerate(tasks.items()):
            lora = run.config.lora(rank, run.seed * 1000 + index)
            inputs = {"base": base_key, "task": name, "config": config_dict(lora)}
            key, cfg_key = run.store.key("micro.lora", VERSION, **inputs), run.store.key("micro.lora.config", VERSION, **inputs)
            if not run.store.exists(key):
                start = time.perf_counter()
                tensors, adapter_config = finetune_lora(backbone, task, task_head(backbone, task), lora,
                                                        ticker(run.progress, f"LoRA r{rank} on {name}", lora.steps),
                                                        outside=outside(name))
                run.store.put_json(cfg_key, adapter_config)
                run.store.put_tensors(key, tensors, attrs={"wall_time_s": time.perf_counter() - start})
            out[rank][name] = (key, cfg_key)
    return out


def _dense(run: BuildRun[BuildConfig], backbone: OpenClipBackbone, base_key: str) -> dict[str, str]:
    """``{dense task: key}`` of fully fine-tuned encoders (``encoder.*``) and decoders (``decoder.*``); none
    when the config has no dense tasks (a build-variant probe, ``benchmarks/variants.py``)."""
    out = {}
    for index, (name, task) in enumerate(dense_suite(run.seed, run.config.profile).items()):
        if name not in run.config.dense:
            continue
        dense = DenseConfig(**{**config_dict(run.config.dense[name]), "seed": run.seed * 1000 + index})
        key = run.store.key("micro.dense", VERSION, base=base_key, task=name, config=config_dict(dense), profile=run.config.profile)
        if not run.store.exists(key):
            start = time.perf_counter()
            tick = ticker(run.progress, f"fine-tuning the encoder for {name}", dense.steps)
            encoder, decoder = finetune_dense(backbone, task, dense, tick)
            tensors = {**{f"encoder.{k}": v for k, v in encoder.items()}, **{f"decoder.{k}": v for k, v in decoder.items()}}
            run.store.put_tensors(key, tensors, attrs={"wall_time_s": time.perf_counter() - start})
        out[name] = key
    return out


# Evaluation -----------------------------------------------------------------------------------------


def finetuned_accuracies(backbone: OpenClipBackbone, tasks: Mapping[str, ClassificationTask], adapter_dirs: Mapping[str, Path],
                         split: str = "test") -> dict[str, float]:
    """Each task's accuracy with its own adapter, loaded through ``load_taskset`` and applied to the base."""
    base = backbone.base_state()
    taskset = load_taskset(base, [(name, adapter_dirs[name]) for name in tasks])
    out = {}
    for task in taskset:
        params = {k: base[k] + u.dense() for k, u in task.modules.items()}
        out[task.name] = evaluate_task(backbone, tasks[task.name], params, split)
    return out


def _dense_metrics(run: BuildRun[BuildConfig], backbone: OpenClipBackbone, dense_keys: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    base = backbone.base_state()
    out = {}
    for name, task in dense_suite(run.seed, run.config.profile).items():
        if name not in dense_keys:
            continue
        encoder, decoder_state = split_dense(run.store.get_tensors(dense_keys[name]))
        decoder = make_decoder(backbone, task)
        decoder.load_state_dict(decoder_state)
        images, targets = task.tensors("test")
        with torch.no_grad():
            own = dense_metric(decoder.eval(), dense_features(backbone, images, task, encoder), targets, task)
        norm = math.sqrt(sum(float((encoder[k].double() - base[k].double()).pow(2).sum()) for k in base if base[k].is_floating_point()))
        kind = KINDS[task.kind]
        out[name] = {"kind": task.kind, "metric": kind.metric_name, "higher_is_better": kind.higher_is_better,
                     "base_refit": refit_score(backbone, task, None, steps=run.config.refit_steps, seed=run.seed),
                     "finetuned_refit": refit_score(backbone, task, encoder, steps=run.config.refit_steps, seed=run.seed),
                     "finetuned_own_decoder": own, "task_vector_norm": norm}
    return out


def _evaluate(run: BuildRun[BuildConfig], backbone: OpenClipBackbone, base_key: str, tasks: Mapping[str, ClassificationTask],
              adapters: Mapping[int, Mapping[str, tuple[str, str]]], dense_keys: Mapping[str, str]) -> str:
    adapter_keys = {str(r): {t: k for t, (k, _) in per.items()} for r, per in adapters.items()}
    key = run.store.key("micro.eval", VERSION, base=base_key, adapters=adapter_keys, dense=dict(dense_keys), refit=run.config.refit_steps)
    if run.store.exists(key):
        return key
    start = time.perf_counter()
    tick = ticker(run.progress, "evaluating", 3 + len(adapters))
    result: dict[str, Any] = {"zero_shot": {name: evaluate_task(backbone, task) for name, task in tasks.items()}}
    tick()
    result["joint_zero_shot"] = joint_hits(backbone, list(tasks.values()))
    tick()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = write_adapters(run.store, adapters, Path(tmp))
        result["finetuned"] = {}
        for rank in adapters:
            result["finetuned"][str(rank)] = finetuned_accuracies(backbone, tasks, dirs[rank])
            tick()
    result["dense"] = _dense_metrics(run, backbone, dense_keys)
    tick()
    run.store.put_json(key, result, attrs={"wall_time_s": time.perf_counter() - start})
    return key


@dataclass
class BuildResult:
    manifest: dict[str, Any]
    wrote: bool
    elapsed_s: float = field(default=0.0)


def build_micro(out: str | Path = "data/micro", store: Store | str | None = None, *, profile: str | BuildConfig = "full", seed: int = 0,
                threads: int = 1, progress: Progress = None) -> BuildResult:
    """Build (or reuse from the store) every micro-benchmark artifact and export it to ``out``.

    ``profile``: a name of :data:`CONFIGS` or a whole :class:`BuildConfig` (a build variant).
    ``threads`` is torch's intra-op thread count while building: 1 by default, because on a
    shared 2-core machine two threads per process oversubscribe the cores and run several times
    slower than one. Returns the manifest and whether files were written (False when ``out`` was
    already up to date).
    """
    if not isinstance(profile, BuildConfig) and profile not in CONFIGS:
        raise InputError(f"unknown build profile {profile!r}; choose one of {sorted(CONFIGS)} (CLI: --quick for 'quick')")
    if threads < 1:
        raise InputError(f"threads = {threads}; pass a positive thread count (CLI: --threads)")
    check_out(Path(out))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        config = profile if isinstance(profile, BuildConfig) else CONFIGS[profile]
        return _build(Path(out), BuildRun(store if isinstance(store, Store) else Store(store), config, seed, progress))
    finally:
        torch.set_num_threads(previous)


def _build(out: Path, run: BuildRun[BuildConfig]) -> BuildResult:
    start = time.perf_counter()
    tasks = micro_tasks(run.seed, run.config.profile)
    base_key, vocab_key, backbone = _pretrained(run, tasks)
    adapters = _adapters(run, backbone, base_key, tasks)
    dense_keys = _dense(run, backbone, base_key)
    eval_key = _evaluate(run, backbone, base_key, tasks, adapters, dense_keys)
    manifest = build_manifest(run, base_key, adapters, dense_keys, eval_key, tasks)
    current = out / "manifest.json"
    if current.is_file() and json.loads(current.read_text()) == json.loads(json.dumps(manifest)) and (out / "README.md").is_file():
        return BuildResult(manifest, False, time.perf_counter() - start)
    export_micro(out, run.store, manifest, base_key, run.store.get_json(vocab_key), adapters, dense_keys)
    return BuildResult(manifest, True, time.perf_counter() - start)
