"""How flows run: Prefect settings, task runners and per-node cache accounting.

By default Prefect runs without a server (an ephemeral API in this process); when
``PREFECT_API_URL`` is set, flows report to that server instead. Task runners:

* ``thread`` (default): Prefect's thread pool in this process.
* ``dask``: a local Dask cluster of in-process workers (``prefect_dask.DaskTaskRunner``); workers
  share this process's Prefect API, so no extra servers start.
* ``dask=ADDRESS``: an existing Dask scheduler (``tcp://host:8786``). Worker processes need a
  shared Prefect server: set ``PREFECT_API_URL`` (``prefect server start``) for them. When the
  study's ``device`` is a GPU, model-running nodes ask for the worker resource ``GPU``
  (:func:`gpu_resources`), so they run only on workers started with ``--resources "GPU=1"``.

Prefect's temporary API server is a child process. :func:`start_ephemeral_server` starts it up
front and hands its pid to a watchdog process that ends it when this process dies, even by
SIGKILL, so no run leaves a server behind.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from mergelab.errors import InputError
from mergelab.study import NodeResult

__all__ = ["GPU_DEVICE_TYPES", "GPU_RESOURCES", "MAX_WORKERS", "RUNNERS", "configure", "gpu_resources", "parse_runner", "probe_scheduler",
           "quiet_input_errors", "start_ephemeral_server", "stop_ephemeral_server", "summarize", "task_runner"]

#: Prefect / Dask settings that these machines need (ENVIRONMENT.md); user values win.
DEFAULT_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    # the ephemeral server logs cancelled event flushes at interpreter exit as errors
    "PREFECT_SERVER_LOGGING_LEVEL": "CRITICAL",
    "DASK_LOGGING__DISTRIBUTED": "warning",
}


class _DropInputErrors(logging.Filter):
    """Drops Prefect's report of a node that failed with :class:`~mergelab.errors.InputError` (its
    traceback, and the failed state naming it): the CLI prints that error as its one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, InputError) or "InputError" in record.getMessage())


#: Prefect's loggers of task and flow runs, which log a failed node with its traceback.
RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")
#: Prefect's event telemetry (for its UI), which logs a traceback per event that nodes still running
#: emit after a failed flow stopped its event service; nothing a user can act on. (Prefect's own
#: ``prefect._internal`` loggers ignore levels, PREFECT_LOGGING_INTERNAL_LEVEL governs them.)
EVENT_LOGGERS = ("prefect.events",)


def quiet_input_errors() -> None:
    """Keep Prefect from logging tracebacks of bad input, and of the events that a run stopped by
    one still emits (idempotent); other failures still log theirs."""
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropInputErrors) for f in logger.filters):
            logger.addFilter(_DropInputErrors())
    for name in EVENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def configure() -> None:
    """Apply :data:`DEFAULT_ENV` where the user has not set a value. Call before importing prefect."""
    for name, value in DEFAULT_ENV.items():
        os.environ.setdefault(name, value)


def _thread(arg: str | None):
    from prefect.task_runners import ThreadPoolTaskRunner

    workers = int(arg) if arg else max(2, os.cpu_count() or 2)
    return ThreadPoolTaskRunner(max_workers=workers)


def _dask(arg: str | None):
    from prefect_dask import DaskTaskRunner

    if arg:
        return DaskTaskRunner(address=arg)
    return DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": False, "dashboard_address": None})


#: ``--runner NAME[=ARG]``: thread[=WORKERS], dask[=ADDRESS].
RUNNERS: dict[str, Callable[[str | None], object]] = {"thread": _thread, "dask": _dask}


def parse_runner(spec: str | None = None) -> tuple[str, str | None]:
    """``--runner NAME[=ARG]`` checked (without importing Prefect): ``(name, arg or None)``."""
    name, given, arg = (spec or "thread").partition("=")
    if name not in RUNNERS:
        raise InputError(f"unknown runner {spec!r}; choose one of {', '.join(f'{k}[=…]' for k in RUNNERS)}")
    if given and not arg:  # `dask=$ADDRESS` with the variable unset ran on a local cluster (issue 30 probe 575, 577)
        example = "a worker count, e.g. thread=4" if name == "thread" else "an address, e.g. dask=tcp://host:8786"
        raise InputError(f"--runner {spec}: nothing after '='; give {example}, or {name} alone for the default")
    if name == "thread" and arg and (not arg.isdigit() or not 1 <= int(arg) <= MAX_WORKERS):
        raise InputError(f"--runner thread={arg}: the argument is a worker count from 1 to {MAX_WORKERS}, e.g. thread=4 "
                         "(each running node holds its own evaluation state)")
    if name == "dask" and arg:
        probe_scheduler(arg)
    return name, arg or None


#: The most workers ``--runner thread=N`` takes: each running node holds its own evaluation state.
MAX_WORKERS = 256
#: Seconds :func:`probe_scheduler` waits for a Dask scheduler to accept a connection.
PROBE_TIMEOUT_S = 5.0
#: A Dask scheduler's port when its address names none.
DASK_PORT = 8786


def probe_scheduler(address: str) -> None:
    """Raise :class:`InputError` unless a TCP connection to the Dask scheduler at ``address``
    (``tcp://host:port``, ``tls://…`` or ``host:port``) opens within :data:`PROBE_TIMEOUT_S`, so that
    ``--runner dask=ADDRESS`` with nothing there fails at once, not after Dask's 120 s. Other
    transports (``ucx://``, ``inproc://``) are left to Dask."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.scheme not in ("tcp", "tls"):
        return
    try:
        host, port = parts.hostname, parts.port or DASK_PORT
    except ValueError:
        raise InputError(f"--runner dask={address}: the port is not a number; e.g. dask=tcp://host:8786") from None
    if not host:
        raise InputError(f"--runner dask={address}: no host; e.g. dask=tcp://host:8786")
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as err:
        raise InputError(f"--runner dask={address}: no Dask scheduler answers at {host}:{port} ({err.strerror or err}); start one "
                         "(dask scheduler) or fix the address") from None


#: Torch device types of a study's ``device`` that are GPUs (``cuda``, ``cuda:N``).
GPU_DEVICE_TYPES = ("cuda",)
#: The Dask worker resources a model-running node asks for on an existing cluster: one ``GPU``,
#: which a worker declares with ``dask worker ADDRESS --resources "GPU=1"``.
GPU_RESOURCES = {"GPU": 1}


def gpu_resources(runner: object, device: str) -> dict[str, int]:
    """The Dask resources a model-running node requests under the task runner ``runner`` for a
    study on ``device``: :data:`GPU_RESOURCES` on an existing Dask scheduler (a ``DaskTaskRunner``
    with an address: ``--runner dask=ADDRESS``) when ``device`` is a GPU, none otherwise. A local
    cluster (``--runner dask``) declares no resources, and Dask holds a task that asks for one no
    worker has forever, so only a cluster the user started can be asked."""
    if device.partition(":")[0] not in GPU_DEVICE_TYPES:
        return {}
    from prefect_dask import DaskTaskRunner

    return dict(GPU_RESOURCES) if isinstance(runner, DaskTaskRunner) and runner.address else {}


def task_runner(spec: str | None = None):
    """The Prefect task runner for ``--runner`` (``thread``, ``thread=4``, ``dask``, ``dask=tcp://…``)."""
    name, arg = parse_runner(spec)
    return RUNNERS[name](arg)


def summarize(results: Iterable[NodeResult]) -> dict[str, dict[str, int]]:
    """Per node kind: how many ran and how many were cache hits."""
    out: dict[str, dict[str, int]] = {}
    for r in results:
        entry = out.setdefault(r.node, {"nodes": 0, "hits": 0})
        entry["nodes"] += 1
        entry["hits"] += int(r.hit)
    return out


#: The watchdog (stdlib only, so it starts in milliseconds): waits until its parent is gone,
#: then ends the server (SIGTERM, SIGKILL after 5 s). argv: parent pid, server pid.
_WATCHDOG = """
import os, signal, sys, time
parent, child = int(sys.argv[1]), int(sys.argv[2])
while os.getppid() == parent:
    time.sleep(0.5)
try:
    os.kill(child, signal.SIGTERM)
    for _ in range(50):
        time.sleep(0.1)
        os.kill(child, 0)
    os.kill(child, signal.SIGKILL)
except (ProcessLookupError, PermissionError):
    pass
"""


def start_ephemeral_server() -> int | None:
    """Start Prefect's temporary API server now, unless ``PREFECT_API_URL`` names a server, and
    tie its life to this process (see the module docstring). Returns the server's pid, or None.

    It is the instance Prefect's own clients use (``SubprocessASGIServer()``, a per-port
    singleton), so starting it early changes nothing else.
    """
    configure()
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME

    if PREFECT_API_URL.value():
        return None
    home = Path(PREFECT_HOME.value())
    try:  # Prefect makes one level only, and its server then fails after a 90-second wait
        home.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"PREFECT_HOME {home} cannot be created ({err.strerror}); set PREFECT_HOME to a writable directory") from None
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    pid = server.server_process.pid
    subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(pid)], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return pid


def stop_ephemeral_server() -> None:
    """Stop the temporary API server now (a stopped run exits without Python's atexit hooks)."""
    from prefect.server.api.server import SubprocessASGIServer

    for server in list(SubprocessASGIServer._instances.values()):
        server.stop()
