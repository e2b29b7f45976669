"""CPU and wall time of the instant commands against a bare ``python -c pass``, in one run (issue 34).

Goal: ``mergelab --help`` and ``mergelab check`` cost at most 1.5 s of CPU each on the 2-core
machines (they cost about 6 s when every command imported torch, Prefect and open_clip first). Each
route is a fresh process, as a user runs it: ``python -c pass`` (the interpreter alone, the
baseline), ``mergelab --help``, ``mergelab check`` of the shipped micro adapters (rank 4, eight
tasks) against the micro base, ``mergelab store ls`` of a store holding one artifact, and
``mergelab inspect --help``. Rounds are interleaved (every route once per round, in a fresh random
order), so a load spike on the shared machine hits every route alike; the script prints each
route's median CPU time (user + system, from the child's rusage) and wall time, and both as a
ratio to the baseline's. ``--before DIR`` also runs every route on the ``lib/`` of another
checkout (e.g. ``git worktree add /tmp/before <commit>``), in the same rounds.

A benchmark, not a test: nothing here asserts a time (``tests/test_cli_imports.py`` checks which
libraries the commands import).

    PYTHONPATH=lib:. python benchmarks/startup.py [--rounds 7] [--before /tmp/before]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from checkout import pythonpath

ROOT = Path(__file__).resolve().parents[1]
MICRO = ROOT / "data" / "micro"
#: The CPU budget of ``--help`` and ``check`` (seconds).
GOAL_CPU_S = 1.5


def routes(store: Path) -> dict[str, list[str]]:
    """The command line of each route (``mergelab`` as ``python -m mergelab_app.cli``, so PYTHONPATH picks the checkout)."""
    adapters = sorted(str(p) for p in (MICRO / "adapters" / "r4").iterdir())
    cli = [sys.executable, "-m", "mergelab_app.cli"]
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "mergelab --help": [*cli, "--help"],
        "mergelab check (8 micro adapters)": [*cli, "check", *adapters, "--base", str(MICRO / "base" / "model.safetensors")],
        "mergelab store ls (1 artifact)": [*cli, "store", "ls", "--store", str(store)],
        "mergelab inspect --help": [*cli, "inspect", "--help"],
    }


def measure(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """CPU seconds (user + system of the child) and wall seconds of one run of ``argv``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (each route once per round)")
    parser.add_argument("--before", type=Path, help="another checkout whose lib/ runs the same routes")
    args = parser.parse_args()

    from mergelab.store import Store

    with tempfile.TemporaryDirectory(prefix="mergelab-startup-") as tmp:
        store = Store(Path(tmp) / "store")
        store.put_json(store.key("startup.probe", "1", n=1), {"n": 1})
        trees = {"": ROOT} if args.before is None else {"": ROOT, "before: ": args.before.resolve()}
        runs = {(prefix + label, tree): argv for prefix, tree in trees.items() for label, argv in routes(Path(store.url)).items()
                if prefix == "" or label != "python -c pass"}
        samples: dict[str, list[tuple[float, float]]] = {label: [] for label, _ in runs}
        rng = random.Random(0)
        for _ in range(args.rounds):
            order = list(runs)
            rng.shuffle(order)
            for label, tree in order:
                env = {**os.environ, "PYTHONPATH": pythonpath(tree)}
                samples[label].append(measure(runs[label, tree], env))

    cpu = {label: statistics.median(c for c, _ in s) for label, s in samples.items()}
    wall = {label: statistics.median(w for _, w in s) for label, s in samples.items()}
    base = "python -c pass"
    print(f"instant commands, median of {args.rounds} interleaved rounds (Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, {platform.machine()}, load average {os.getloadavg()[0]:.1f})")
    print(f"  {'route':42s} {'CPU s':>7s} {'x base':>7s} {'wall s':>7s} {'x base':>7s}")
    for label in samples:
        goal = ""
        if label.endswith(("--help", "adapters)")) and "inspect" not in label:
            goal = f"  goal CPU <= {GOAL_CPU_S} s: {'met' if cpu[label] <= GOAL_CPU_S else 'missed'}"
        print(f"  {label:42s} {cpu[label]:7.2f} {cpu[label] / cpu[base]:7.1f} {wall[label]:7.2f} {wall[label] / wall[base]:7.1f}{goal}")


if __name__ == "__main__":
    main()
