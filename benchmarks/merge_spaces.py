"""Time and peak memory of merging in the full, KnOTS (factored and naive) and Core spaces.

Shapes (synthetic, seeded LoRA factors of the real sizes; ``mergelab.synthetic``):

* ViT-B/32 attention: 48 matrices of 768 × 768 (q, k, v, out of 12 blocks), T = 8, r = 16;
* a LLaMA-3-8B attention layer shape: 4096 × 4096, T = 6, r = 16, ``--llama-layers`` of them.

For every space the task set is projected once (``mergelab.merging.project``, timed) and each
method then merges that projection (``merge(projection, method)``, timed); a method's total
is projection + merge, which is the work ``merge(taskset, method, space)`` does. Peak memory is
the largest resident-set growth over the RSS before the projection, during the projection and
that method's merge (``/proc/self/clear_refs`` resets the high-water mark between phases, and
``malloc_trim`` first returns freed heap pages so that reused memory is counted).
Ratios are computed from the times of this one run. This is a benchmark, not a test: nothing
here asserts a time.

    python benchmarks/merge_spaces.py            # the table in benchmarks/README.md
    python benchmarks/merge_spaces.py --quick    # a smoke run on smaller shapes (~1 min)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from mergelab.merging import merge, project
from mergelab.profiling import release_memory
from mergelab.synthetic import VIT_B32_ATTENTION, random_taskset

METHODS = ("task_arithmetic", "ties", "tsv", "iso_c")
SPACES = (("full", "full", {}), ("knots", "knots", {}), ("knots-naive", "knots", {"naive": True}), ("core", "core", {}))


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
    """Wall time and resident-set high-water mark of a block (Linux; memory is None elsewhere)."""

    def __enter__(self) -> Meter:
        release_memory()
        self.can_reset = _reset_peak()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
        self.peak = _status("VmHWM") if self.can_reset else None


def shape_sets(quick: bool, llama_layers: int) -> list[dict]:
    vit = dict(list(VIT_B32_ATTENTION.items())[:4]) if quick else VIT_B32_ATTENTION
    n = 1024 if quick else 4096
    llama = {f"model.layers.{i}.self_attn.q_proj.weight": (n, n) for i in range(1 if quick else llama_layers)}
    return [
        {"name": f"ViT-B/32 attention ({len(vit)} × 768×768, T=8, r=16)", "key": "vit", "shapes": vit, "tasks": 8, "rank": 16},
        {"name": f"LLaMA-3-8B layer shape ({len(llama)} × {n}×{n}, T=6, r=16)", "key": "llama", "shapes": llama, "tasks": 6, "rank": 16},
    ]


def timed_merges(taskset, space: str, options: dict, methods) -> Iterator[tuple[str, float, float, float | None]]:
    """Project ``taskset`` into ``space`` once and merge that projection with each method, yielding
    ``(method, project_s, merge_s, peak_mib)``; *peak* is the largest resident-set growth over the
    RSS before the projection, during the projection and that method's merge."""
    release_memory()
    baseline = _status("VmRSS")
    with Meter() as projecting:
        projection = project(taskset, space, **options)
    for method in methods:
        with Meter() as merging:
            merged = merge(projection, method)
        del merged
        peaks = [p for p in (projecting.peak, merging.peak) if p is not None]
        peak_mib = max(0.0, (max(peaks) - baseline) / 2**20) if peaks and baseline is not None else None
        yield method, projecting.seconds, merging.seconds, peak_mib


def run_shape(spec: dict, methods: tuple[str, ...], log) -> list[dict]:
    taskset = random_taskset(spec["shapes"], spec["tasks"], rank=spec["rank"], seed=0)
    rows = []
    for label, space, options in SPACES:
        for method, project_s, merge_s, peak_mib in timed_merges(taskset, space, options, methods):
            rows.append({"shape": spec["key"], "space": label, "method": method, "project_s": project_s,
                         "merge_s": merge_s, "total_s": project_s + merge_s, "peak_mib": peak_mib})
            log(f"  {label:12s} {method:16s} project {project_s:9.3f} s  merge {merge_s:9.3f} s  "
                f"peak {peak_mib if peak_mib is None else round(peak_mib)} MiB")
    return rows


def table(rows: list[dict], spec: dict) -> str:
    lines = [f"**{spec['name']}**", "", "| space | method | project (s) | merge (s) | total (s) | peak RSS growth (MiB) |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if r["shape"] != spec["key"]:
            continue
        peak = "n/a" if r["peak_mib"] is None else ("< 1" if r["peak_mib"] < 1 else f"{r['peak_mib']:.0f}")
        lines.append(f"| {r['space']} | {r['method']} | {r['project_s']:.3f} | {r['merge_s']:.3f} | {r['total_s']:.3f} | {peak} |")
    return "\n".join(lines)


def ratios(rows: list[dict], spec: dict) -> str:
    total = {(r["space"], r["method"]): r["total_s"] for r in rows if r["shape"] == spec["key"]}
    lines = ["| ratio (same run) | " + " | ".join(METHODS) + " |", "|---|" + "---:|" * len(METHODS)]
    for label, num, den in (("naive KnOTS / Core", "knots-naive", "core"), ("factored KnOTS / Core", "knots", "core"),
                            ("full / Core", "full", "core")):
        lines.append(f"| {label} | " + " | ".join(f"{total[(num, m)] / total[(den, m)]:.1f}×" for m in METHODS) + " |")
    lines.append("")
    lines.append(f"full-space task_arithmetic / core-space ties: {total[('full', 'task_arithmetic')] / total[('core', 'ties')]:.1f}×")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke run")
    parser.add_argument("--llama-layers", type=int, default=2, help="how many 4096×4096 layers (default 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine OpenMP threads spin-wait on busy cores)")
    parser.add_argument("--json", type=Path, help="also write the raw rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    specs = shape_sets(args.quick, args.llama_layers)
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    rows = []
    for spec in specs:
        log(spec["name"])
        rows += run_shape(spec, METHODS, log)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    print(f"torch {torch.__version__} on {torch.get_num_threads()} CPU threads ({platform.machine()}); "
          f"command: python benchmarks/merge_spaces.py{' --quick' if args.quick else ''}"
          f"{'' if args.llama_layers == 2 else f' --llama-layers {args.llama_layers}'}"
          f"{'' if args.threads == 1 else f' --threads {args.threads}'}\n")
    for spec in specs:
        print(table(rows, spec) + "\n\n" + ratios(rows, spec) + "\n")


if __name__ == "__main__":
    main()
