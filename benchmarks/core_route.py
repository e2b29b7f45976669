"""The Core route against its lower bound and against naive KnOTS, interleaved in one run (issue 31).

Routes, each on the same seeded float32 LoRA factors (``mergelab.synthetic``, r = 16):

* ``core``: ``merge(taskset, method, "core")`` — the library's route (float64 inside, float32 result);
* ``lower bound``: the same output by the fewest operations, with nothing around them — per module
  the two float64 Gram products of the stacks, their ``k × k`` eigendecompositions, the cores from
  the eigenvectors, the method on the cores, and ``LowRank([B_1 … B_T] X, [A_1; …; A_T])``; no
  validation, no conditioning test, no context (what ``core`` would cost if it were free of overhead);
* ``naive KnOTS (float64)``: ``merge(taskset, method, "knots", naive=True)``, the SVD of the formed
  ``out × T·in`` matrix ``[ΔW_1 … ΔW_T]`` as the KnOTS code takes it (003 Tab. 2's cost reference),
  float64 as this library computes it, on the first module only;
* ``naive SVD (float32)``: only that SVD, in float32 (a lower bound of a float32 naive KnOTS).

Shapes: ``768``: ViT-B/32 attention, ``--vit-modules`` modules of 768 × 768, T = 8; ``4096``: LLaMA-3-8B
attention, ``--llama-modules`` modules of 4096 × 4096, T = 6; ``llama``: a whole LLaMA-3-8B-shape model
(32 layers of q, k, v, o, gate, up, down: 224 modules), T = 6.

Methodology (``benchmarks/timing.py``): every route runs once per round, in a fresh random order, for
``--rounds`` rounds; each is timed in process CPU time (``time.process_time``, the primary figure on a
shared machine) and wall time; ratios are computed within each round and their median is reported
(with the median times); every route's precision is in its row. Before timing, ``core`` and
``lower bound`` are checked to give the same merged update (relative 1e-5 on the first module). The
load average is printed with the results. A benchmark, not a test: nothing here asserts a time.

    PYTHONPATH=lib:. python benchmarks/core_route.py                  # the tables in benchmarks/README.md
    PYTHONPATH=lib:. python benchmarks/core_route.py --quick          # a smoke run on narrow shapes
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from mergelab.merging import METHODS, merge
from mergelab.synthetic import random_taskset
from mergelab.taskset import LowRank, TaskSet

from scale import Model, llama_block
from timing import ROUNDS, Times, load, machine, median, median_ratio, timed_routes

Route = Callable[[TaskSet], object]


def lower_bound(taskset: TaskSet, method: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The Core merge by its fewest operations (module docstring): Grams, eigh, cores, merge, one product;
    the result's factors ``(B*, A*)`` per module, unvalidated (a ``LowRank`` checks its tensors)."""
    entry = METHODS[method]
    out = {}
    for name in taskset.module_names:
        updates = taskset.updates(name)
        B = torch.cat([u.B for u in updates], 1).to(torch.float64)  # (out, k)
        A = torch.cat([u.A for u in updates], 0).to(torch.float64)  # (k, in)
        lam_B, V_B = torch.linalg.eigh(B.T @ B)
        lam_A, U_A = torch.linalg.eigh(A @ A.T)
        s_B, s_A = lam_B.sqrt(), lam_A.sqrt()
        left, right = (V_B * s_B).T, U_A * s_A  # U_Bᵀ [B_1 … B_T], [A_1; …; A_T] V_A
        ranks = [u.rank for u in updates]
        pairs = zip(left.split(ranks, 1), right.split(ranks, 0), strict=True)
        merged = entry.fn([LowRank(b, a) for b, a in pairs] if entry.factored else [b @ a for b, a in pairs])
        X = (V_B / s_B) @ merged @ (U_A / s_A).T  # (k, k)
        out[name] = ((B @ X).float(), A.float())
    return out


def naive_svd_float32(taskset: TaskSet) -> torch.Tensor:
    """The SVD of the formed ``[ΔW_1 … ΔW_T]`` of the first module, in float32 (singular values only are kept)."""
    updates = taskset.updates(taskset.module_names[0])
    return torch.linalg.svd(torch.cat([u.B @ u.A for u in updates], 1), full_matrices=False)[1]


@dataclass(frozen=True)
class Case:
    """One shape set: its task set, the routes timed on it, and how many modules each route merges."""

    key: str
    title: str
    taskset: TaskSet
    routes: Mapping[str, tuple[str, Route, int]]  # label -> (precision, route, modules merged)


def cases(quick: bool, method: str, vit_modules: int, llama_modules: int, whole: bool, naive: bool) -> list[Case]:
    """The shape sets (module docstring), narrow ones when ``quick``; naive routes at the ViT shape only."""
    width, big = (128, 512) if quick else (768, 4096)
    vit = random_taskset({f"vit.{i}.weight": (width, width) for i in range(vit_modules)}, 8, rank=16, seed=0)
    llama = random_taskset({f"llama.{i}.weight": (big, big) for i in range(llama_modules)}, 6, rank=16, seed=0)

    def common(ts: TaskSet) -> dict[str, tuple[str, Route, int]]:
        n = len(ts.module_names)
        return {"core": ("float64, float32 result", lambda t: merge(t, method, "core"), n),
                "lower bound": ("float64, float32 result", lambda t: lower_bound(t, method), n)}

    first = lambda ts: ts.restrict([ts.module_names[0]])  # noqa: E731
    vit_routes = common(vit)
    if naive:
        vit_routes["naive KnOTS"] = ("float64", lambda t: merge(first(t), method, "knots", space_options={"naive": True}), 1)
        vit_routes["naive SVD"] = ("float32", naive_svd_float32, 1)
    out = [Case(str(width), f"{vit_modules} × {width}×{width}, T = 8, r = 16", vit, vit_routes),
           Case(str(big), f"{llama_modules} × {big}×{big}, T = 6, r = 16", llama, common(llama))]
    if whole:
        model = Model("llama3-8b", "LLaMA-3-8B", "model.layers", 2 if quick else 32,
                      llama_block(256, 128, 896) if quick else llama_block(4096, 1024, 14336), 6)
        ts = random_taskset(model.shapes(), model.tasks, rank=model.rank, seed=0)
        out.append(Case("llama", f"whole {model.title}-shape model ({len(ts.module_names)} modules), T = 6, r = 16", ts, common(ts)))
    return out


def check_same(case: Case, method: str) -> float:
    """Largest relative difference of ``core`` and ``lower bound`` on the first module (dense, float64)."""
    first = case.taskset.restrict([case.taskset.module_names[0]])
    name = first.module_names[0]
    a = merge(first, method, "core").modules[name].dense(torch.float64)
    B, A = lower_bound(first, method)[name]
    b = B.double() @ A.double()
    return float((a - b).abs().max() / a.abs().max())


def run(case: Case, rounds: int, rng: random.Random) -> dict[str, list[Times]]:
    """``{route: [times per round]}`` per module merged, the routes interleaved (:func:`timing.timed_routes`)."""
    routes = {label: (lambda route=route: route(case.taskset)) for label, (_, route, _) in case.routes.items()}
    samples = timed_routes(routes, rounds, rng)
    return {label: [t / case.routes[label][2] for t in times] for label, times in samples.items()}


def report(case: Case, samples: Mapping[str, list[Times]], same: float, method: str) -> str:
    """The case's table: median times per module and medians of per-round ratios to the lower bound and to core."""
    lines = [f"{case.title}: {method}; core vs lower bound agree to {same:.1e} (relative, first module)",
             f"  {'route':14s} {'precision':25s} {'CPU ms/module':>14s} {'wall ms/module':>15s} {'CPU ×LB':>8s} {'wall ×LB':>9s}"]
    for label, (precision, _, _) in case.routes.items():
        times, ratio = median(samples[label]), median_ratio(samples[label], samples["lower bound"])
        lines.append(f"  {label:14s} {precision:25s} {times.cpu * 1e3:14.2f} {times.wall * 1e3:15.2f} "
                     f"{ratio.cpu:8.2f} {ratio.wall:9.2f}")
    for label in ("naive KnOTS", "naive SVD"):
        if label in samples:
            ratio = median_ratio(samples[label], samples["core"])
            lines.append(f"  {label} / core: CPU {ratio.cpu:,.0f}×, wall {ratio.wall:,.0f}× (medians of per-round ratios)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="narrow shapes: a smoke run")
    parser.add_argument("--method", default="ties", choices=("task_arithmetic", "ties", "tsv"))
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"interleaved rounds (each route once per round; default {ROUNDS})")
    parser.add_argument("--vit-modules", type=int, default=24, help="768×768 modules merged per round by core and the lower bound")
    parser.add_argument("--llama-modules", type=int, default=2, help="4096×4096 modules merged per round")
    parser.add_argument("--no-whole", action="store_true", help="leave out the whole LLaMA-3-8B-shape model")
    parser.add_argument("--no-naive", action="store_true", help="leave out naive KnOTS (≈ 3 s per round at 768²)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the route order")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    print(f"Core route, {args.rounds} interleaved rounds (torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{machine()}, {load()}); CPU = process time; ×LB = median of per-round ratios to the lower bound")
    for case in cases(args.quick, args.method, args.vit_modules, args.llama_modules, not args.no_whole, not args.no_naive):
        same = check_same(case, args.method)
        samples = run(case, args.rounds, rng)
        print(report(case, samples, same, args.method) + f"\n  {load()} after", flush=True)


if __name__ == "__main__":
    main()
