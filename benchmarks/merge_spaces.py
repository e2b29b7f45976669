"""Time and peak memory of merging in the full, KnOTS (factored and naive) and Core spaces.

Shapes (synthetic, seeded float32 LoRA factors of the real sizes; ``mergelab.synthetic``):

* ViT-B/32 attention: 48 matrices of 768 × 768 (q, k, v, out of 12 blocks), T = 8, r = 16;
* a LLaMA-3-8B attention layer shape: 4096 × 4096, T = 6, r = 16, ``--llama-layers`` of them.

For every space the task set is projected once (``mergelab.merging.project``, timed) and each
method then merges that projection (``merge(projection, method)``, timed); a method's total
is projection + merge, which is the work ``merge(taskset, method, space)`` does. Peak memory is
the largest resident-set growth over the RSS before the projection, during the projection and
that method's merge (``/proc/self/clear_refs`` resets the high-water mark between phases, and
``malloc_trim`` first returns freed heap pages so that reused memory is counted), the largest
over rounds. Every space computes in float64 and returns float32 (``PRECISION``).

Methodology (``benchmarks/timing.py``): the spaces run once per round in a fresh random order
(and, within a space, the methods in a fresh random order), for ``--rounds`` rounds; every phase
is timed in process CPU time and wall time; tables give median times, and ratios are medians of
per-round ratios of totals (CPU; wall), printed with the load average. A benchmark, not a test:
nothing here asserts a time.

    python benchmarks/merge_spaces.py            # the table in benchmarks/README.md
    python benchmarks/merge_spaces.py --quick    # a smoke run on smaller shapes
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from mergelab.merging import merge, project
from mergelab.profiling import release_memory
from mergelab.synthetic import VIT_B32_ATTENTION, random_taskset
from mergelab.taskset import TaskSet

from timing import ROUNDS, Times, interleave, load, machine, median, median_ratio, now

METHODS = ("task_arithmetic", "ties", "tsv", "iso_c")
SPACES = (("full", "full", {}), ("knots", "knots", {}), ("knots-naive", "knots", {"naive": True}), ("core", "core", {}))
#: what each space computes in (every space returns the inputs' float32)
PRECISION = {"full": "float64 dense ΔW_t, float32 result", "knots": "float64, float32 result",
             "knots-naive": "float64, float32 result", "core": "float64, float32 result", "svd-pair": "float64"}


def _status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Meter:
    """CPU and wall time (``times``) and resident-set high-water mark (``peak``) of a block (Linux; memory is None elsewhere)."""

    def __enter__(self) -> Meter:
        release_memory()
        self.can_reset = _reset_peak()
        self.start = now()
        return self

    def __exit__(self, *exc) -> None:
        self.times = now() - self.start
        self.peak = _status("VmHWM") if self.can_reset else None


@dataclass(frozen=True)
class Merged:
    """One method's merge of one projection: the projection's and the merge's times, the peak growth (MiB)."""

    project: Times
    merge: Times
    peak_mib: float | None

    @property
    def total(self) -> Times:
        return self.project + self.merge


def shape_sets(quick: bool, llama_layers: int) -> list[dict]:
    vit = dict(list(VIT_B32_ATTENTION.items())[:4]) if quick else VIT_B32_ATTENTION
    n = 1024 if quick else 4096
    llama = {f"model.layers.{i}.self_attn.q_proj.weight": (n, n) for i in range(1 if quick else llama_layers)}
    return [
        {"name": f"ViT-B/32 attention ({len(vit)} × 768×768, T=8, r=16)", "key": "vit", "shapes": vit, "tasks": 8, "rank": 16},
        {"name": f"LLaMA-3-8B layer shape ({len(llama)} × {n}×{n}, T=6, r=16)", "key": "llama", "shapes": llama, "tasks": 6, "rank": 16},
    ]


def timed_merges(taskset: TaskSet, space: str, options: Mapping, methods: Sequence[str], rng: random.Random) -> dict[str, Merged]:
    """Project ``taskset`` into ``space`` once and merge that projection with each method (in a random
    order); *peak* is the largest resident-set growth over the RSS before the projection, during the
    projection and that method's merge."""
    release_memory()
    baseline = _status("VmRSS")
    with Meter() as projecting:
        projection = project(taskset, space, **options)
    out = {}
    for method in rng.sample(list(methods), len(methods)):
        with Meter() as merging:
            merged = merge(projection, method)
        del merged
        peaks = [p for p in (projecting.peak, merging.peak) if p is not None]
        peak_mib = max(0.0, (max(peaks) - baseline) / 2**20) if peaks and baseline is not None else None
        out[method] = Merged(projecting.times, merging.times, peak_mib)
    return {m: out[m] for m in methods}


def totals(rounds: Sequence[Times]) -> dict:
    """A row's total: median CPU and wall seconds, and every round's ``[cpu, wall]`` (the per-round
    values the ratios take; JSON-ready)."""
    total = median(rounds)
    return {"total_cpu_s": total.cpu, "total_s": total.wall, "rounds": [[t.cpu, t.wall] for t in rounds]}


def summary(rounds: Sequence[Merged]) -> dict:
    """A table row's numbers from one method's rounds: median times of each phase, the largest peak, :func:`totals`."""
    project, merge_ = median([r.project for r in rounds]), median([r.merge for r in rounds])
    peaks = [r.peak_mib for r in rounds if r.peak_mib is not None]
    return {"project_cpu_s": project.cpu, "project_s": project.wall, "merge_cpu_s": merge_.cpu, "merge_s": merge_.wall,
            "peak_mib": max(peaks) if peaks else None, **totals([r.total for r in rounds])}


def round_times(row: Mapping) -> list[Times]:
    """A row's per-round totals."""
    return [Times(cpu, wall) for cpu, wall in row["rounds"]]


def ratio_cell(num: Sequence[Times], den: Sequence[Times]) -> str:
    """``CPU×; wall×``: medians of per-round ratios."""
    r = median_ratio(num, den)
    return f"{r.cpu:,.1f}×; {r.wall:,.1f}×"


def run_shape(spec: dict, methods: tuple[str, ...], rounds: int, rng: random.Random, log: Callable[[str], None]) -> list[dict]:
    """Every space of one shape set, interleaved over ``rounds``; one row per (space, method)."""
    taskset = random_taskset(spec["shapes"], spec["tasks"], rank=spec["rank"], seed=0)
    routes = {label: partial(timed_merges, taskset, space, options, methods, rng) for label, space, options in SPACES}
    samples = interleave(routes, rounds, rng)
    rows = []
    for label in routes:
        for method in methods:
            row = {"shape": spec["key"], "space": label, "method": method, **summary([r[method] for r in samples[label]])}
            rows.append(row)
            log(f"  {label:12s} {method:16s} total CPU {row['total_cpu_s']:9.3f} s  wall {row['total_s']:9.3f} s  "
                f"peak {row['peak_mib'] if row['peak_mib'] is None else round(row['peak_mib'])} MiB")
    return rows


def table(rows: list[dict], spec: dict) -> str:
    lines = [f"**{spec['name']}** (median times, CPU / wall seconds)", "",
             "| space | precision | method | project (s) | merge (s) | total (s) | peak RSS growth (MiB) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if r["shape"] != spec["key"]:
            continue
        peak = "n/a" if r["peak_mib"] is None else ("< 1" if r["peak_mib"] < 1 else f"{r['peak_mib']:.0f}")
        lines.append(f"| {r['space']} | {PRECISION[r['space']]} | {r['method']} | {r['project_cpu_s']:.3f} / {r['project_s']:.3f} | "
                     f"{r['merge_cpu_s']:.3f} / {r['merge_s']:.3f} | {r['total_cpu_s']:.3f} / {r['total_s']:.3f} | {peak} |")
    return "\n".join(lines)


def ratios(rows: list[dict], spec: dict) -> str:
    total = {(r["space"], r["method"]): round_times(r) for r in rows if r["shape"] == spec["key"]}
    lines = ["| ratio (CPU; wall, medians of per-round ratios) | " + " | ".join(METHODS) + " |", "|---|" + "---:|" * len(METHODS)]
    for label, num, den in (("naive KnOTS / Core", "knots-naive", "core"), ("factored KnOTS / Core", "knots", "core"),
                            ("full / Core", "full", "core")):
        lines.append(f"| {label} | " + " | ".join(ratio_cell(total[(num, m)], total[(den, m)]) for m in METHODS) + " |")
    lines.append("")
    lines.append(f"full-space task_arithmetic / core-space ties: {ratio_cell(total[('full', 'task_arithmetic')], total[('core', 'ties')])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke run")
    parser.add_argument("--llama-layers", type=int, default=2, help="how many 4096×4096 layers (default 2)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"interleaved rounds (each space once per round; default {ROUNDS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the route order")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine OpenMP threads spin-wait on busy cores)")
    parser.add_argument("--json", type=Path, help="also write the raw rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    specs = shape_sets(args.quick, args.llama_layers)
    rows = []
    for spec in specs:
        log(spec["name"])
        rows += run_shape(spec, METHODS, args.rounds, rng, log)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    print(f"torch {torch.__version__} on {torch.get_num_threads()} CPU threads ({machine()}, {load()} after the run); "
          f"{args.rounds} interleaved rounds; command: python benchmarks/merge_spaces.py {' '.join(argv if argv is not None else sys.argv[1:])}\n")
    for spec in specs:
        print(table(rows, spec) + "\n\n" + ratios(rows, spec) + "\n")


if __name__ == "__main__":
    main()
