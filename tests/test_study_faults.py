"""Faults of ``mergelab run`` as a process: SIGKILLed at three points and resumed to the uninterrupted
results, stopped by a signal with nothing left behind, two overlapping studies at once on one store,
and bad studies refused in one line. (The study flow's results and caching: test_study_flow.py.)"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import xarray as xr

from mergelab.store import Store
from mergelab.upkeep import gc, verify
from test_study_flow import REPO, SMALL, write_study

pytestmark = pytest.mark.flow


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": "", "COLUMNS": "200"}


KILL_STUDY = {**SMALL, "adaptive": [], "analyses": [], "adaptation_studies": {}, "methods": [
    {"method": "task_arithmetic", "spaces": ["full", "knots", "core"], "grid": {"alpha": [0.2, 0.4, 0.6, 0.8]}}]}


def _as_from_a_terminal() -> None:
    """The run starts with SIGINT at its default, as a terminal's foreground command does: a suite
    started in the background by a non-interactive shell inherits SIGINT ignored, and Python keeps
    an ignored SIGINT ignored, so Ctrl-C would not reach the run."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_and_wait_for_evaluations(tmp_path: Path) -> tuple[list[str], subprocess.Popen, Store]:
    """``mergelab run`` of a 12-configuration study, returned once two evaluations are published."""
    study = write_study(tmp_path / "kill.yaml", KILL_STUDY)
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "mergelab_app.cli", "run", str(study), "--store", str(store), "--runner", "thread=1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_as_from_a_terminal)
    deadline = time.time() + 240
    s = Store(store)
    while time.time() < deadline and proc.poll() is None:
        if sum(a.producer == "evaluate" for a in s.ls()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be stopped; give it more work"
    return cmd, proc, s


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(stat[1]) == pid:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_runs_killed_at_three_points_end_with_the_uninterrupted_results(tmp_path):
    """SIGKILL (the whole process group) at 3 points spread over a study (after 1-3 more published
    artifacts each), each rerun resuming from what the last one published; the last rerun's results
    equal an uninterrupted run's. (A rerun of a finished study is all cache hits: test_rerun_is_all_cache_hits.)"""
    cmd, proc, s = _start_and_wait_for_evaluations(tmp_path)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kills, published = 1, {a.key for a in s.ls()}
    while kills < 3:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and len(s.ls()) < len(published) + 1 + kills % 3:
            time.sleep(0.1)
        if proc.poll() is not None:
            break  # the study finished before this kill point
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        now = {a.key for a in s.ls()}
        assert published <= now, "a kill lost a published artifact"
        published = now
    assert kills == 3, "the study finished too early to be killed at enough points; give it more work"
    done = subprocess.run(cmd, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    gc(s, dry_run=False, keep=None, lease_s=0)  # leftovers of the killed runs are removable, nothing published is lost
    assert published <= {a.key for a in s.ls()} and verify(s) == []
    clean = tmp_path / "clean"
    clean.mkdir()
    uninterrupted = subprocess.run([*cmd[:-4], "--store", str(clean / "store"), "--runner", "thread=1"], cwd=REPO, env=_env(clean),
                                   capture_output=True, text=True, timeout=600)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]
    assert "nodes done (" in uninterrupted.stderr  # stderr is no terminal here: progress comes as plain lines
    reference = Store(clean / "store")
    assert s.ref("studies/small/results") == reference.ref("studies/small/results")
    xr.testing.assert_equal(s.get_dataset(s.ref("studies/small/results"))["score"],
                            reference.get_dataset(reference.ref("studies/small/results"))["score"])


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads child processes from /proc")
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGKILL, -9)],
                         ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_a_stopped_run_exits_at_once_and_leaves_no_process_behind(tmp_path, signum, code):
    cmd, proc, s = _start_and_wait_for_evaluations(tmp_path)
    children = _children(proc.pid)
    assert children, "the run started no Prefect server"
    proc.send_signal(signum)  # the process alone, not its group: its children must not outlive it
    _, err = proc.communicate(timeout=30)  # running nodes are abandoned, not awaited
    assert proc.returncode == code
    if signum != signal.SIGKILL:
        assert re.search(r"stopped; rerun the same command to resume from \d+ published nodes", err), err[-500:]
    deadline = time.time() + 20
    while time.time() < deadline and any(map(_alive, children)):
        time.sleep(0.2)
    assert not any(map(_alive, children)), "a Prefect server or watchdog outlived the run"
    # resuming after a stop: test_runs_killed_at_three_points_end_with_the_uninterrupted_results


def test_concurrent_runs_of_overlapping_studies_share_one_store(tmp_path):
    """Two ``mergelab run`` at once on one store, their studies sharing the stage, references and
    two merges: both succeed, agree on what they share, and leave nothing for gc."""
    first = {**KILL_STUDY, "name": "first", "methods": [{"method": "task_arithmetic", "spaces": ["full", "core"], "grid": {"alpha": [0.2, 0.4]}}]}
    second = {**KILL_STUDY, "name": "second", "methods": [{"method": "task_arithmetic", "spaces": ["full"], "grid": {"alpha": [0.2, 0.4, 0.6]}}]}
    store = tmp_path / "store"
    cmds = [[sys.executable, "-m", "mergelab_app.cli", "run", str(write_study(tmp_path / f"{spec['name']}.yaml", spec)), "--store", str(store),
             "--runner", "thread=1"] for spec in (first, second)]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=_env(tmp_path / f"p{i}"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, cmd in enumerate(cmds)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-1500:] for _, err in outputs]
    s = Store(store)
    a, b = (s.get_dataset(s.ref(f"studies/{name}/results")) for name in ("first", "second"))
    shared = {"merge_method": "task_arithmetic", "space": "full", "config": ["alpha=0.2", "alpha=0.4"]}
    xr.testing.assert_equal(a["score"].sel(shared), b["score"].sel(shared))
    assert gc(s, dry_run=True) == [] and verify(s) == []
    again = subprocess.run(cmds[0], cwd=REPO, env=_env(tmp_path / "p0"), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "every node was a cache hit" in again.stdout


def test_cli_run_rejects_bad_study_in_one_line(tmp_path):
    bad = write_study(tmp_path / "bad.yaml", {**SMALL, "methods": [{"method": "tiez"}]})
    done = subprocess.run([sys.executable, "-m", "mergelab_app.cli", "run", str(bad)], cwd=REPO, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "methods[0]" in done.stderr and "tiez" in done.stderr
    runner = subprocess.run([sys.executable, "-m", "mergelab_app.cli", "run", str(REPO / "studies/micro.yaml"), "--runner", "spark"],
                            cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert runner.returncode == 2 and "unknown runner" in runner.stderr
    # input only the staged adapters show bad (LoRA-LEGO's k above their rank-one units): still one line, no traceback
    late = write_study(tmp_path / "late.yaml", {**SMALL, "adaptive": [], "analyses": [], "adaptation_studies": {},
                                                "methods": [{"method": "lora_lego", "spaces": ["full"], "grid": {"k": [64]}}]})
    done = subprocess.run([sys.executable, "-m", "mergelab_app.cli", "run", str(late), "--store", str(tmp_path / "store"), "--runner", "thread=1"],
                          cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: lora_lego: k=64") and "choose k <= 12" in errors[0], done.stderr[-2000:]
    assert "InputError" not in done.stderr  # Prefect's own report of the failed node is dropped (mergelab_flows.runtime)
