"""The registries of experiments: every analysis and every adaptation study a study can run.

``ANALYSES[name]`` is the only list of analyses: the study spec validates ``analyses:`` against
it, the ``analyze`` flow runs its entries and keys their Datasets in the store as
``store.key(entry.producer, entry.version, **inputs)``. ``producer`` is a stable name written
into store keys (it predates the move of the model-dependent analyses into this layer, so keys
did not change). Bump an entry's ``version`` whenever its output changes for the same inputs, so
stale artifacts are never reused.

A study's ``analysis_settings:`` adds keyword arguments of the function to an entry's fixed
``params`` (:meth:`Analysis.settings`); they enter the store key only when given, so an analysis
run with its defaults keeps its key.

``needs`` says what the function takes first: ``"taskset"`` (weight-only statistics),
``"merged"`` (called as ``fn(merged=…, **params)`` on each selected merge of the sweep, plus
``taskset=…`` when the function has that parameter; the study stacks the results along
``merge_method`` and ``space``) or ``"bench"`` (a :class:`~mergelab.bench.BenchSession`:
the model and task data, for gradients and features).

``ADAPTATION_STUDIES[name]`` is the only list of the preference studies of 001 and the AdaRank
ablation of 002. A study YAML runs any of them from its ``adaptation_studies:`` section
(``name: {settings}``; another name with ``study: <name>`` in its settings is a labelled second
run, :func:`resolve`); the study flow publishes each Dataset under ``studies/<study>/<ref>``
(:func:`study_ref`), which notebooks 50 and 60 read. Settings are the study function's keyword arguments plus the
shared schedule (:data:`SCHEDULE`: ``iters``, ``batch_size``, ``lr``) and ``tasks`` (a subset of
the benchmark's tasks, in order).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import xarray as xr

from mergelab.analysis import basis_ablation, complexity, core_space, coverage, geometry, spectra
from mergelab.adaptive_spec import MAX_BATCH, MAX_ITERS
from mergelab.errors import InputError
from mergelab.params import Interval, Layers, Tasks, check_setting, shown
from mergelab.registry import Registry
from mergelab.strict import safe_name
from mergelab.taskset import TaskSet
from mergelab.experiments import core_space_accuracy, model_analyses
from mergelab.adaptation import Schedule
from mergelab.experiments.adaptation_studies import AdaptationSetting, adarank_ablation
from mergelab.experiments.preferences import pareto_sweep, sensitivity_cloud, stch_alpha_ablation
from mergelab.bench import BenchSession

__all__ = ["ADAPTATION_STUDIES", "ANALYSES", "SCHEDULE", "AdaptationStudy", "Analysis", "check_analysis_fits", "check_analysis_settings",
           "check_settings", "resolve", "run_study", "study_ref"]


#: What the caller hands an analysis / an adaptation study function itself (never a study's setting).
ANALYSIS_INPUTS = ("merged", "taskset")
STUDY_INPUTS = ("dataset",)


def _keywords(fn: Callable[..., Any], inputs: tuple[str, ...]) -> list[str] | None:
    """The keyword settings ``fn`` takes after its first argument, less the ``inputs`` the caller
    passes itself (``None``: any, it forwards ``**kwargs``)."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.name not in inputs]


@dataclass(frozen=True)
class Analysis:
    """An analysis function, its producer name in store keys, code version, input and fixed settings."""

    producer: str
    fn: Callable[..., xr.Dataset]
    version: str
    needs: Literal["taskset", "merged", "bench"] = "taskset"
    params: Mapping[str, Any] = field(default_factory=dict)

    def allowed(self) -> list[str] | None:
        """The keyword arguments a study may set: the function's, less its first (the input ``needs``
        names) and the ``merged`` / ``taskset`` a merged-model analysis is handed (``None``: any)."""
        return _keywords(self.fn, ANALYSIS_INPUTS)

    def settings(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The keyword arguments of one run: the fixed ``params`` and a study's ``given`` settings."""
        return {**self.params, **(given or {})}


ANALYSES: Registry[Analysis] = Registry("analysis", {
    "norms": Analysis("geometry.norms", geometry.norms, "2"),  # 2: packed q/k/v projections split into views
    "cosine": Analysis("geometry.cosine_similarity", geometry.cosine_similarity, "1"),
    "lambda_similarity": Analysis("geometry.lambda_similarity", geometry.lambda_similarity, "1"),
    "coverage": Analysis("coverage.subspace_coverage", coverage.subspace_coverage, "1"),
    "spectra": Analysis("spectra.task_spectra", spectra.task_spectra, "1"),
    "sar": Analysis("spectra.pairwise_sar", spectra.pairwise_sar, "1"),
    "truncation": Analysis("core_space.truncation_curves", core_space.truncation_curves, "1"),
    "sar_spaces": Analysis("core_space.sar_by_space", core_space.sar_by_space, "1"),
    "reference_bases": Analysis("core_space.reference_basis_ablation", basis_ablation.reference_basis_ablation, "1"),
    "merged_rank_spaces": Analysis("core_space.merged_rank_grid", core_space.merged_rank_grid, "2"),  # 2: dim merge_method
    "operation_counts": Analysis("complexity.operation_counts", complexity.operation_counts, "1"),
    "merged_similarity": Analysis("geometry.merged_similarity", geometry.merged_similarity, "2", needs="merged"),
    "merged_rank": Analysis("spectra.merged_rank", spectra.merged_rank, "2", needs="merged"),  # 2: stacked along merge_method
    "anisotropy": Analysis("anisotropy.jacobian_anisotropy", model_analyses.jacobian_anisotropy, "2",
                           needs="bench"),  # 2: labelled task loss by default
    "components": Analysis("components.component_loss_changes", model_analyses.component_loss_changes, "2", needs="bench"),
    "tas_sweep": Analysis("proxies.tas_sweep", model_analyses.tas_sweep, "1", needs="bench"),
    "embedding_interference": Analysis("interference.embedding_interference_by_space",
                                       model_analyses.embedding_interference_by_space, "1", needs="bench"),  # was one merge
    "truncation_accuracy": Analysis("core_space.truncation_accuracy", core_space_accuracy.truncation_accuracy, "1", needs="bench"),
    "reference_basis_accuracy": Analysis("core_space.reference_basis_accuracy", core_space_accuracy.reference_basis_accuracy, "1",
                                         needs="bench"),
})


def _check_values(fn: Callable[..., Any], settings: Mapping[str, Any], owner: str, tasks: Sequence[str] | None,
                  inputs: tuple[str, ...]) -> None:
    """Every setting ``fn`` declares checked against its annotation (:func:`~mergelab.params.check_setting`),
    and every parameter without a default given, but for the ``inputs`` the caller passes."""
    hints = typing.get_type_hints(fn, include_extras=True)
    params = list(inspect.signature(fn).parameters.values())[1:]
    missing = [p.name for p in params if p.default is inspect.Parameter.empty and p.name not in settings and p.name not in inputs
               and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
    if missing:
        raise InputError(f"{owner}: setting {missing[0]!r} is required ({shown(hints.get(missing[0], Any))}); add it")
    for key, value in settings.items():
        if key in hints:
            check_setting(key, value, hints[key], owner, tasks)


def check_analysis_settings(name: str, settings: Mapping[str, Any]) -> None:
    """Raise :class:`InputError` naming a setting that analysis ``name``'s function does not take or
    a value that does not fit its annotation (``layers: "0"`` where a list is meant)."""
    allowed = ANALYSES[name].allowed()
    unknown = [] if allowed is None else [k for k in settings if k not in allowed]
    if unknown:
        raise InputError(f"analysis_settings: {name} has no setting {unknown[0]!r}; allowed: {', '.join(allowed) or 'none'}")
    _check_values(ANALYSES[name].fn, {**ANALYSES[name].params, **settings}, f"analysis_settings: {name}", None, ANALYSIS_INPUTS)


def check_analysis_fits(name: str, settings: Mapping[str, Any] | None, taskset: TaskSet) -> None:
    """Raise :class:`InputError` naming a setting of analysis ``name`` that the staged adapters cannot
    satisfy: a :class:`~mergelab.params.Layers` setting listing a block they do not change (the
    model's depth is known only from the adapters, so :func:`check_analysis_settings` cannot see it)."""
    hints = typing.get_type_hints(ANALYSES[name].fn, include_extras=True)
    present = sorted({taskset.layout.layer(m) for m in taskset.module_names} - {-1})
    for key, value in ANALYSES[name].settings(settings).items():
        hint = hints.get(key)
        if value is None or typing.get_origin(hint) is not Annotated or not any(isinstance(r, Layers) for r in typing.get_args(hint)[1:]):
            continue
        missing = [v for v in value if v not in present]
        if missing:
            raise InputError(f"analysis_settings: {name}: {key}={list(value)} names block {missing[0]}, which the adapters do not "
                             f"change (their blocks: {', '.join(map(str, present)) or 'none'}); list some of those")


#: Settings that configure the :class:`AdaptationSetting` rather than the study function, with the
#: values they take (``tasks``: some of the study's tasks, in the order the study runs them; ``iters`` 0
#: evaluates each starting merge; the upper bounds are an adaptive run's, issue 30 probe 554).
SCHEDULE: dict[str, Any] = {"iters": Annotated[int, Interval(0, MAX_ITERS)], "batch_size": Annotated[int, Interval(1, MAX_BATCH)],
                            "lr": Annotated[float, Interval(0, low_open=True)], "tasks": Annotated[Sequence[str], Tasks(least=1)]}


@dataclass(frozen=True)
class AdaptationStudy:
    """A study function ``fn(setting, **settings) -> Dataset``, its store ref and code version."""

    fn: Callable[..., xr.Dataset]
    ref: str
    version: str

    @property
    def producer(self) -> str:
        return f"adaptation.{self.fn.__name__}"

    def allowed(self) -> list[str] | None:
        """The keyword settings ``fn`` takes (``None``: any, it forwards ``**hp``)."""
        return _keywords(self.fn, STUDY_INPUTS)


#: Versions 2 of the preference studies: the STCH anchors no longer shift TARA's batches; 3: dimension
#: merge_method; 4 (adarank_ablation 2): the session's one batch rule (task t's stream seeded seed + t, as a
#: study's adaptive runs), the TA baseline through merge(); pareto 5: KnOTS-TIES and LoRA-LEGO baseline points.
ADAPTATION_STUDIES: Registry[AdaptationStudy] = Registry("adaptation study", {
    "pareto": AdaptationStudy(pareto_sweep, "preferences/pareto", "5"),
    "cloud": AdaptationStudy(sensitivity_cloud, "preferences/cloud", "4"),
    "stch_alpha": AdaptationStudy(stch_alpha_ablation, "preferences/stch_alpha", "4"),
    "adarank_ablation": AdaptationStudy(adarank_ablation, "ablations/adarank", "2"),
})


def resolve(name: str, settings: Mapping[str, Any]) -> tuple[str, AdaptationStudy, dict[str, Any]]:
    """The registered study an ``adaptation_studies`` entry runs, its entry and the entry's own settings.

    An entry named after a registered study runs it; any other name is a labelled run of the study
    its ``study:`` setting names (``pareto_signs: {study: pareto, pair: [signs, aerial]}``: a second
    Pareto sweep, 001 Fig. 10's four pairs), published beside the first (:func:`study_ref`).
    """
    if "study" not in settings:
        if name not in ADAPTATION_STUDIES:
            raise InputError(f"unknown adaptation study {name!r}; allowed: {', '.join(ADAPTATION_STUDIES)} "
                             f"(or label a second run of one: {name}: {{study: pareto, ...}})")
        return name, ADAPTATION_STUDIES[name], dict(settings)
    try:
        safe_name(name, "adaptation study label")
    except ValueError as err:
        raise InputError(str(err)) from None
    study = settings["study"]
    if not isinstance(study, str) or study not in ADAPTATION_STUDIES:
        raise InputError(f"{name}: study {study!r} is not an adaptation study; allowed: {', '.join(ADAPTATION_STUDIES)}")
    return study, ADAPTATION_STUDIES[study], {k: v for k, v in settings.items() if k != "study"}


def study_ref(name: str, settings: Mapping[str, Any]) -> str:
    """Where an entry's Dataset is named under ``studies/<study>/``: its study's ``ref``
    (``preferences/pareto``), and for a labelled run ``<ref>/<name>`` (``preferences/pareto/pareto_signs``)."""
    study, entry, _ = resolve(name, settings)
    return entry.ref if name == study else f"{entry.ref}/{name}"


def check_settings(name: str, settings: Mapping[str, Any], tasks: Sequence[str] | None = None) -> None:
    """Raise :class:`InputError` naming the study or setting that does not exist, or a value that does
    not fit, checked against the study's ``tasks`` when they are known (``pair``, ``focal``,
    ``preference`` lengths: :class:`~mergelab.params.Tasks`, :class:`~mergelab.params.PerTask`)."""
    study, entry, own = resolve(name, settings)
    allowed = entry.allowed()
    unknown = [] if allowed is None else [k for k in own if k not in allowed and k not in SCHEDULE]
    if unknown:
        raise InputError(f"{name}: unknown setting {unknown[0]!r}; allowed: {', '.join([*SCHEDULE, *allowed])}")
    schedule = {k: v for k, v in own.items() if k in SCHEDULE}
    for key, value in schedule.items():
        check_setting(key, value, SCHEDULE[key], name, tasks)
    _check_values(entry.fn, {k: v for k, v in own.items() if k not in SCHEDULE}, name, schedule.get("tasks", tasks), STUDY_INPUTS)


def run_study(name: str, session: BenchSession, settings: Mapping[str, Any], *, seed: int, dataset: str) -> xr.Dataset:
    """Run entry ``name`` on ``session``'s bench (its ``tasks`` subset, the schedule in ``settings``, ``seed``)."""
    check_settings(name, settings)
    _, entry, own = resolve(name, settings)
    schedule = Schedule(**{k: own[k] for k in ("iters", "batch_size", "lr") if k in own})
    setting = AdaptationSetting(session, own.get("tasks"), schedule, seed=seed)
    return entry.fn(setting, dataset=dataset, **{k: v for k, v in own.items() if k not in SCHEDULE})
