"""The study specification (pydantic), loaded from YAML.

A study names the benchmark (a backend with its base checkpoint and tasks), the static merge
methods × spaces × hyper-parameter grids, the selection rule, the adaptive methods, the
analyses, the seeds and the store. ``studies/micro.yaml`` is the embedded default. Every
validation error becomes one :class:`~mergelab.errors.InputError` line naming the field and the
allowed values.
"""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, Field, PrivateAttr, SerializeAsAny, StrictBool, ValidationError, ValidationInfo, field_validator, model_validator

from mergelab.bench import BENCHES, BenchSpec, MicroSpec, TaskSource, bench_spec
from mergelab.bench.kinds import DEFAULT_KIND
from mergelab.errors import InputError, read_text
from mergelab.params import first_repeated
from mergelab.strict import Float, Int, Seed, Strict, safe_name

if TYPE_CHECKING:
    from mergelab.adaptation.loop import Schedule

__all__ = ["DEFAULT_STUDY", "AdaptiveSpec", "MethodSpec", "StudySpec", "config_label", "find_study", "load_study"]

#: Largest hyper-parameter product one method × space may sweep (the study lists smaller grids).
MAX_CONFIGS = 64
#: Validation context key: the study is a file, run on its own bench (:meth:`StudySpec.task_names`).
OWN_BENCH = "own_bench"
#: Most steps of one adaptive run (the papers take 250 to 500).
MAX_ITERS = 100_000
#: Most unlabeled val images per task in one step (a step reads at most the task's whole val split).
MAX_BATCH = 65_536


class MethodSpec(Strict):
    """A static merge method (or ``a+b`` composition) in some spaces, over a hyper-parameter grid.

    ``grid`` lists values per hyper-parameter (their product is swept); ``None`` takes the
    method's registry grid. ``fixed`` sets hyper-parameters that are not swept.
    """

    method: str
    spaces: list[str] = Field(default_factory=lambda: ["full"])
    grid: dict[str, list[Any]] | None = None
    fixed: dict[str, Any] = Field(default_factory=dict)

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        from mergelab.merging import METHODS

        try:
            METHODS[method]
        except (InputError, KeyError) as err:
            raise ValueError(str(err).strip("'\"")) from None
        return method

    @field_validator("spaces")
    @classmethod
    def _known_spaces(cls, spaces: list[str]) -> list[str]:
        from mergelab.spaces import SPACES

        if not spaces:
            raise ValueError(f"spaces is empty; list at least one of {', '.join(SPACES)}")
        SPACES.require(*spaces)
        return spaces

    @model_validator(mode="after")
    def _valid_grid(self) -> MethodSpec:
        from mergelab.merging import METHODS

        spec = METHODS[self.method]
        empty = [k for k, values in self.effective_grid().items() if not values]
        if empty:
            raise ValueError(f"{self.method}: grid {empty[0]!r} lists no value; give at least one or drop it")
        both = sorted(set(self.fixed) & set(self.effective_grid()))
        if both:
            raise ValueError(f"{self.method}: {both[0]!r} is both fixed and swept by the grid; keep it in one of them")
        grid = self.effective_grid()
        n = math.prod(len(values) for values in grid.values())
        if n > MAX_CONFIGS:
            whose = "the grid" if self.grid is not None else "its registry grid (used when grid: is left out)"
            sizes = " x ".join(f"{len(v)} {k}" for k, v in grid.items())
            raise ValueError(f"{self.method}: {whose} has {n} configurations ({sizes}; at most {MAX_CONFIGS}); "
                             "list fewer values in grid:")
        for config in self.configs():
            spec.resolve(config)  # InputError names the allowed hyper-parameters / values
        return self

    def effective_grid(self) -> dict[str, list[Any]]:
        from mergelab.merging import METHODS

        grid = self.grid if self.grid is not None else {k: list(v) for k, v in METHODS[self.method].grid.items()}
        return {k: list(v) for k, v in grid.items()}

    def configs(self) -> list[dict[str, Any]]:
        """Every configuration: the grid's product, each with ``fixed`` added (sorted keys)."""
        grid = self.effective_grid()
        keys = sorted(grid)
        return [{**self.fixed, **dict(zip(keys, values, strict=True))} for values in itertools.product(*(grid[k] for k in keys))]


class AdaptiveSpec(Strict):
    """A test-time adaptation method of :data:`mergelab.adaptation.ADAPTERS` and its settings.

    ``objective``, ``scalarization``, ``optimizer``: ``None`` takes the method's paper setting
    (Adam for AdaMerging and AdaRank, AdamW for TARA). ``start_grid``: values of starting
    hyper-parameters chosen on val by the study's selection rule before the first step (default: the
    method's own, e.g. AdaRank-CART's λ over 0.1 … 3.0 as 002 App. A; ``{}`` in the registry means none).
    """

    method: str
    iters: Int = 250
    lr: Float = 1e-3
    batch_size: Int = 16
    objective: Literal["entropy", "tas", "labels"] | None = None
    scalarization: Literal["sum", "stch", "stch_signed"] | None = None
    optimizer: Literal["adam", "adamw"] | None = None
    alpha: Float = 1.0
    preference: list[Float] | None = None
    hp: dict[str, Any] = Field(default_factory=dict)
    start_grid: dict[str, list[Float]] | None = None
    label: str | None = None

    @field_validator("method")
    @classmethod
    def _known(cls, method: str) -> str:
        from mergelab.adaptation import ADAPTERS

        ADAPTERS.require(method)
        return method

    @field_validator("label")
    @classmethod
    def _safe_label(cls, label: str | None) -> str | None:
        return None if label is None else safe_name(label, "adaptive label")

    @model_validator(mode="after")
    def _valid_settings(self) -> AdaptiveSpec:
        from mergelab.adaptation import ADAPTERS

        if not 1 <= self.iters <= MAX_ITERS:
            raise ValueError(f"{self.name}: iters={self.iters} must be at least 1 and at most {MAX_ITERS}")
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise ValueError(f"{self.name}: batch_size={self.batch_size} must be at least 1 and at most {MAX_BATCH} "
                             "(a step reads at most a task's whole val split)")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"{self.name}: lr={self.lr} must be a positive number")
        if self.preference is not None:  # its length is checked against the merged tasks (StudySpec._fit_the_tasks)
            from mergelab.adaptation.objectives import validate_preference

            validate_preference(self.preference, len(self.preference))
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"{self.name}: alpha={self.alpha} (the STCH smoothing, 001 Eq. 10: Ψ = α log Σ exp(ρ_t f_t / α)) "
                             "must be a positive number")
        adapter = ADAPTERS[self.method]
        who = self.method if self.name == self.method else f"{self.name} ({self.method})"
        adapter.check(self.hp, who)
        for key, values in (self.start_grid or {}).items():
            for value in values:
                adapter.check({key: value}, who)
        empty = [k for k, values in (self.start_grid or {}).items() if not values]
        if empty:
            raise ValueError(f"{self.name}: start_grid {empty[0]!r} lists no value")
        return self

    @property
    def name(self) -> str:
        """The label of this run in the results (``method`` unless ``label`` is given)."""
        return self.label or self.method

    @property
    def schedule(self) -> Schedule:
        """How the run steps, as one value (:class:`~mergelab.adaptation.loop.Schedule`)."""
        from mergelab.adaptation.loop import Schedule

        return Schedule(iters=self.iters, lr=self.lr, batch_size=self.batch_size, objective=self.objective,
                        scalarization=self.scalarization, optimizer=self.optimizer, alpha=self.alpha,
                        preference=None if self.preference is None else tuple(self.preference))


class StudySpec(Strict):
    """A whole study: benchmark, methods, adaptation, selection, analyses, seeds, store.

    ``analysis_settings`` maps an analysis of ``analyses`` to keyword arguments of its function
    (``components: {components: 1.0, layers: [0]}``: every singular component of the first block);
    an analysis without settings runs with its registry defaults.
    ``adaptation_studies`` maps a name of :data:`mergelab.experiments.registry.ADAPTATION_STUDIES`
    (``pareto``, ``cloud``, ``stch_alpha``, ``adarank_ablation``) to its settings.
    ``adaptive_init``: the task-arithmetic λ every adaptive method starts from (AdaMerging's and
    TARA's ``init``, AdaRank's TA-origin ``lam``) unless its ``hp`` sets its own; ``None`` keeps each
    paper's default (0.3, 0.4, 1/T for AdaMerging+TAS).
    ``unseen``: tasks of the bench that every merge is evaluated on but that nothing merges, adapts
    on, selects on or analyses (001 Tab. 4's generalisation to unseen tasks); needs ``tasks``.
    ``device`` / ``dtype``: where and in what precision every model-running node (evaluation,
    adaptation, model analyses) runs the encoder (``cuda``, ``bfloat16`` autocast;
    :mod:`mergelab.model.placement`); merges run on the CPU in float64 either way. A dtype other
    than float32 keys its results apart; the device does not.
    """

    name: str
    description: str = ""
    bench: SerializeAsAny[BenchSpec] = Field(default_factory=MicroSpec)
    tasks: list[str] | list[TaskSource] | None = None
    unseen: list[str] | list[TaskSource] = Field(default_factory=list)
    methods: list[MethodSpec] = Field(default_factory=list)
    adaptive: list[AdaptiveSpec] = Field(default_factory=list)
    selection: str = "val"
    joint: StrictBool = True  # a string such as "no" is no boolean (issue 30 probe 534)
    analyses: list[str] = Field(default_factory=list)
    analysis_settings: dict[str, dict[str, Any]] = Field(default_factory=dict)
    adaptation_studies: dict[str, dict[str, Any]] = Field(default_factory=dict)
    seeds: list[Seed] = Field(default_factory=lambda: [0])
    store: str | None = None
    _folder: Path | None = PrivateAttr(default=None)  # the study file's folder (its default store sits there)
    allow_labels: StrictBool = False
    adaptive_init: Float | None = None
    device: str = "cpu"
    dtype: str = "float32"

    @field_validator("name")
    @classmethod
    def _slug(cls, name: str) -> str:
        return safe_name(name, "study name")

    @field_validator("bench", mode="before")
    @classmethod
    def _bench_of_its_kind(cls, bench: Any) -> BenchSpec:
        """The ``bench:`` section validated against its kind's settings (:func:`mergelab.bench.bench_spec`)."""
        return bench_spec(bench)

    @model_validator(mode="after")
    def _joint_needs_shared_labels(self) -> StudySpec:
        """``joint`` defaults to off on a bench whose tasks bring their own heads (no shared label
        space), and asking for it there is an error."""
        if self.joint and self.bench.own_heads:
            if "joint" in self.model_fields_set:
                raise ValueError(f"joint: this {self.bench.kind} bench scores each task with its own classifier head, so there is "
                                 "no joint label space; remove joint: true")
            object.__setattr__(self, "joint", False)  # a frozen model: the default follows the bench
        return self

    @model_validator(mode="after")
    def _tasks_as_the_bench_takes_them(self) -> StudySpec:
        """A bench with its own tasks (micro, text) takes their names, not task sources (issue 30 probe 570: refused
        after the model loaded, as ``TaskSource(name='digits', ...) is not a micro task``)."""
        for section in ("tasks", "unseen"):
            source = next((t for t in getattr(self, section) or [] if isinstance(t, TaskSource)), None)
            if source is not None and self.bench.own_tasks:
                raise ValueError(f"{section}: the {self.bench.kind} bench brings its own tasks and their adapters; name them "
                                 f"({section}: [{source.name}, ...]) instead of giving {source.name}'s adapter, checkpoint or data, "
                                 "or choose a bench kind that takes them (open_clip, hf_clip, ...)")
        return self

    @field_validator("tasks")
    @classmethod
    def _some_task(cls, tasks: list[str] | list[TaskSource] | None) -> list[str] | list[TaskSource] | None:
        if tasks is not None and not tasks:
            raise ValueError("tasks is empty; list the tasks to merge, or leave tasks: out for all of the bench's tasks")
        return tasks

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, dtype: str) -> str:
        from mergelab.model.placement import DTYPES

        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
        return dtype

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        """``cpu``, ``cuda`` or ``cuda:N`` (issue 30 probe 496: ``meta`` was refused only in the flow); whether
        this machine has the device, ``mergelab run`` asks before Prefect starts (a study may load elsewhere)."""
        from mergelab.model.placement import parse_device

        parse_device(device)
        return device

    @field_validator("seeds")
    @classmethod
    def _some_seed(cls, seeds: list[int]) -> list[int]:
        if not seeds:
            raise ValueError("seeds is empty; list at least one seed (e.g. seeds: [0])")
        repeated = first_repeated(seeds)
        if repeated is not None:  # the same run twice, counted as two in every mean over seeds
            raise ValueError(f"seeds lists {repeated} twice; list each seed once")
        return seeds

    @field_validator("selection")
    @classmethod
    def _known_selection(cls, rule: str) -> str:
        from mergelab.selection import SELECTION_RULES

        SELECTION_RULES.require(rule)
        return rule

    @field_validator("adaptive_init")
    @classmethod
    def _a_coefficient(cls, init: float | None) -> float | None:
        from mergelab.adaptation import COEFFICIENT

        if init is not None and not (math.isfinite(init) and init in COEFFICIENT):
            raise ValueError(f"adaptive_init={init} must be a starting merge coefficient λ in {COEFFICIENT}")
        return init

    @field_validator("analyses")
    @classmethod
    def _known_analyses(cls, analyses: list[str]) -> list[str]:
        from mergelab.experiments.registry import ANALYSES

        ANALYSES.require(*analyses)
        repeated = first_repeated(analyses)
        if repeated is not None:
            raise ValueError(f"analyses lists {repeated!r} twice; list each analysis once")
        return analyses

    @model_validator(mode="after")
    def _something_to_do(self, info: ValidationInfo) -> StudySpec:
        if not self.methods and not self.adaptive and not self.analyses and not self.adaptation_studies:
            raise ValueError("the study has no methods, adaptive methods, analyses or adaptation studies; add at least one")
        if not self.allow_labels and any(a.objective == "labels" for a in self.adaptive):
            raise ValueError("objective 'labels' uses validation labels; set allow_labels: true to allow it")
        for name, settings in self.analysis_settings.items():
            from mergelab.experiments.registry import check_analysis_settings  # here: it imports the benches' model code

            if name not in self.analyses:
                raise ValueError(f"analysis_settings: {name!r} is not in analyses:; add it there or remove its settings")
            try:
                check_analysis_settings(name, settings)
            except InputError as err:
                raise ValueError(str(err)) from None
        self._fit_the_tasks(self.task_names(own_bench=bool(info.context and info.context.get(OWN_BENCH))))
        entry: dict[tuple[str, str], int] = {}
        for i, m in enumerate(self.methods):
            for space in m.spaces:
                if (m.method, space) in entry:  # its selection and results rows would mix two entries' grids
                    raise ValueError(f"methods[{i}]: {m.method} in the {space} space is also methods[{entry[m.method, space]}]; give one "
                                     "entry per method and space (list every value in its grid)")
                entry[m.method, space] = i
        labels = [a.name for a in self.adaptive]
        if len(set(labels)) != len(labels):
            raise ValueError(f"adaptive runs need distinct labels, got {labels}; set label: for repeated methods")
        if self.unseen:
            if not self.tasks:
                raise ValueError("unseen tasks need the merged ones listed too; set tasks: (the tasks to merge)")
            named = lambda ts: [getattr(t, "name", t) for t in ts]  # noqa: E731
            both = sorted(set(named(self.tasks)) & set(named(self.unseen)))
            if both:
                raise ValueError(f"unseen: {both[0]!r} is also in tasks; a task is either merged or unseen")
        return self

    def _fit_the_tasks(self, tasks: list[str] | None) -> None:
        """Every adaptation study's settings (:func:`~mergelab.experiments.registry.check_settings`) and
        every adaptive ``preference`` checked against the merged ``tasks`` (their values alone when the
        tasks are not known before the bench loads)."""
        for name, settings in self.adaptation_studies.items():
            from mergelab.experiments.registry import check_settings  # here: it imports the benches' model code

            try:
                check_settings(name, settings, tasks)
            except InputError as err:
                raise ValueError(f"adaptation_studies: {err}") from None
        for a in self.adaptive:
            if a.preference is not None and tasks is not None and len(a.preference) != len(tasks):
                raise ValueError(f"adaptive {a.name}: preference has {len(a.preference)} entries for the {len(tasks)} merged tasks "
                                 f"({', '.join(tasks)}); give one weight per task")

    def check_bench_files(self) -> None:
        """InputError when the bench's files already show the study cannot run here (:meth:`BenchSpec.preflight`:
        a root with nothing built), or name a task it does not have: what ``mergelab run`` checks before the
        study graph and the model libraries load (a study may be loaded where its bench is not, to serve it)."""
        self.bench.preflight()
        known = self.bench.task_names()
        named = [getattr(t, "name", t) for t in [*(self.tasks or []), *self.unseen]]
        unknown = [t for t in named if known is not None and t not in known]
        if unknown:
            raise InputError(f"tasks: {unknown[0]!r} is not a task of the {self.bench.kind} bench; allowed: {', '.join(known or [])}")

    def task_names(self, *, own_bench: bool = False) -> list[str] | None:
        """The merged tasks' names before anything loads: ``tasks:``, else, for a study that runs on
        its own bench (``own_bench``: a study file), the micro benchmark's (its manifest); ``None``
        when only loading the bench would tell (a study built in code may be given another bench)."""
        if self.tasks:
            return [getattr(t, "name", t) for t in self.tasks]
        return self.bench.task_names() if own_bench else None

    @property
    def evaluated(self) -> list[str] | list[TaskSource] | None:
        """The tasks every merge is evaluated on: ``tasks`` then ``unseen``."""
        return [*self.tasks, *self.unseen] if self.unseen else self.tasks

    def store_url(self, override: str | None = None) -> str:
        """Where the study's artifacts go: ``--store``, else ``$MERGELAB_STORE``, else the study's
        ``store:`` (relative to its file), else ``store/`` next to the study file (a study given as a
        mapping: :func:`~mergelab.store.default_store_url`). Never a folder under the working directory."""
        from mergelab.store import STORE_ENV, default_store_url

        if override or os.environ.get(STORE_ENV):
            return override or os.environ[STORE_ENV]
        if self.store:
            return self.store
        return str(self._folder / "store") if self._folder is not None else default_store_url()


def _relative_to(data: dict, folder: Path) -> dict:
    """Relative file paths in a study file (bench root and weights, task sources and their
    ``classnames`` / ``templates`` files, a local ``store:``) are relative to the file's folder, so a
    study runs from any working directory."""

    def fix(section: Any, keys: tuple[str, ...]) -> Any:
        if not isinstance(section, dict):
            return section
        return {k: str(folder / v) if k in keys and isinstance(v, str) and not Path(v).is_absolute() else v
                for k, v in section.items()}

    data = dict(data)
    bench = data.get("bench", {})
    kind = BENCHES.get(bench.get("kind", DEFAULT_KIND)) if isinstance(bench, dict) else None
    data["bench"] = fix(bench, kind.spec.path_fields() if kind is not None else ())  # an unknown kind: validation names it
    store = data.get("store")
    if isinstance(store, str) and "://" not in store and not Path(store).is_absolute():
        data["store"] = str(folder / store)
    for section in ("tasks", "unseen"):
        if isinstance(data.get(section), list):
            data[section] = [fix(t, ("adapter", "checkpoint", "data", "classnames", "templates")) for t in data[section]]
    return data


def _location(loc: tuple) -> str:
    """``tasks[0].classnames``: a union's branch labels (``list[str]``) left out."""
    parts = [p for p in loc if isinstance(p, int) or "[" not in str(p)]
    return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in parts).replace(".[", "[")


def _taken_branch(errors: list[dict], data: Any) -> dict:
    """The first error of the branch the input took where ``tasks`` / ``unseen`` (names or sources)
    failed both: mappings are sources, so an error in a source is not reported as 'not a string'."""
    for error in errors:
        loc = error["loc"]
        if len(loc) > 2 and loc[0] in ("tasks", "unseen") and isinstance(data, dict) and isinstance(data.get(loc[0]), list):
            sources = any(isinstance(item, dict) for item in data[loc[0]])
            if (loc[1] == "list[str]") == sources:
                continue
        return error
    return errors[0]


#: A study file is a page of YAML; anything larger is not one (and would take minutes to parse).
MAX_STUDY_BYTES = 1 << 20


class _DuplicateKey(yaml.constructor.ConstructorError):
    """A mapping that repeats a key."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with a repeated key (the last would silently win).
    Keys a merge key (``<<: *anchor``) brings in may be overridden, as YAML defines."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_study(path: str | os.PathLike[str] | dict) -> StudySpec:
    """Read and validate a study YAML file (or an already parsed mapping)."""
    where = "study"
    if isinstance(path, dict):
        data = path
    else:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            what = "does not exist" if not path.exists() else "is not a regular file"
            raise InputError(f"study file {path} {what}; pass a YAML file such as studies/micro.yaml")
        if path.stat().st_size > MAX_STUDY_BYTES:
            raise InputError(f"study file {path} has {path.stat().st_size} bytes, more than a study's {MAX_STUDY_BYTES}; "
                             "pass the study's YAML file")
        text = read_text(path, "study file")
        try:
            data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
        except RecursionError:
            raise InputError(f"{path} nests deeper than Python can read; a study is a few levels of mappings and lists") from None
        except _DuplicateKey as err:
            raise InputError(f"{path}: {err.problem}; keep one of them") from None
        except yaml.constructor.ConstructorError as err:
            raise InputError(f"{path}: {err.problem}; a study holds plain mappings, lists and scalars") from None
        except yaml.YAMLError as err:
            raise InputError(f"{path} is not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise InputError(f"{path} must hold a mapping with at least 'name' and 'methods'")
        data = _relative_to(data, path.parent)
    try:
        spec = StudySpec.model_validate(data, context={OWN_BENCH: not isinstance(path, dict)})
    except ValidationError as err:
        first = _taken_branch(err.errors(), data)
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            allowed = ", ".join(_fields_at(first["loc"][:-1], data))
            message = f"unknown field; allowed: {allowed}"
        location = _location(first["loc"])
        raise InputError(f"{where}: {location}: {message}" if location else f"{where}: {message}") from None
    except InputError as err:
        raise InputError(f"{where}: {err}") from None
    if not isinstance(path, dict):
        spec._folder = path.resolve().parent
    return spec


def _fields_at(loc: tuple, data: dict) -> list[str]:
    """The field names allowed at a location of the spec (for 'unknown field' errors); the ``bench:``
    section's are its kind's."""
    if loc[:1] == ("bench",):
        return list(BENCHES[data["bench"].get("kind", DEFAULT_KIND)].spec.model_fields)
    model: type[BaseModel] = StudySpec
    for part in loc:
        if isinstance(part, int):
            continue
        annotation = model.model_fields[part].annotation
        nested = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        nested += [a for arg in getattr(annotation, "__args__", ()) for a in getattr(arg, "__args__", ())
                   if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            break
        model = nested[0]
    return list(model.model_fields)


#: The embedded default study, found from the working directory or the source checkout.
DEFAULT_STUDY = Path("studies/micro.yaml")


def find_study(study: str | os.PathLike[str]) -> Path | None:
    """``study`` itself if it is a file, else ``studies/<study>.yaml`` in the working directory or the
    source checkout (an editable install); None when neither exists."""
    named = Path(study) if Path(study).is_file() else DEFAULT_STUDY.with_name(f"{Path(study).name.removesuffix('.yaml')}.yaml")
    for candidate in (named, Path(__file__).resolve().parents[2] / named):
        if candidate.is_file():
            return candidate
    return None


def config_label(config: dict[str, Any]) -> str:
    """A stable, readable label of one configuration (``alpha=0.3,density=0.2``; ``default``)."""
    if not config:
        return "default"
    return ",".join(f"{k}={config[k]}" for k in sorted(config))
