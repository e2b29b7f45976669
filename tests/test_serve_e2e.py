"""Scheduled reruns end to end (issue 30, item 0): a real ``prefect server start`` on a free local
port, ``mergelab serve <study> --cron "* * * * *"`` against it, and a scheduled flow run that
reaches COMPLETED with no traceback in the server's log; and ``serve``'s warnings when the server
cannot schedule."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

pytestmark = [pytest.mark.flow, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]

#: The smallest study a scheduled run can complete: two rank-4 micro tasks staged, one weight analysis.
TINY = {"name": "tiny-serve", "bench": {"kind": "micro", "root": str(REPO / "data/micro"), "rank": 4},
        "tasks": ["digits", "textures"], "analyses": ["norms"], "joint": False}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """End a process group this test started (the server's and the runner's children with it)."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90", **extra}


def _start_server(tmp_path: Path, **settings: str):
    """``prefect server start`` on a free port with its own PREFECT_HOME; waits until it answers."""
    port = _free_port()
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=_env(tmp_path / "prefect-home", **settings), stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"prefect server exited: {(tmp_path / 'server.log').read_text()[-3000:]}"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    _stop(proc)
    pytest.fail(f"prefect server did not answer within 180 s: {(tmp_path / 'server.log').read_text()[-3000:]}")


def _serve(tmp_path: Path, url: str) -> subprocess.Popen:
    study = tmp_path / "tiny-serve.yaml"
    study.write_text(yaml.safe_dump(TINY))
    return subprocess.Popen([sys.executable, "-m", "mergelab_app.cli", "serve", str(study), "--cron", "* * * * *",
                             "--store", str(tmp_path / "store")],
                            env=_env(tmp_path / "prefect-home", PREFECT_API_URL=url), cwd=tmp_path,
                            stdout=(tmp_path / "serve.out").open("w"), stderr=(tmp_path / "serve.err").open("w"),
                            stdin=subprocess.DEVNULL, start_new_session=True)


def _flow_runs(url: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        return client.read_flow_runs()


def test_a_served_study_runs_on_its_schedule(tmp_path):
    server, url = _start_server(tmp_path, PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5")
    served = None
    try:
        served = _serve(tmp_path, url)
        deadline, runs = time.monotonic() + 300, []
        while time.monotonic() < deadline:
            assert served.poll() is None, f"mergelab serve exited: {(tmp_path / 'serve.err').read_text()[-3000:]}"
            runs = _flow_runs(url)
            if any(r.auto_scheduled and r.state_type is not None and r.state_type.value == "COMPLETED" for r in runs):
                break
            assert not any(r.state_type is not None and r.state_type.value in ("FAILED", "CRASHED") for r in runs), \
                f"a scheduled run failed: {[(r.name, r.state_name) for r in runs]}\n{(tmp_path / 'serve.err').read_text()[-3000:]}"
            time.sleep(3)
        else:
            pytest.fail(f"no scheduled run COMPLETED within 300 s: {[(r.name, r.state_name) for r in runs]}\n"
                        f"server log: {(tmp_path / 'server.log').read_text()[-3000:]}")
        assert (tmp_path / "store" / "refs" / "studies" / "tiny-serve" / "analysis" / "norms.json").is_file()
    finally:
        if served is not None:
            _stop(served, signal.SIGINT)
        _stop(server)
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log and "bulk DML" not in log, log[-3000:]
    assert "warning:" not in (tmp_path / "serve.err").read_text()  # a scheduling server gets no warning


def test_serve_warns_when_the_server_schedules_nothing(tmp_path):
    """A server whose scheduler is off (as good as one failing on every tick): one warning line, and serving goes on."""
    server, url = _start_server(tmp_path, PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false")
    served = None
    try:
        served = _serve(tmp_path, url)
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and "warning:" not in (tmp_path / "serve.err").read_text():
            assert served.poll() is None, f"mergelab serve exited: {(tmp_path / 'serve.err').read_text()[-3000:]}"
            time.sleep(2)
        assert served.poll() is None
    finally:
        if served is not None:
            _stop(served, signal.SIGINT)
        _stop(server)
    warnings = [line for line in (tmp_path / "serve.err").read_text().splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "has scheduled no run of study/tiny-serve" in warnings[0], (tmp_path / "serve.err").read_text()[-3000:]
    assert "Traceback" not in (tmp_path / "serve.err").read_text()


@pytest.mark.parametrize(("url", "version", "warned"), [
    ("http://127.0.0.1:4200/api", "2.1.9", True),
    ("http://localhost:4200/api", "2.1.0", True),
    ("http://127.0.0.1:4200/api", "2.0.59", False),
    ("https://prefect.example.org/api", "2.1.9", False),  # a remote server's environment is not this one: the probe watches it
])
def test_scheduling_warning_names_an_unsupported_local_sqlalchemy(url, version, warned):
    from mergelab_flows.study import scheduling_warning

    line = scheduling_warning(url, version)
    assert (line is not None) == warned
    if warned:
        assert f"SQLAlchemy {version}" in line and "sqlalchemy>=2.0,<2.1" in line and "\n" not in line


def test_serve_without_a_server_is_one_line(tmp_path):
    """Prefect's temporary server runs no scheduler: serving against it would wait forever."""
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from typer.testing import CliRunner

    from mergelab_app.cli import app

    study = tmp_path / "tiny-serve.yaml"
    study.write_text(yaml.safe_dump(TINY))
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        done = CliRunner().invoke(app, ["serve", str(study), "--cron", "* * * * *", "--store", str(tmp_path / "store")])
    assert done.exit_code == 2, done.output
    assert done.stderr.strip().startswith("error: serve needs a Prefect server") and len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.output
