"""Prefect flows of a study (DESIGN §8): thin wrappers over :mod:`mergelab.study`.

Flows: ``stage``, ``merge_sweep``, ``evaluate``, ``adapt``, ``analyze`` and ``study`` (end to end).
Each takes the study file (re-read on every run, so a scheduled deployment picks up edits) and
an optional store URL. Every node is one Prefect task; its cache is the store (the node checks its
content key first), so Prefect's own caching is off. Tasks that want an accelerator carry the
tag ``gpu``: a deployment can route them to a GPU work pool with a tag-based concurrency limit
or a worker started on a GPU machine (README, "Scaling out").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from flows.runtime import configure

configure()

import logging  # noqa: E402
import os  # noqa: E402
import uuid  # noqa: E402

from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.futures import PrefectFuture, as_completed  # noqa: E402

from mergelab import study as nodes  # noqa: E402
from mergelab.config import StudySpec, load_study  # noqa: E402
from mergelab.errors import InputError  # noqa: E402
from mergelab.store import Store  # noqa: E402

# Prefect's own "prefect" logger (temporary-server start/stop notices) ignores the level setting.
logging.getLogger("prefect").setLevel(os.environ["PREFECT_LOGGING_LEVEL"])

__all__ = ["GPU_TAG", "StudyRun", "adapt_flow", "deployment", "serve_deployments", "analyze_flow", "evaluate_flow", "merge_sweep", "set_progress", "stage_flow", "study_flow"]

#: Tag of tasks that benefit from an accelerator (evaluation, adaptation, Jacobian analyses).
GPU_TAG = "gpu"

Listener = Callable[[str, int, nodes.NodeResult | None], None]
_listeners: list[Listener] = []


def set_progress(listener: Listener | None) -> None:
    """Receive ``(phase, total, result)`` as nodes finish (the CLI draws its progress bars from it)."""
    _listeners.clear()
    if listener is not None:
        _listeners.append(listener)


def _gather(phase: str, futures: Sequence[PrefectFuture]) -> list[nodes.NodeResult]:
    """Results in submission order; listeners hear of each node as it completes."""
    for listener in _listeners:
        listener(phase, len(futures), None)
    for future in as_completed(list(futures)):
        result = future.result()
        for listener in _listeners:
            listener(phase, len(futures), result)
    return [f.result() for f in futures]


def _ctx(spec: StudySpec, store: str, run: str) -> nodes.Context:
    return nodes.context(spec, store, run)


@task(name="stage", cache_policy=NO_CACHE)
def stage_task(spec: StudySpec, store: str, run: str) -> nodes.NodeResult:
    return nodes.stage_node(_ctx(spec, store, run))


@task(name="merge", cache_policy=NO_CACHE)
def merge_task(spec: StudySpec, store: str, run: str, job: nodes.MergeJob) -> nodes.NodeResult:
    return nodes.merge_node(_ctx(spec, store, run), job)


@task(name="adapt", cache_policy=NO_CACHE, tags=[GPU_TAG])
def adapt_task(spec: StudySpec, store: str, run: str, job: nodes.AdaptJob) -> nodes.NodeResult:
    return nodes.adapt_node(_ctx(spec, store, run), job)


@task(name="reference", cache_policy=NO_CACHE, tags=[GPU_TAG])
def reference_task(spec: StudySpec, store: str, run: str, name: str | None) -> nodes.NodeResult:
    return nodes.reference_node(_ctx(spec, store, run), name)


@task(name="evaluate", cache_policy=NO_CACHE, tags=[GPU_TAG])
def evaluate_task(spec: StudySpec, store: str, run: str, source: nodes.NodeResult) -> nodes.NodeResult:
    return nodes.evaluate_node(_ctx(spec, store, run), source)


@task(name="analysis", cache_policy=NO_CACHE, tags=[GPU_TAG])
def analysis_task(spec: StudySpec, store: str, run: str, name: str, merged: list) -> nodes.NodeResult:
    return nodes.analysis_node(_ctx(spec, store, run), name, merged)


@task(name="adaptation_study", cache_policy=NO_CACHE, tags=[GPU_TAG])
def adaptation_study_task(spec: StudySpec, store: str, run: str, name: str) -> nodes.NodeResult:
    return nodes.adaptation_study_node(_ctx(spec, store, run), name)


@task(name="results", cache_policy=NO_CACHE)
def results_task(spec: StudySpec, store: str, run: str, rows: list, references: list) -> nodes.NodeResult:
    return nodes.results_node(_ctx(spec, store, run), rows, references)


class StudyRun(dict):
    """What a flow did: ``nodes`` (every NodeResult) and, for a whole study, ``results`` (its key)."""

    @property
    def nodes(self) -> list[nodes.NodeResult]:
        return self["nodes"]


def _load(study: str | StudySpec, store: str | None) -> tuple[StudySpec, str, str]:
    """The spec, the store URL and a token that identifies this run (its shared context)."""
    spec = study if isinstance(study, StudySpec) else load_study(study)
    return spec, spec.store_url(store), uuid.uuid4().hex


# Steps shared by the flows (they submit into the calling flow's task runner) ------------------------


def _stage(spec: StudySpec, store: str, run: str) -> list[nodes.NodeResult]:
    return _gather("stage", [stage_task.submit(spec, store, run)])


def _references(spec: StudySpec, store: str, run: str) -> list[nodes.NodeResult]:
    names = [None, *nodes.context(spec, store, run).bench.tasks]
    return _gather("reference", [reference_task.submit(spec, store, run, n) for n in names])


def _merges(spec: StudySpec, store: str, run: str) -> tuple[list[nodes.MergeJob], list[nodes.NodeResult]]:
    jobs = nodes.merge_jobs(spec)
    return jobs, _gather("merge", [merge_task.submit(spec, store, run, j) for j in jobs])


def _adapts(spec: StudySpec, store: str, run: str) -> tuple[list[nodes.AdaptJob], list[nodes.NodeResult]]:
    jobs = nodes.adapt_jobs(spec)
    return jobs, _gather("adapt", [adapt_task.submit(spec, store, run, j) for j in jobs])


def _evaluations(spec: StudySpec, store: str, run: str, produced: Sequence[nodes.NodeResult]) -> list[nodes.NodeResult]:
    return _gather("evaluate", [evaluate_task.submit(spec, store, run, p) for p in produced])


def _analyses(spec: StudySpec, store: str, run: str, merged: list) -> list[nodes.NodeResult]:
    return _gather("analysis", [analysis_task.submit(spec, store, run, name, merged) for name in spec.analyses])


def _adaptation_studies(spec: StudySpec, store: str, run: str) -> list[nodes.NodeResult]:
    return _gather("adaptation_study", [adaptation_study_task.submit(spec, store, run, name) for name in spec.adaptation_studies])


def _rows(spec: StudySpec, store: str, run: str, merge_jobs, merged, adapt_jobs, adapted, evaluated) -> list[nodes.Row]:
    ctx, seed = nodes.context(spec, store, run), spec.seeds[0]
    rows = [nodes.merge_row(j, p, e, seed) for j, p, e in zip(merge_jobs, merged, evaluated[:len(merged)], strict=True)]
    return rows + [nodes.adapt_row(ctx, j, p, e) for j, p, e in zip(adapt_jobs, adapted, evaluated[len(merged):], strict=True)]


# Flows ---------------------------------------------------------------------------------------------


@flow(name="stage")
def stage_flow(study: str, store: str | None = None) -> StudyRun:
    """Load and hash the study's checkpoints; record them in the store."""
    spec, url, run = _load(study, store)
    return StudyRun(nodes=_stage(spec, url, run))


@flow(name="merge_sweep")
def merge_sweep(study: str, store: str | None = None) -> StudyRun:
    """Every static merge of the study (methods × spaces × grid configurations)."""
    spec, url, run = _load(study, store)
    staged = _stage(spec, url, run)
    _, merged = _merges(spec, url, run)
    return StudyRun(nodes=staged + merged)


@flow(name="adapt")
def adapt_flow(study: str, store: str | None = None) -> StudyRun:
    """Every adaptive run and adaptation study of the study (on unlabeled validation batches)."""
    spec, url, run = _load(study, store)
    staged = _stage(spec, url, run)
    _, adapted = _adapts(spec, url, run)
    return StudyRun(nodes=staged + adapted + _adaptation_studies(spec, url, run))


@flow(name="evaluate")
def evaluate_flow(study: str, store: str | None = None) -> StudyRun:
    """Reference scores and the evaluation of every merged model (merging what is missing)."""
    spec, url, run = _load(study, store)
    staged = _stage(spec, url, run)
    references = _references(spec, url, run)
    _, merged = _merges(spec, url, run)
    _, adapted = _adapts(spec, url, run)
    return StudyRun(nodes=staged + references + merged + adapted + _evaluations(spec, url, run, merged + adapted))


@flow(name="analyze")
def analyze_flow(study: str, store: str | None = None) -> StudyRun:
    """The study's analyses that need no merged model (weight statistics, Jacobians, proxies)."""
    spec, url, run = _load(study, store)
    return StudyRun(nodes=_stage(spec, url, run) + _analyses(spec.model_copy(update={"analyses": _standalone(spec)}), url, run, []))


def _standalone(spec: StudySpec) -> list[str]:
    from mergelab.analysis.registry import ANALYSES

    return [a for a in spec.analyses if ANALYSES[a].needs != "merged"]


@flow(name="study")
def study_flow(study: str, store: str | None = None) -> StudyRun:
    """End to end: stage, references, merges, adaptation, evaluation, selection, analyses, adaptation
    studies, results."""
    spec, url, run = _load(study, store)
    staged = _stage(spec, url, run)
    references = _references(spec, url, run)
    merge_jobs, merged = _merges(spec, url, run)
    adapt_jobs, adapted = _adapts(spec, url, run)
    evaluated = _evaluations(spec, url, run, merged + adapted)
    rows = _rows(spec, url, run, merge_jobs, merged, adapt_jobs, adapted, evaluated)
    done = _gather("results", [results_task.submit(spec, url, run, rows, references)])
    selected = nodes.selected_merges(nodes.context(spec, url, run), done[0], merge_jobs, merged)
    analyses = _analyses(spec, url, run, selected)
    studies = _adaptation_studies(spec, url, run)
    return StudyRun(nodes=staged + references + merged + adapted + evaluated + done + analyses + studies, results=done[0].key,
                    store=Store(url).url)


# Scheduling ----------------------------------------------------------------------------------------


def deployment(study: Path, spec: StudySpec, *, cron: str, name: str | None = None, store: str | None = None):
    """A cron-scheduled deployment of :func:`study_flow` for ``study`` (re-read on every run)."""
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron)
    except ValueError:
        raise InputError(f"--cron {cron!r} is not a cron expression; use five fields such as \"0 3 * * *\"") from None
    return study_flow.to_deployment(name=name or spec.name, cron=cron, tags=["mergelab", f"study:{spec.name}"],
                                    parameters={"study": str(Path(study).resolve()), "store": store or spec.store_url()})


def serve_deployments(*deployments) -> None:
    """Serve deployments in this process until interrupted (``prefect.serve``)."""
    from prefect import serve

    serve(*deployments)
