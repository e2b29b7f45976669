"""Prefect flows of a study: thin wrappers over :mod:`mergelab.study`.

Flows: ``stage``, ``merge_sweep``, ``evaluate``, ``adapt``, ``analyze`` and ``study`` (end to end).
Each takes the study file (re-read on every run, so a scheduled deployment picks up edits) and
an optional store URL. Every node is one Prefect task; its cache is the store (the node checks its
content key first), so Prefect's own caching is off. Tasks that want an accelerator carry the
tag ``gpu``: a deployment can route them to a GPU work pool with a tag-based concurrency limit
or a worker started on a GPU machine (docs/studies.md, scaling out); on an existing Dask cluster
(``--runner dask=ADDRESS``) a study whose ``device`` is a GPU has them ask for the worker
resource ``GPU``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from mergelab_flows.runtime import configure, gpu_resources

configure()

import logging  # noqa: E402
import os  # noqa: E402
import uuid  # noqa: E402

from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.context import FlowRunContext  # noqa: E402
from prefect.futures import PrefectFuture, as_completed  # noqa: E402

from mergelab import study as nodes  # noqa: E402
from mergelab.config import StudySpec, load_study  # noqa: E402
from mergelab.errors import InputError  # noqa: E402
from mergelab.strict import safe_name  # noqa: E402

# Prefect's own "prefect" logger (temporary-server start/stop notices) ignores the level setting.
logging.getLogger("prefect").setLevel(os.environ["PREFECT_LOGGING_LEVEL"])

__all__ = ["GPU_NODES", "GPU_TAG", "TASKS", "FlowResult", "adapt_flow", "check_server", "deployment", "register_deployment",
           "scheduling_warning", "serve_deployments", "analyze_flow", "evaluate_flow", "merge_sweep", "set_progress", "stage_flow",
           "study_flow"]

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


def _node(kind: str) -> Callable[..., nodes.NodeResult]:
    def run_node(spec: StudySpec, store: str, run: str, *args) -> nodes.NodeResult:
        return nodes.NODES[kind](nodes.shared_run(spec, store, run), *args)

    run_node.__name__ = run_node.__qualname__ = f"{kind}_node"
    return run_node


#: Node kinds that benefit from an accelerator (evaluation, adaptation, model-dependent analyses).
GPU_NODES = ("reference", "evaluate", "adapt", "analysis", "adaptation_study")
#: One Prefect task per node kind of :data:`mergelab.study.NODES`; the store is their cache.
TASKS = {kind: task(_node(kind), name=kind, cache_policy=NO_CACHE, tags=[GPU_TAG] if kind in GPU_NODES else [])
         for kind in nodes.NODES}


class FlowResult(dict):
    """What a flow did: ``nodes`` (every NodeResult) and, for a whole study, ``results`` (its key)."""

    @property
    def nodes(self) -> list[nodes.NodeResult]:
        return self["nodes"]


def _annotated(resources: dict[str, int]) -> AbstractContextManager:
    """Dask's annotation of the tasks submitted inside it with worker ``resources`` (none: nothing)."""
    if not resources:
        return nullcontext()
    import dask

    return dask.annotate(resources=resources)


def _load(study: str | StudySpec, store: str | None) -> tuple[StudySpec, nodes.Run, nodes.Submit]:
    """The spec, this run's context and a submitter of Prefect tasks into the flow's task runner.

    Every run gets a fresh context token, so a scheduled rerun re-reads the checkpoints. On an
    existing Dask cluster, model-running nodes of a GPU study ask for a ``GPU`` worker
    (:func:`~mergelab_flows.runtime.gpu_resources`).
    """
    spec = study if isinstance(study, StudySpec) else load_study(study)
    url, run = spec.store_url(store), uuid.uuid4().hex
    resources = gpu_resources(FlowRunContext.get().task_runner, spec.device)

    def submit(kind: str, batch) -> list[nodes.NodeResult]:
        with _annotated(resources if kind in GPU_NODES else {}):
            futures = [TASKS[kind].submit(spec, url, run, *args) for args in batch]
        return _gather(kind, futures)

    return spec, nodes.shared_run(spec, url, run), submit


# Flows ---------------------------------------------------------------------------------------------


@flow(name="stage")
def stage_flow(study: str, store: str | None = None) -> FlowResult:
    """Load and hash the study's checkpoints; record them in the store."""
    _, ctx, submit = _load(study, store)
    return FlowResult(nodes=nodes.run_graph(ctx, submit, phases=["stage"])[0])


@flow(name="merge_sweep")
def merge_sweep(study: str, store: str | None = None) -> FlowResult:
    """Every static merge of the study (methods × spaces × grid configurations)."""
    _, ctx, submit = _load(study, store)
    return FlowResult(nodes=nodes.run_graph(ctx, submit, phases=["merge"])[0])


@flow(name="adapt")
def adapt_flow(study: str, store: str | None = None) -> FlowResult:
    """Every adaptive run and adaptation study of the study (on unlabeled validation batches)."""
    _, ctx, submit = _load(study, store)
    return FlowResult(nodes=nodes.run_graph(ctx, submit, phases=["adapt", "adaptation_study"])[0])


@flow(name="evaluate")
def evaluate_flow(study: str, store: str | None = None) -> FlowResult:
    """Reference scores and the evaluation of every merged model (merging what is missing)."""
    _, ctx, submit = _load(study, store)
    return FlowResult(nodes=nodes.run_graph(ctx, submit, phases=["evaluate"])[0])


@flow(name="analyze")
def analyze_flow(study: str, store: str | None = None, analyses: list[str] | None = None) -> FlowResult:
    """The study's analyses (or the named ones of :data:`~mergelab.experiments.registry.ANALYSES`), one
    task each; analyses of merged models take the selected merges of the study's last run."""
    from mergelab.experiments.registry import ANALYSES

    spec, ctx, submit = _load(study, store)
    names = list(analyses or spec.analyses)
    selected = nodes.selected_for_analyses(spec, ctx.store.url) if any(ANALYSES[n].needs == "merged" for n in names) else []
    return FlowResult(nodes=nodes.analysis_graph(ctx, submit, names, selected), store=ctx.store.url)


@flow(name="study")
def study_flow(study: str, store: str | None = None) -> FlowResult:
    """End to end (:func:`mergelab.study.run_graph`): stage, references, merges, adaptation,
    evaluation, selection, analyses, adaptation studies, results."""
    _, ctx, submit = _load(study, store)
    run_nodes, done = nodes.run_graph(ctx, submit)
    return FlowResult(nodes=run_nodes, results=done.key if done else None, store=ctx.store.url)


# Scheduling ----------------------------------------------------------------------------------------


def deployment(study: Path, spec: StudySpec, *, cron: str, name: str | None = None, store: str | None = None):
    """A cron-scheduled deployment of :func:`study_flow` for ``study`` (re-read on every run)."""
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron)
    except ValueError:
        raise InputError(f"--cron {cron!r} is not a cron expression; use five fields such as \"0 3 * * *\"") from None
    if name is not None:
        try:
            safe_name(name, "--name", "it names the deployment on the Prefect server")
        except ValueError as err:
            raise InputError(str(err)) from None
    return study_flow.to_deployment(name=name or spec.name, cron=cron, tags=["mergelab", f"study:{spec.name}"],
                                    parameters={"study": str(Path(study).resolve()), "store": store or spec.store_url()})


def check_server(flag: str, warn: Callable[[str], None]) -> str:
    """The URL of the Prefect server that will schedule (``PREFECT_API_URL``), checked before a
    deployment is registered or served: Prefect's temporary server (no URL set) runs no scheduler
    and forgets a deployment when this process ends, so an unset URL is bad input for ``flag``,
    not a silent no-op; ``warn`` receives :func:`scheduling_warning`'s line when there is one."""
    from importlib.metadata import version

    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise InputError(f"{flag} needs a Prefect server that outlives this command (Prefect's temporary server schedules "
                         "nothing); start one (prefect server start) and set PREFECT_API_URL")
    probe_server(url, flag)
    problem = scheduling_warning(url, version("sqlalchemy"))
    if problem is not None:
        warn(problem)
    return url


#: Seconds :func:`probe_server` waits for the Prefect server's health check.
PROBE_TIMEOUT_S = 5.0


def probe_server(url: str, flag: str) -> None:
    """Raise :class:`InputError` unless the Prefect API at ``url`` answers its health check within
    :data:`PROBE_TIMEOUT_S` (Prefect's client would retry for 30 s and end in a traceback)."""
    import httpx

    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=PROBE_TIMEOUT_S).raise_for_status()
    except httpx.HTTPError as err:
        raise InputError(f"{flag}: no Prefect server answers at PREFECT_API_URL={url} ({type(err).__name__}: {err}); "
                         "start one (prefect server start) or fix the URL") from None


#: SQLAlchemy releases from which Prefect 3.8.8's scheduler fails on every tick ("Can't evaluate bulk
#: DML statement" in ``_insert_scheduled_flow_runs``; issue 30): no scheduled run is ever created.
SCHEDULER_BREAKS_AT = (2, 1)


def scheduling_warning(url: str, sqlalchemy_version: str) -> str | None:
    """Why the Prefect server at ``url`` cannot schedule, as far as this process can tell before
    serving: a server on this machine, presumably started from this environment, with a SQLAlchemy
    that Prefect's scheduler does not support. A remote server's environment is not visible from
    here; :func:`serve_deployments` watches for its scheduled runs instead."""
    from urllib.parse import urlsplit

    local = urlsplit(url).hostname in ("localhost", "127.0.0.1", "::1", "0.0.0.0")
    release = tuple(int(p) for p in sqlalchemy_version.split(".")[:2] if p.isdigit())
    if local and release >= SCHEDULER_BREAKS_AT:
        return (f"SQLAlchemy {sqlalchemy_version} is installed here and Prefect's scheduler fails with it on every tick, so a "
                f"server at {url} started from this environment never creates a scheduled run; "
                "pip install 'sqlalchemy>=2.0,<2.1' (the pin in pyproject.toml) and restart the server")
    return None


def register_deployment(scheduled) -> str:
    """Register ``scheduled`` with the server of ``PREFECT_API_URL`` (:func:`check_server` first) and return its id."""
    return str(scheduled.apply())


#: How long :func:`serve_deployments` waits for the server to schedule a run of a served deployment
#: (a healthy server's recent-deployments scheduler does so within about 5 s).
SCHEDULE_PROBE_S = 45.0


def _unscheduled(deployments: Sequence, within_s: float) -> list[str]:
    """The names of ``deployments`` of which the server has no flow run ``within_s`` seconds from
    now (serving registers them meanwhile; a deployment not there yet counts as unscheduled)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.exceptions import ObjectNotFound

    waiting = {f"{d.flow_name}/{d.name}" for d in deployments}
    deadline = time.monotonic() + within_s
    with get_client(sync_client=True) as client:
        while waiting and time.monotonic() < deadline:
            time.sleep(2.0)
            for name in sorted(waiting):
                try:
                    found = client.read_deployment_by_name(name)
                except ObjectNotFound:
                    continue
                if client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[found.id])), limit=1):
                    waiting.discard(name)
    return sorted(waiting)


def serve_deployments(*deployments, url: str, warn: Callable[[str], None]) -> None:
    """Serve deployments in this process until interrupted (``prefect.serve``) against the server at
    ``url`` (:func:`check_server`). A background thread asks the server for each deployment's runs:
    ``warn`` receives one line per deployment of which it has scheduled none within
    :data:`SCHEDULE_PROBE_S` (its scheduler is off or failing)."""
    import threading

    from prefect import serve

    def probe() -> None:
        try:
            missing = _unscheduled(deployments, SCHEDULE_PROBE_S)
        except Exception as err:  # the probe is advice: a server that cannot answer it is reported, not fatal
            warn(f"could not ask the Prefect server at {url} whether it schedules ({type(err).__name__}: {' '.join(str(err).split())})")
            return
        for name in missing:
            warn(f"the Prefect server at {url} has scheduled no run of {name} {SCHEDULE_PROBE_S:.0f} s after serving began: "
                 "its scheduler is off or failing (see the server's log; Prefect 3.8.8's fails on every tick with "
                 "SQLAlchemy 2.1: pin sqlalchemy>=2.0,<2.1 where the server runs)")

    threading.Thread(target=probe, name="mergelab-schedule-probe", daemon=True).start()
    serve(*deployments)
