"""The study specification (pydantic), loaded from YAML.

A study names the benchmark (a backend with its base checkpoint and tasks), the static merge
methods × spaces × hyper-parameter grids, the selection rule, the adaptive methods, the
analyses, the seeds and the store. ``studies/micro.yaml`` is the embedded default. An adaptive
method's settings are :class:`~mergelab.adaptive_spec.AdaptiveSpec`; the file is read by
:mod:`mergelab.study_files`. Every validation error becomes one :class:`~mergelab.errors.InputError`
line naming the field and the allowed values.
"""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path
from typing import Any, TypeVar

from pydantic import Field, PrivateAttr, SerializeAsAny, StrictBool, ValidationError, ValidationInfo, field_validator, model_validator

from mergelab.adaptive_spec import AdaptiveSpec, check_labels_allowed
from mergelab.bench import BenchSpec, MicroSpec, TaskSource, bench_spec
from mergelab.errors import InputError
from mergelab.params import first_repeated
from mergelab.strict import Float, Seed, Strict, safe_name
from mergelab.study_files import read_study_file, validation_message

__all__ = ["MethodSpec", "StudySpec", "checked_spec", "config_label", "load_study"]

#: Largest hyper-parameter product one method × space may sweep (the study lists smaller grids).
MAX_CONFIGS = 64
#: Validation context key: the study is a file, run on its own bench (:meth:`StudySpec.task_names`).
OWN_BENCH = "own_bench"
S = TypeVar("S", bound=Strict)


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
        check_labels_allowed(self.adaptive, self.allow_labels)
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


def load_study(path: str | os.PathLike[str] | dict) -> StudySpec:
    """Read and validate a study YAML file (:func:`~mergelab.study_files.read_study_file`) or an already parsed
    mapping; a validation error becomes one InputError line (:func:`~mergelab.study_files.validation_message`)."""
    file = None if isinstance(path, dict) else Path(path)
    where = "study" if file is None else str(file)
    data = path if file is None else read_study_file(file)
    try:
        spec = StudySpec.model_validate(data, context={OWN_BENCH: file is not None})
    except ValidationError as err:
        raise InputError(f"{where}: {validation_message(err, data, StudySpec)}") from None
    except InputError as err:
        raise InputError(f"{where}: {err}") from None
    if file is not None:
        spec._folder = file.resolve().parent
    return spec


def checked_spec(model: type[S], where: str, /, **fields: Any) -> S:
    """``model(**fields)``: a spec built in code (the one-method studies of ``merge --select`` and ``adapt``,
    an ``adaptive:`` entry from ``mergelab adapt``'s options), its validation error one InputError line
    naming ``where``, as :func:`load_study` reports a study file's."""
    try:
        return model(**fields)
    except ValidationError as err:
        raise InputError(f"{where}: {validation_message(err, fields, model)}") from None
    except InputError as err:
        raise InputError(f"{where}: {err}") from None


def config_label(config: dict[str, Any]) -> str:
    """A stable, readable label of one configuration (``alpha=0.3,density=0.2``; ``default``)."""
    if not config:
        return "default"
    return ",".join(f"{k}={config[k]}" for k in sorted(config))
