"""Whole-model merges at real shapes: ViT-B/32, ViT-L/14 and LLaMA-3-8B, in the full, KnOTS and Core spaces.

Shapes (synthetic, seeded float32 LoRA factors of the real sizes, ``mergelab.synthetic``; r = 16):

* ViT-B/32 image tower: 12 blocks of q, k, v, out (768 × 768), c_fc (3072 × 768), c_proj (768 × 3072); T = 8;
* ViT-L/14 image tower: 24 blocks, width 1024, MLP 4096; T = 8;
* LLaMA-3-8B: 32 layers of q, o (4096 × 4096), k, v (1024 × 4096), gate, up (14336 × 4096),
  down (4096 × 14336); T = 6 (003 Tab. 2's setting).

Two measurements, both in this one process:

1. **Per module** (every distinct module shape of the model, one module each): each space
   projects once (``mergelab.merging.project``) and each of TA, TIES, TSV, Iso-C merges that
   projection; *total* = project + merge, the work of ``merge(taskset, method, space)`` on that
   module. Also timed: the two thin SVDs of the stacked factors that Core cannot avoid
   (``[B_1 … B_T]`` and ``[A_1; …; A_T]``, 003 Eq. 3). The whole-model cost of the full space
   and of naive KnOTS is this per-module total times the number of modules of that shape: a
   dense LLaMA-8B-shape merge result alone is 28 GB (float32) and naive KnOTS of one 14336-row
   MLP module decomposes a 14336 × 86016 matrix, so neither is run on the whole model here.
2. **Whole model**, measured: ``merge(taskset, method, space)`` over every module (it streams
   module by module: project, merge, reconstruct, drop), for Core (every model) and factored
   KnOTS (``--knots-layers`` layers for LLaMA, scaled to 32; the paper variant's TIES trims
   globally over those layers). *peak* is the largest resident-set growth during the merge over
   the process before it (the largest over rounds), the task set's own factors excluded, the merged low-rank result
   included (``/proc/self/clear_refs`` + ``VmHWM``, as ``merge_spaces.py``).

Spaces: ``full`` (dense float64 ``ΔW_t``), ``knots`` (paper variant, SVD of ``[ΔW_1 … ΔW_T]``
from the factors), ``knots-naive`` (the same SVD of the formed ``out × T·in`` matrix, as the KnOTS
code does: the cost reference of 003 Tab. 2), ``core`` (003's core matrices); every space computes
in float64 and returns float32, the SVD pair is float64 (``merge_spaces.PRECISION``, printed).

Methodology (``benchmarks/timing.py``): per module shape the SVD pair and the spaces, and per model
the whole-model merges, run once per round in a fresh random order for ``--rounds`` rounds, timed in
process CPU time and wall time; tables give median times (CPU / wall) and ratios as medians of
per-round ratios (CPU; wall), with the load average. A benchmark, not a test: nothing here asserts a time.

    PYTHONPATH=lib python benchmarks/scale.py --json scale.json   # the tables in benchmarks/README.md
    PYTHONPATH=lib python benchmarks/scale.py --quick             # smoke run on narrow shapes (~1 min)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from merge_spaces import PRECISION, Meter, _status, ratio_cell, round_times, summary, timed_merges, totals
from mergelab.linalg import svd64
from mergelab.merging import merge
from mergelab.profiling import release_memory
from mergelab.synthetic import random_taskset
from mergelab.taskset import TaskSet

from timing import ROUNDS, Times, interleave, load, machine, median

METHODS = ("task_arithmetic", "ties", "tsv", "iso_c")
#: cheapest first, so that an interrupted run (resumed with --json) has the cheap rows of every shape
SPACES = (("core", "core", {}), ("knots", "knots", {}), ("full", "full", {}), ("knots-naive", "knots", {"naive": True}))
WHOLE = (("core", {}), ("knots", {}))


@dataclass(frozen=True)
class Model:
    """A model's adapted matrices: ``layers`` blocks of ``block`` (name -> (out, in)) under ``prefix``."""

    key: str
    title: str
    prefix: str
    layers: int
    block: Mapping[str, tuple[int, int]]
    tasks: int
    rank: int = 16

    def shapes(self, layers: int | None = None) -> dict[str, tuple[int, int]]:
        return {f"{self.prefix}.{i}.{name}.weight": shape for i in range(self.layers if layers is None else layers)
                for name, shape in self.block.items()}

    def distinct(self) -> dict[tuple[int, int], list[str]]:
        """Each distinct module shape of a block and the block's modules of that shape."""
        out: dict[tuple[int, int], list[str]] = {}
        for name, shape in self.block.items():
            out.setdefault(shape, []).append(name)
        return out


def vit_block(width: int, mlp: int) -> dict[str, tuple[int, int]]:
    attention = {f"attn.{p}": (width, width) for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
    return {**attention, "mlp.c_fc": (mlp, width), "mlp.c_proj": (width, mlp)}


def llama_block(hidden: int, kv: int, mlp: int) -> dict[str, tuple[int, int]]:
    return {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
            "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (mlp, hidden), "mlp.up_proj": (mlp, hidden),
            "mlp.down_proj": (hidden, mlp)}


def models(quick: bool) -> list[Model]:
    if quick:
        return [Model("vit-b32", "ViT-shape tower (quick: 2 blocks, width 128)", "visual.transformer.resblocks", 2, vit_block(128, 512), 8),
                Model("llama3-8b", "LLaMA-shape (quick: 2 layers, hidden 256)", "model.layers", 2, llama_block(256, 64, 896), 6)]
    return [Model("vit-b32", "ViT-B/32 image tower", "visual.transformer.resblocks", 12, vit_block(768, 3072), 8),
            Model("vit-l14", "ViT-L/14 image tower", "visual.transformer.resblocks", 24, vit_block(1024, 4096), 8),
            Model("llama3-8b", "LLaMA-3-8B", "model.layers", 32, llama_block(4096, 1024, 14336), 6)]


def peak_mib(meter: Meter, baseline: int | None) -> float | None:
    if meter.peak is None or baseline is None:
        return None
    return max(0.0, (meter.peak - baseline) / 2**20)


def svd_pair(taskset: TaskSet) -> Times:
    """Time of the two thin SVDs of one module's stacked factors (003 Eq. 3), as Core takes them."""
    updates = taskset.updates(taskset.module_names[0])
    B_stack = torch.cat([u.B for u in updates], dim=1)
    A_stack = torch.cat([u.A for u in updates], dim=0)
    with Meter() as timing:
        svd64(B_stack)
        svd64(A_stack.T)
    return timing.times


def per_module(model: Model, rounds: int, rng: random.Random, done: set, emit: Callable[[dict], None]) -> None:
    """Measurement 1: one module of every distinct shape; per shape the SVD pair and every space interleaved."""
    for shape, names in model.distinct().items():
        count = len(names) * model.layers
        taskset = random_taskset({f"{model.prefix}.0.{names[0]}.weight": shape}, model.tasks, rank=model.rank, seed=0)
        common = {"model": model.key, "kind": "module", "shape": list(shape), "modules": count}
        routes: dict[str, Callable[[], object]] = {}
        if ("module", model.key, tuple(shape), "svd-pair", "-") not in done:
            routes["svd-pair"] = partial(svd_pair, taskset)
        for label, space, options in SPACES:
            wanted = [m for m in METHODS if ("module", model.key, tuple(shape), label, m) not in done]
            if wanted:
                routes[label] = partial(timed_merges, taskset, space, options, wanted, rng)
        for label, results in interleave(routes, rounds, rng).items():
            if label == "svd-pair":
                emit({**common, "space": label, "method": "-", "peak_mib": None, **totals(results)})
                continue
            for method in results[0]:
                emit({**common, "space": label, "method": method, **summary([r[method] for r in results])})


def whole_merge(taskset: TaskSet, method: str, space: str, options: Mapping) -> tuple[Times, float | None, float]:
    """``merge(taskset, method, space)`` over every module: its times, peak growth and result size (MiB)."""
    release_memory()
    baseline = _status("VmRSS")
    with Meter() as merging:
        merged = merge(taskset, method, space, space_options=options)
    held = sum(x.numel() * x.element_size() for x in merged.to_tensors().values()) / 2**20  # LowRank or Dense modules
    del merged
    return merging.times, peak_mib(merging, baseline), held


def whole_model(model: Model, knots_layers: int, rounds: int, rng: random.Random, done: set, emit: Callable[[dict], None]) -> None:
    """Measurement 2: ``merge(taskset, method, space)`` over every module of the model (or, for
    KnOTS on LLaMA, ``knots_layers`` layers scaled to the model), every (space, method) interleaved."""
    routes, layers = {}, {}
    for label, options in WHOLE:
        wanted = [m for m in METHODS if ("whole", model.key, (), label, m) not in done]
        if not wanted:
            continue
        layers[label] = model.layers if label == "core" or model.key != "llama3-8b" else min(knots_layers, model.layers)
        taskset = random_taskset(model.shapes(layers[label]), model.tasks, rank=model.rank, seed=0)
        routes.update({f"{label} {method}": partial(whole_merge, taskset, method, label, options) for method in wanted})
    for name, results in interleave(routes, rounds, rng).items():
        label, method = name.split(" ")
        measured = [t for t, _, _ in results]
        peaks = [p for _, p, _ in results if p is not None]
        emit({"model": model.key, "kind": "whole", "shape": [], "space": label, "method": method, "layers": layers[label],
              "measured_cpu_s": median(measured).cpu, "measured_s": median(measured).wall,
              **totals([t * (model.layers / layers[label]) for t in measured]),
              "peak_mib": max(peaks) if peaks else None, "result_mib": max(h for _, _, h in results)})


def key(row: Mapping) -> tuple:
    return (row["kind"], row["model"], tuple(row["shape"]), row["space"], row["method"])


def extrapolated(rows: list[dict], model: Model) -> dict[tuple[str, str], list[Times]]:
    """Whole-model times per (space, method) and round from the per-module rows: Σ over shapes of count × total."""
    out: dict[tuple[str, str], list[Times]] = {}
    for r in rows:
        if r["model"] == model.key and r["kind"] == "module":
            scaled = [t * r["modules"] for t in round_times(r)]
            key_ = (r["space"], r["method"])
            out[key_] = [a + b for a, b in zip(out[key_], scaled, strict=True)] if key_ in out else scaled
    return out


def fmt_mib(value: float | None) -> str:
    return "n/a" if value is None else ("< 1" if value < 1 else f"{value:,.0f}")


def model_table(rows: list[dict], model: Model) -> str:
    est = extrapolated(rows, model)
    whole = {(r["space"], r["method"]): r for r in rows if r["model"] == model.key and r["kind"] == "whole"}
    modules = sum(len(model.block) for _ in range(model.layers))
    dense_gib = sum(o * i for o, i in model.shapes().values()) * 4 / 2**30
    lines = [f"**{model.title}** ({model.layers} layers, {modules} modules, T = {model.tasks}, r = {model.rank}; "
             f"a dense merged ΔW of every module: {dense_gib:.1f} GiB float32; median times, CPU / wall)", "",
             "| space | precision | method | whole model (s) | per layer (s) | how | peak extra memory (MiB) | × Core (CPU; wall) |",
             "|---|---|---|---:|---:|---|---:|---:|"]
    core = {m: round_times(whole[("core", m)]) if ("core", m) in whole else est.get(("core", m)) for m in METHODS}
    for label, _, _ in SPACES:
        for method in METHODS:
            row = whole.get((label, method))
            if row is not None:
                rounds = round_times(row)
                how = "measured, whole model" if row["layers"] == model.layers else f"measured on {row['layers']} layers, scaled"
                peak = fmt_mib(row["peak_mib"])
            elif (label, method) in est:
                rounds = est[(label, method)]
                measured = {tuple(r["shape"]) for r in rows if r["model"] == model.key and r["kind"] == "module"
                            and r["space"] == label and r["method"] == method}
                lacking = [f"{o}×{i}" for o, i in model.distinct() if (o, i) not in measured]
                how = f"lower bound: {', '.join(lacking)} not measured" if lacking else "one module per shape, × count"
                peaks = [r["peak_mib"] for r in rows if r["model"] == model.key and r["kind"] == "module"
                         and r["space"] == label and r["method"] == method and r["peak_mib"] is not None]
                peak = f"{fmt_mib(max(peaks))} per module" if peaks else "n/a"
            else:
                continue
            t = median(rounds)
            ratio = ratio_cell(rounds, core[method]) if core.get(method) else "n/a"
            lines.append(f"| {label} | {PRECISION[label]} | {method} | {t.cpu:,.2f} / {t.wall:,.2f} | "
                         f"{t.cpu / model.layers:,.3f} / {t.wall / model.layers:,.3f} | {how} | {peak} | {ratio} |")
    results = [r for r in whole.values() if r["space"] == "core"]
    if results:
        lines += ["", f"Core's merged low-rank result held at the end: {max(r['result_mib'] for r in results):,.0f} MiB "
                  f"(largest over methods); the task set's factors: {task_factors_mib(model):,.0f} MiB."]
    return "\n".join(lines)


def task_factors_mib(model: Model) -> float:
    return sum((o + i) * model.rank * 4 for o, i in model.shapes().values()) * model.tasks / 2**20


def shape_table(rows: list[dict], models_: list[Model]) -> str:
    """Per module shape: median times of Core and the SVD pair; Core / SVD pair, naive KnOTS / Core,
    factored KnOTS / Core, full / Core as medians of per-round ratios (CPU; wall)."""
    lines = ["| model | module shape | T | method | Core per module (ms, CPU / wall) | SVD pair (ms) | Core / SVD pair | "
             "naive KnOTS / Core | KnOTS / Core | full / Core |", "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for model in models_:
        by = {(tuple(r["shape"]), r["space"], r["method"]): round_times(r) for r in rows if r["model"] == model.key and r["kind"] == "module"}
        for shape in model.distinct():
            pair = by.get((shape, "svd-pair", "-"))
            for method in METHODS:
                core = by.get((shape, "core", method))
                if core is None or pair is None:
                    continue
                cells = [ratio_cell(by[(shape, s, method)], core) if (shape, s, method) in by else "n/a"
                         for s in ("knots-naive", "knots", "full")]
                c, p = median(core), median(pair)
                lines.append(f"| {model.key} | {shape[0]}×{shape[1]} | {model.tasks} | {method} | {c.cpu * 1e3:,.1f} / {c.wall * 1e3:,.1f} | "
                             f"{p.cpu * 1e3:,.1f} / {p.wall * 1e3:,.1f} | {ratio_cell(core, pair)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="narrow shapes, 2 layers: a smoke run")
    parser.add_argument("--models", default=None, help="comma-separated subset of vit-b32, vit-l14, llama3-8b")
    parser.add_argument("--knots-layers", type=int, default=4, help="LLaMA layers the whole-model KnOTS merge runs on (default 4)")
    parser.add_argument("--skip", default="", help="comma-separated spaces to leave out of the per-module part (e.g. full,knots-naive)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine OpenMP threads spin-wait on busy cores)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"interleaved rounds (default {ROUNDS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the route order")
    parser.add_argument("--json", type=Path, help="write the rows here as they are measured; rows already in it are kept, not rerun "
                                                  "(resume with the same --rounds)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    chosen = models(args.quick)
    if args.models:
        wanted = set(args.models.split(","))
        unknown = wanted - {m.key for m in chosen}
        if unknown:
            parser.error(f"unknown model(s) {sorted(unknown)}; choose from {[m.key for m in chosen]}")
        chosen = [m for m in chosen if m.key in wanted]
    rows: list[dict] = json.loads(args.json.read_text()) if args.json and args.json.exists() else []
    done = {key(r) for r in rows} | {("module", m.key, tuple(s), space, method) for m in chosen for s in m.distinct()
                                     for space in args.skip.split(",") if space for method in METHODS}

    def emit(row: dict) -> None:
        rows.append(row)
        done.add(key(row))
        log(f"  {row['model']} {row['kind']:6s} {str(tuple(row['shape'])):14s} {row['space']:12s} {row['method']:16s} "
            f"CPU {row['total_cpu_s']:10.3f} s  wall {row['total_s']:10.3f} s  peak {fmt_mib(row['peak_mib'])} MiB")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))

    rng = random.Random(args.seed)
    for model in chosen:
        log(model.title)
        whole_model(model, args.knots_layers, args.rounds, rng, done, emit)
        per_module(model, args.rounds, rng, done, emit)
    print(f"torch {torch.__version__} on {torch.get_num_threads()} CPU threads ({machine()}, {load()} after the run); "
          f"{args.rounds} interleaved rounds; "
          f"command: python benchmarks/scale.py {' '.join(argv if argv is not None else sys.argv[1:])}\n")
    for model in chosen:
        print(model_table(rows, model) + "\n")
    print("precision: " + "; ".join(f"{space}: {p}" for space, p in PRECISION.items()) + "\n")
    print(shape_table(rows, chosen))


if __name__ == "__main__":
    main()
