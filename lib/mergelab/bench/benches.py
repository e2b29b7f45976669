"""Benchmarks a study runs on: a backbone, its tasks and their adapters.

``BENCHES[kind](spec, tasks)`` builds a :class:`Bench` from the study's ``bench:`` section and
its ``tasks:`` list:

* ``micro``: the shipped micro benchmark (``data/micro``, built by ``mergelab build-micro``);
  ``tasks`` optionally names a subset of its eight tasks.
* ``open_clip``: an open_clip architecture (``arch``, e.g. ``ViT-B-32``) with local pretrained
  ``weights``; every task gives its PEFT ``adapter`` (or full ``checkpoint``) and an
  ``ImageFolder`` ``data`` root.
* ``hf_clip``: a local ``transformers`` ``CLIPModel`` directory as ``weights`` (adapters on its
  ``CLIPVisionModel`` attention projections, the KnOTS layout), tasks as for ``open_clip``.
* ``hf_seq_cls``: a local ``AutoModelForSequenceClassification`` directory (a decoder classifier
  with a ``score`` head, e.g. LLaMA; 001 Tab. 2, 003 Tab. 2) as ``weights``; every task gives its
  PEFT ``adapter``, whose ``modules_to_save`` hold the task's own trained head, and a ``data``
  folder of ``{train,val,test}.{csv,jsonl}`` rows (text, label). Merging merges the LoRA part;
  each task is evaluated with its own head.

Nothing here downloads anything: every path is local.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from mergelab.data.tasks import ClassificationTask
from mergelab.errors import InputError
from mergelab.hashing import content_hash
from mergelab.registry import Registry
from mergelab.strict import Int, Strict, safe_name
from mergelab.taskset import TaskSet

if TYPE_CHECKING:
    from torch import Tensor

    from mergelab.model import Backbone

__all__ = ["BENCHES", "Bench", "BenchSpec", "TaskSource", "load_bench"]


class TaskSource(Strict):
    """One task of a real-model study: its adapter (or full checkpoint) and its data folder."""

    name: str
    adapter: Path | None = None
    checkpoint: Path | None = None
    data: Path | None = None
    classnames: list[str] | None = None
    templates: list[str] | None = None

    @field_validator("name")
    @classmethod
    def _safe(cls, name: str) -> str:
        return safe_name(name, "task name")

    @model_validator(mode="after")
    def _one_source(self) -> TaskSource:
        if (self.adapter is None) == (self.checkpoint is None):
            raise ValueError("give exactly one of adapter or checkpoint")
        return self


class BenchSpec(Strict):
    """Where the model and tasks come from: ``micro`` (the shipped benchmark), ``open_clip`` or
    ``hf_clip`` (local weights + ImageFolder task data), ``hf_seq_cls`` (a local sequence
    classifier + text task data). ``rank``: the micro adapter set (a rank, ``mixed``, or ``None``
    for the benchmark's default set); ``max_length``: the token length of ``hf_seq_cls`` inputs."""

    kind: str = "micro"
    root: Path = Path("data/micro")
    rank: Int | Literal["mixed"] | None = None
    arch: str | None = None
    weights: Path | None = None
    image_size: Int | None = None
    max_length: Int = Field(128, ge=1)  # hf_seq_cls: the token length texts are padded / truncated to

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        BENCHES.require(kind)
        return kind


@dataclass(eq=False)
class Bench:
    """A backbone, its classification tasks (in task order) and each task's checkpoint source.

    :attr:`data_id` identifies everything evaluation depends on besides the merged encoder
    weights, from two parts: ``model_id`` (the whole pre-trained model, whose text tower builds
    the heads, and the bench's settings) and ``task_ids`` (per task: its data, class names and
    templates, and its own head where it brings one). Store keys of evaluations include it. It
    follows :attr:`tasks`, so a bench narrowed to some tasks (:func:`mergelab.onbench.bench_for`)
    has the id of a study of those tasks, and both share their evaluations. ``heads``: each task's
    trained ``(C, D)`` classifier head (``hf_seq_cls``), or ``None`` for zero-shot heads built from
    the class names. ``dtype``: the encoder's, when a study places it in another than float32.
    """

    name: str
    backbone: Backbone
    tasks: dict[str, ClassificationTask]
    sources: list[tuple[str, Path]]
    model_id: dict[str, Any]
    task_ids: dict[str, Any]
    heads: dict[str, Tensor] | None = None
    dtype: str = "float32"

    @property
    def data_id(self) -> str:
        data = content_hash({**self.model_id, "tasks": [self.task_ids[t] for t in self.tasks]})
        return data if self.dtype == "float32" else content_hash({"data": data, "dtype": self.dtype})

    @cached_property
    def taskset(self) -> TaskSet:
        """The tasks' adapters (or full checkpoints) against the backbone's encoder weights."""
        from mergelab.checkpoints import load_taskset

        return load_taskset(self.backbone.base_state(), self.sources)

    @property
    def task_list(self) -> list[ClassificationTask]:
        return list(self.tasks.values())


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"{path.name}:{h.hexdigest()}"


def _task_id(task: ClassificationTask) -> dict[str, Any]:
    return {"name": task.name, "classnames": list(task.classnames), "templates": list(task.templates)}


def _folder_id(root: Path) -> list[tuple[str, int, int]]:
    """Every image file under an ImageFolder root by relative path, size and mtime."""
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file())


def _micro(spec: BenchSpec, tasks: Sequence[str] | None) -> Bench:
    from mergelab.micro.benchmark import load_micro

    micro = load_micro(spec.root)
    names = list(tasks) if tasks else list(micro.tasks)
    unknown = [t for t in names if t not in micro.tasks]
    if unknown:
        raise InputError(f"tasks: {unknown[0]!r} is not a micro task; allowed: {', '.join(micro.tasks)}")
    rank = micro.default_rank if spec.rank is None else spec.rank
    if rank not in micro.adapters:
        raise InputError(f"bench.rank: no {rank!r} adapter set in {spec.root}; built sets: {', '.join(map(str, micro.adapters))}")
    base = micro.root / micro.manifest["base"]["dir"]
    model_id = {"weights": [_file_digest(p) for p in sorted(base.iterdir()) if p.is_file()],
                "seed": micro.manifest["seed"], "profile": micro.manifest["profile"]}
    return Bench(f"micro-r{rank}" if isinstance(rank, int) else f"micro-{rank}", micro.backbone, {t: micro.tasks[t] for t in names},
                 [(t, micro.adapters[rank][t]) for t in names], model_id, {t: _task_id(micro.tasks[t]) for t in names})


def _folder_bench(name: str, backbone: Backbone, spec: BenchSpec, tasks: Sequence[TaskSource] | None, weights_id: Any) -> Bench:
    """A bench of ``ImageFolder`` tasks on a backbone built from local weights (``open_clip``, ``hf_clip``)."""
    from mergelab.data.folder import DEFAULT_TEMPLATES, folder_task

    if not tasks or not all(hasattr(t, "name") for t in tasks):
        raise InputError(f"tasks: a {spec.kind} study lists tasks as {{name, adapter|checkpoint, data}} entries")
    size = spec.image_size or backbone.image_size
    built: dict[str, ClassificationTask] = {}
    for t in tasks:
        if t.data is None:
            raise InputError(f"tasks: {t.name} has no data folder; give data: ROOT with ROOT/<split>/<class>/<image>")
        built[t.name] = folder_task(t.data, name=t.name, image_size=size, classnames=t.classnames,
                                    templates=tuple(t.templates) if t.templates else DEFAULT_TEMPLATES)
    # no "kind" field: the data ids (and so the evaluation keys) of open_clip benches stay what they were
    return Bench(name, backbone, built, [(t.name, Path(t.adapter or t.checkpoint)) for t in tasks],
                 {"arch": spec.arch, "weights": weights_id, "size": size},
                 {t.name: (_task_id(built[t.name]), _folder_id(Path(t.data))) for t in tasks})


def _open_clip(spec: BenchSpec, tasks: Sequence[TaskSource] | None) -> Bench:
    import open_clip

    from mergelab.model import open_clip_backbone

    if not spec.arch or spec.weights is None:
        raise InputError("bench: open_clip needs arch (e.g. ViT-B-32) and weights (a local .pt/.bin/.safetensors file)")
    if not Path(spec.weights).is_file():
        raise InputError(f"bench.weights: {spec.weights} does not exist; give the local pretrained weights file")
    model = open_clip.create_model(spec.arch, pretrained=str(spec.weights))
    model.eval()
    return _folder_bench(spec.arch, open_clip_backbone(model), spec, tasks, _file_digest(Path(spec.weights)))


def _hf_clip(spec: BenchSpec, tasks: Sequence[TaskSource] | None) -> Bench:
    """A local ``transformers`` ``CLIPModel`` directory (``save_pretrained``: config, weights and
    tokenizer files); adapters target its image tower as a ``CLIPVisionModel`` does
    (``[vision_model.]encoder.layers.N.self_attn.{q,k,v,out}_proj``, the KnOTS checkpoints' layout;
    transformers 5 drops the ``vision_model.`` level, the prefix is found either way), and the
    zero-shot heads come from its text tower."""
    import transformers

    from mergelab.model import hf_clip_backbone

    root = Path(spec.weights) if spec.weights is not None else None
    if root is None or not (root / "config.json").is_file():
        raise InputError("bench: hf_clip needs weights: a local CLIPModel directory (config.json, model.safetensors and "
                         "tokenizer files, as save_pretrained writes them)")
    try:
        model = transformers.CLIPModel.from_pretrained(str(root), local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(root), local_files_only=True)
    except (OSError, ValueError) as err:
        raise InputError(f"bench.weights: {root} is not a loadable CLIPModel with its tokenizer ({str(err).splitlines()[0]})") from None

    def tokenize(texts: Sequence[str]):
        return tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")["input_ids"]

    digest = [_file_digest(p) for p in sorted(root.iterdir()) if p.is_file()]
    return _folder_bench(root.name, hf_clip_backbone(model.eval(), tokenizer=tokenize), spec, tasks, digest)


def _hf_seq_cls(spec: BenchSpec, tasks: Sequence[TaskSource] | None) -> Bench:
    """A local ``AutoModelForSequenceClassification`` directory with its tokenizer; each task's
    adapter brings its own ``score`` head (PEFT ``modules_to_save``) and a folder of text rows
    (:func:`mergelab.data.text.text_task`)."""
    import transformers
    from torch import nn

    from mergelab.checkpoints import saved_modules
    from mergelab.checkpoints.files import ADAPTER_WEIGHTS, weights_file
    from mergelab.data.text import text_task
    from mergelab.model import hf_sequence_backbone

    root = Path(spec.weights) if spec.weights is not None else None
    if root is None or not (root / "config.json").is_file():
        raise InputError("bench: hf_seq_cls needs weights: a local AutoModelForSequenceClassification directory (config.json, "
                         "model.safetensors and tokenizer files, as save_pretrained writes them)")
    if not tasks or not all(hasattr(t, "name") for t in tasks):
        raise InputError("tasks: an hf_seq_cls study lists tasks as {name, adapter, data} entries")
    try:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(str(root), local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(root), local_files_only=True)
    except (OSError, ValueError) as err:
        raise InputError(f"bench.weights: {root} is not a loadable sequence classifier with its tokenizer "
                         f"({str(err).splitlines()[0]})") from None
    head = getattr(model, "score", None)
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise InputError(f"bench.weights: {type(model).__name__} has no bias-free score head; hf_seq_cls evaluates decoder "
                         "classifiers whose head reads the last token (LLaMA, Mistral, Qwen, Gemma)")
    pad = model.config.pad_token_id
    if tokenizer.pad_token_id is None and pad is not None:
        tokenizer.pad_token_id = pad
    if tokenizer.pad_token_id is None or pad is None or tokenizer.pad_token_id != pad:
        raise InputError(f"bench.weights: the model's pad_token_id ({pad}) and the tokenizer's ({tokenizer.pad_token_id}) must "
                         "be set and equal (the head reads the last non-padding token); set pad_token_id in config.json")
    tokenizer.padding_side = "right"

    def tokenize(texts: Sequence[str]) -> Tensor:
        return tokenizer(list(texts), padding="max_length", truncation=True, max_length=spec.max_length, return_tensors="pt")["input_ids"]

    built, heads = {}, {}
    for t in tasks:
        if t.adapter is None or t.data is None:
            raise InputError(f"tasks: {t.name} needs an adapter (with its trained head) and a data folder")
        own = saved_modules(t.adapter)
        if "score.weight" not in own:
            raise InputError(f"tasks: {t.name}'s adapter {t.adapter} saves no score head (modules_to_save); train it with "
                             "task_type='SEQ_CLS' so that each task keeps its own classifier")
        built[t.name] = text_task(t.data, tokenize=tokenize, name=t.name, classnames=t.classnames)
        heads[t.name] = own["score.weight"].float()
        if heads[t.name].shape[0] != built[t.name].num_classes:
            raise InputError(f"tasks: {t.name}'s head has {heads[t.name].shape[0]} classes, its data {built[t.name].num_classes} "
                             f"({list(built[t.name].classnames)[:5]}); give classnames in head order")
    model_id = {"kind": "hf_seq_cls", "weights": [_file_digest(p) for p in sorted(root.iterdir()) if p.is_file()],
                "max_length": spec.max_length}
    task_ids = {t.name: (_task_id(built[t.name]), _folder_id(Path(t.data)), _file_digest(weights_file(Path(t.adapter), ADAPTER_WEIGHTS)))
                for t in tasks}
    backbone = hf_sequence_backbone(model.eval(), tokenizer=tokenize, linear_heads=True)
    return Bench(root.name, backbone, built, [(t.name, Path(t.adapter)) for t in tasks], model_id, task_ids, heads)


#: ``bench.kind`` -> builder ``(BenchSpec, tasks) -> Bench``.
BENCHES: Registry[Callable[[Any, Any], Bench]] = Registry("bench kind", {"micro": _micro, "open_clip": _open_clip, "hf_clip": _hf_clip,
                                                                          "hf_seq_cls": _hf_seq_cls})


def load_bench(spec: BenchSpec, tasks: Sequence[str] | Sequence[TaskSource] | None = None) -> Bench:
    """The :class:`Bench` of a study's ``bench:`` and ``tasks:`` sections."""
    return BENCHES[spec.kind](spec, tasks)
