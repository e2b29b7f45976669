"""What every bench kind shares: the settings it extends, the :class:`Bench` it builds, how a kind is
declared (:class:`BenchKind`) and the helpers its loader uses.

A bench kind is one module of :mod:`mergelab.bench.kinds` and one line of its registry
``BENCHES``: a :class:`BenchSpec` subclass (the study's ``bench:`` section for that kind), a loader
``(spec, tasks) -> Bench`` and the model family's :class:`~mergelab.naming.ModuleLayout` (which
parameter is which block and attention / MLP projection: what AdaRank masks and the analyses'
``layer`` / ``kind`` coordinates). Nothing here downloads anything: every path is local.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, get_args

from pydantic import ValidationInfo, field_validator, model_validator

from mergelab.errors import InputError
from mergelab.hashing import content_hash
from mergelab.naming import GENERIC, ModuleLayout
from mergelab.strict import Strict, safe_name

if TYPE_CHECKING:  # torch: validating a study never loads it
    from torch import Tensor

    from mergelab.data.tasks import ClassificationTask
    from mergelab.model import Backbone
    from mergelab.taskset import TaskSet

__all__ = ["Bench", "BenchKind", "BenchSpec", "TaskSource", "directory_digest", "file_digest", "folder_id", "model_directory", "sha256",
           "pretrained", "read_lines", "task_id", "task_sources"]

T = TypeVar("T")
#: What a bench loader is given as ``tasks``: names of the bench's own tasks, or task sources (``None``: all).
Tasks = Sequence[str] | Sequence["TaskSource"] | None


#: The most lines a ``classnames`` / ``templates`` file may hold (SUN397 has 397 classes).
MAX_LIST_LINES = 100_000


def read_lines(path: str | Path, what: str) -> list[str]:
    """The non-empty lines of a text file (a task's ``classnames`` or ``templates`` given as a file),
    stripped; ValueError naming ``what`` when it is missing, unreadable or empty."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what}: {path} is not a file; give a list or a text file with one entry per line")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{what}: cannot read {path} as UTF-8 text ({type(err).__name__})") from None
    lines = [line for line in lines if line]
    if not lines or len(lines) > MAX_LIST_LINES:
        raise ValueError(f"{what}: {path} holds {len(lines)} entries; give one to {MAX_LIST_LINES} lines")
    return lines


class TaskSource(Strict):
    """One task of a real-model study: its adapter (or full checkpoint) and its data folder.

    ``classnames`` / ``templates``: a list, or a text file with one entry per line (a study file's
    relative path is relative to the file; ``studies/papers/real/clip/`` ships the eight CLIP
    tasks'); read when the study loads, so the task's id is the names themselves, not the path.
    """

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

    @field_validator("classnames", "templates", mode="before")
    @classmethod
    def _from_file(cls, value: Any, info: ValidationInfo) -> Any:
        return read_lines(value, info.field_name) if isinstance(value, (str, Path)) else value

    @model_validator(mode="after")
    def _one_source(self) -> TaskSource:
        if (self.adapter is None) == (self.checkpoint is None):
            raise ValueError("give exactly one of adapter or checkpoint")
        return self


class BenchSpec(Strict):
    """A study's ``bench:`` section: ``kind`` names a bench kind, whose subclass adds its own settings
    (:func:`mergelab.bench.kinds.bench_spec` validates a section against it).

    ``embedded``: the name of the project's own benchmark the kind reads (``""``: none), whose
    numbers are its own and never the papers' (captions and results notes say so).
    """

    kind: str
    embedded: ClassVar[str] = ""
    #: Whether the bench brings its own tasks, which a study's ``tasks:`` names (``False``: a study gives
    #: each task as a :class:`TaskSource`, its adapter or checkpoint and its data).
    own_tasks: ClassVar[bool] = False
    #: Whether the tasks' data are ``ImageFolder`` roots (``mergelab check --study`` reads their splits).
    image_folders: ClassVar[bool] = False

    @property
    def base_weights(self) -> Path | None:
        """The base model's weights on disk (a file or a ``save_pretrained`` directory) that ``mergelab
        check --study`` reads the adapters' shapes against; ``None``: the kind has none to read."""
        return None

    @property
    def own_heads(self) -> bool:
        """Whether every task brings its own trained classifier head (no shared label space, so no
        joint task)."""
        return False

    def task_names(self) -> list[str] | None:
        """The bench's task names when its files tell them without loading the model (``None``:
        only loading the bench tells)."""
        return None

    def preflight(self) -> None:
        """InputError when the bench's files already show that it cannot load (a root with nothing
        built there), read without a model library: a study file checks it as it loads."""

    @classmethod
    def path_fields(cls) -> tuple[str, ...]:
        """The settings that are local paths (relative ones in a study file are relative to its folder)."""
        return tuple(name for name, f in cls.model_fields.items() if f.annotation is Path or Path in get_args(f.annotation))


@dataclass(eq=False)
class Bench:
    """A backbone, its classification tasks (in task order) and each task's checkpoint source.

    :attr:`data_id` identifies everything evaluation depends on besides the merged encoder
    weights, from two parts: ``model_id`` (the whole pre-trained model, whose text tower builds
    the heads, and the bench's settings) and ``task_ids`` (per task: its data, class names and
    templates, and its own head where it brings one). Store keys of evaluations include it. It
    follows :attr:`tasks`, so a bench narrowed to some tasks (:func:`mergelab.study.one_method.bench_for`)
    has the id of a study of those tasks, and both share their evaluations. ``heads``: each task's
    trained ``(C, D)`` classifier head, or ``None`` for zero-shot heads built from the class names.
    ``dtype``: the encoder's, when a study places it in another than float32. ``layout``: the
    model family's module layout, which :attr:`taskset` carries.
    """

    name: str
    backbone: Backbone
    tasks: dict[str, ClassificationTask]
    sources: list[tuple[str, Path]]
    model_id: dict[str, Any]
    task_ids: dict[str, Any]
    heads: dict[str, Tensor] | None = None
    dtype: str = "float32"
    layout: ModuleLayout = GENERIC

    @property
    def data_id(self) -> str:
        data = content_hash({**self.model_id, "tasks": [self.task_ids[t] for t in self.tasks]})
        return data if self.dtype == "float32" else content_hash({"data": data, "dtype": self.dtype})

    @cached_property
    def taskset(self) -> TaskSet:
        """The tasks' adapters (or full checkpoints) against the backbone's encoder weights."""
        from mergelab.checkpoints import load_taskset

        return replace(load_taskset(self.backbone.base_state(), self.sources), layout=self.layout)

    @property
    def task_list(self) -> list[ClassificationTask]:
        return list(self.tasks.values())


@dataclass(frozen=True)
class BenchKind:
    """One bench kind: its settings schema, its loader and its model family's module layout.

    ``example``: a small bench of the kind, ``folder -> (spec, tasks)`` (it may write files into the
    empty ``folder``), that :mod:`mergelab.conformance` loads to check the kind; ``None``: none to load.
    """

    spec: type[BenchSpec]
    load: Callable[[Any, Tasks], Bench]
    layout: ModuleLayout = GENERIC
    example: Callable[[Path], tuple[BenchSpec, Tasks]] | None = None


# Helpers the loaders share --------------------------------------------------------------------------


def sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """``name:sha256`` of a file's bytes."""
    return f"{path.name}:{sha256(path)}"


def directory_digest(root: Path) -> list[str]:
    """:func:`file_digest` of every file directly in ``root`` (a ``save_pretrained`` directory), by name."""
    return [file_digest(p) for p in sorted(root.iterdir()) if p.is_file()]


def task_id(task: ClassificationTask) -> dict[str, Any]:
    """What a task's zero-shot head depends on: its name, class names and templates."""
    return {"name": task.name, "classnames": list(task.classnames), "templates": list(task.templates)}


def folder_id(root: Path) -> list[tuple[str, str]]:
    """Every file under a data folder by relative path and content (:func:`sha256`), so a copy of the
    folder, a fresh clone or a touched file keep the keys that depend on it (its mtimes are not read)."""
    return sorted((str(p.relative_to(root)), sha256(p)) for p in root.rglob("*") if p.is_file())


def task_sources(tasks: Tasks, kind: str, data: str, needs: str = "adapter|checkpoint, data") -> list[TaskSource]:
    """``tasks`` as :class:`TaskSource` entries, each with a data folder laid out as ``data`` says
    (InputError naming the layout otherwise)."""
    if not tasks or not all(isinstance(t, TaskSource) for t in tasks):
        raise InputError(f"tasks: a {kind} study lists tasks as {{name, {needs}}} entries")
    missing = next((t.name for t in tasks if t.data is None), None)
    if missing is not None:
        raise InputError(f"tasks: {missing} has no data folder; give data: ROOT with {data}")
    return list(tasks)


def model_directory(weights: Path | None, kind: str, what: str) -> Path:
    """``weights`` when it is a ``save_pretrained`` directory (it holds ``config.json``); else InputError."""
    if weights is None or not (Path(weights) / "config.json").is_file():
        raise InputError(f"bench: {kind} needs weights: a local {what} directory (config.json, model.safetensors and "
                         "tokenizer files, as save_pretrained writes them)")
    return Path(weights)


def pretrained(load: Callable[[], T], root: Path, what: str) -> T:
    """``load()`` (a ``from_pretrained`` call on ``root``), its failure one InputError line naming ``what``."""
    try:
        return load()
    except (OSError, ValueError) as err:
        raise InputError(f"bench.weights: {root} is not a loadable {what} ({str(err).splitlines()[0]})") from None
