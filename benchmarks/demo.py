"""Wall time of ``mergelab demo`` cold (an empty store) and rerun (every node cached), in one run.

Issue 5's goals: the embedded study (``studies/micro.yaml`` on the shipped micro benchmark) runs
cold in at most 10 minutes on 2 CPU cores, and a second run takes at most 30 s and reports that
every node was a cache hit. Both runs are separate ``mergelab demo`` processes, as a user runs
them, against one fresh temporary store, so each includes interpreter start-up and imports; the
cold run also starts Prefect's ephemeral server, while the rerun confirms in-process that every
node's artifact is in the store (``mergelab.study.up_to_date``) and starts no orchestrator. A
third, baseline process only starts Python and imports the CLI and the study nodes (torch,
xarray): the fixed cost that no cache removes. The script prints the three times, the rerun's
share of the cold run, and whether the rerun printed "every node was a cache hit".

Creating ``.venv`` (``make env``; a one-off pip install) is not part of this measurement.

A benchmark, not a test: nothing here asserts a time.

    PYTHONPATH=lib:. python benchmarks/demo.py                 # the numbers in benchmarks/README.md
    PYTHONPATH=lib:. python benchmarks/demo.py --runner thread=2
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from checkout import pythonpath

ROOT = Path(__file__).resolve().parents[1]
CACHE_HIT = "every node was a cache hit"
IMPORTS = "import mergelab_app.cli, mergelab.study"


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Run ``argv`` from the repository root; return its wall time and its combined output."""
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed with exit code {proc.returncode}:\n{output[-3000:]}")
    return seconds, output


def verdict(output: str) -> str:
    """The CLI's one-line summary of what ran and what was cached."""
    match = re.search(r"study \S+: (.*?) \(computed/total", output)
    return match.group(1) if match else "(no summary line)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runner", default="thread", help="--runner passed to mergelab demo")
    parser.add_argument("--keep", action="store_true", help="keep the temporary store and print its path")
    args = parser.parse_args()

    mergelab = Path(sys.executable).with_name("mergelab")
    command = [str(mergelab)] if mergelab.exists() else [sys.executable, "-m", "mergelab_app.cli"]
    env = {**os.environ, "PYTHONPATH": pythonpath(ROOT)}
    store = Path(tempfile.mkdtemp(prefix="mergelab-demo-"))
    demo = [*command, "demo", "--store", str(store), "--runner", args.runner]

    import torch

    print(f"mergelab demo on studies/micro.yaml, runner {args.runner} "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"{platform.machine()}, load average {os.getloadavg()[0]:.1f})")
    try:
        baseline, _ = timed([sys.executable, "-c", IMPORTS], env)
        cold, cold_out = timed(demo, env)
        rerun, rerun_out = timed(demo, env)
    finally:
        if args.keep:
            print(f"  store kept at {store}")
        else:
            shutil.rmtree(store, ignore_errors=True)

    rows = [(f"baseline ({IMPORTS})", f"{baseline:8.1f} s", ""),
            ("cold run (empty store)", f"{cold:8.1f} s", f"{verdict(cold_out)}; goal <= 600 s"),
            ("rerun (same store)", f"{rerun:8.1f} s", f"{verdict(rerun_out)}; goal <= 30 s"),
            ("rerun / cold", f"{rerun / cold:8.3f}  ", ""),
            ("rerun - baseline (load the bench, probe store)", f"{rerun - baseline:8.1f} s", ""),
            ("rerun reported every node cached", f"{CACHE_HIT in rerun_out!s:>8}  ", "")]
    for label, value, note in rows:
        print(f"  {label:<52}: {value}   {note}".rstrip())


if __name__ == "__main__":
    main()
