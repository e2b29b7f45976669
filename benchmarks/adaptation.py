"""Per-iteration time and peak memory of the adaptive merges, relative to AdaMerging in the same run.

Two parts, both measured in this one process:

1. **micro end to end** — the shipped micro benchmark (``data/micro``; rank ``--rank`` adapters of
   ``--tasks`` tasks, batch ``--batch`` per task): ``mergelab.adaptation.adapt`` for AdaMerging,
   TARA-A, TARA-B (full and core space) and AdaRank (TA origin; full and core space). Time per
   iteration is the loop's own, over ``--iters`` iterations after ``--warmup`` untimed ones of
   the same run (clocks read from ``adapt``'s progress callback); peak memory is the resident-set
   growth during the whole ``adapt`` call (banks, anchors, every iteration;
   ``mergelab.profiling.measure``, whose sampling thread counts in every route's CPU time alike),
   relative to one plain forward/backward of the base model on the same batches (T task batches,
   entropy, gradient with respect to the merged weights), the step without any merge.
2. **merge step at ViT-B/32 shapes** — synthetic LoRA factors of the 48 attention matrices of
   ViT-B/32 (768 × 768, ``--vit-tasks`` tasks × rank ``--vit-rank``): the part of a step that the
   methods do differently, forming every module's ``ΔW(c)`` and back-propagating a fixed linear
   functional through it (``Σ_m <G_m, ΔW_m(c)>``), plus the one-off bank construction (SVDs).
   This is where full vs core space differ (``out·K·in`` vs ``d_U·K·d_V + out·d_U·d_V + out·d_V·in``).

Precision: every route steps in float32; the banks are decomposed in float64 and held in float32.
Methodology (``benchmarks/timing.py``): in each part the methods run once per round, in a fresh
random order, for ``--rounds`` rounds; each is timed in process CPU time and wall time, and the
ratios to AdaMerging are medians of per-round ratios, printed with the median times and the load
average. A benchmark, not a test: nothing here asserts a time.

    PYTHONPATH=lib:. python benchmarks/adaptation.py            # the numbers in benchmarks/README.md
    PYTHONPATH=lib:. python benchmarks/adaptation.py --quick    # a smoke run (~1 min)
"""

from __future__ import annotations

import argparse
import random
import statistics
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial

import torch

from mergelab.adaptation import Schedule, adapt, build
from mergelab.adaptation.loop import Forward
from mergelab.adaptation.models import CoefficientModel
from mergelab.adaptation.objectives import entropy
from mergelab.bench import BenchSession, MicroSpec, load_bench
from mergelab.profiling import measure, release_memory
from mergelab.synthetic import VIT_B32_ATTENTION, random_taskset
from mergelab.taskset import TaskSet

from timing import ROUNDS, Times, interleave, load, machine, median, median_ratio, now, timed

#: label -> (method, hyper-parameters); the first is the reference.
CONFIGS = {
    "adamerging": ("adamerging", {}),
    "tara_a": ("tara_a", {}),
    "tara_b (full)": ("tara_b", {"space": "full"}),
    "tara_b (core)": ("tara_b", {"space": "core"}),
    "adarank (full)": ("adarank", {"origin": "ta", "space": "full"}),
    "adarank (core)": ("adarank", {"origin": "ta", "space": "core"}),
}
REFERENCE = "adamerging"
PLAIN = "plain forward/backward"


@dataclass(frozen=True)
class Sample:
    """One round of one route: time per iteration (or per step), peak extra memory (bytes), and a
    route-specific count (merged rank; bank directions per module), with the bank build time in part 2."""

    per_iter: Times
    peak: int = 0
    count: int | None = None
    build: Times | None = None


def plain_step(forward: Forward, streams: list[Iterator]) -> None:
    """One forward/backward of the base model on one batch per task, gradients w.r.t. the merged weights."""
    params = {m: w.clone().requires_grad_(True) for m, w in forward.base.items()}
    total = sum(entropy(forward.logits(t, next(s), params)) for t, s in enumerate(streams))
    total.backward()


def plain_sample(forward: Forward, streams: list[Iterator]) -> Sample:
    """The plain step, timed and its peak memory measured."""
    release_memory()
    run, times = timed(lambda: measure(lambda: plain_step(forward, streams)))
    return Sample(times, run.peak_bytes)


def adapt_sample(method: str, hp: Mapping, taskset: TaskSet, forward: Forward, streams: Callable[[], list[Iterator]],
                 warmup: int, iters: int) -> Sample:
    """One ``adapt`` run of ``warmup + iters`` iterations on fresh ``streams()``: the last ``iters`` timed
    (clocks read at the progress callback), the whole call's peak memory and the merged rank."""
    marks: list[Times] = []

    def progress(it: int, _: float) -> None:
        if it in (warmup, warmup + iters):
            marks.append(now())

    release_memory()
    run = measure(lambda: adapt(method, taskset, forward, streams(), Schedule(iters=warmup + iters), progress=progress, **hp))
    return Sample((marks[1] - marks[0]) / iters, run.peak_bytes, max(u.rank for u in run.value.merged.modules.values()))


def micro_end_to_end(args, rng: random.Random) -> dict[str, list[Sample]]:
    """Part 1: ``{route: [sample per round]}``, the plain step and every config interleaved."""
    session = BenchSession(load_bench(MicroSpec(root=args.micro, rank=args.rank)))
    names = session.names[: args.tasks]
    taskset = session.taskset.subset(names)
    forward = session.forward(names, taskset.module_names)
    session.warm()  # the splits and heads before any measurement
    streams = partial(session.val_streams, names, args.batch, 1)
    plain_step(forward, streams())  # first-call initialisation, untimed
    routes = {PLAIN: lambda: plain_sample(forward, streams())}
    for label, (method, hp) in CONFIGS.items():
        routes[label] = partial(adapt_sample, method, hp, taskset, forward, streams, args.warmup, args.iters)
    return interleave(routes, args.rounds, rng)


def merge_step(model: CoefficientModel, grads: Mapping[str, torch.Tensor]) -> None:
    """Form every module's ``ΔW(c)`` and back-propagate ``Σ_m <G_m, ΔW_m(c)>`` to the coefficients."""
    loss = sum((grads[m] * d).sum() for m, d in model.deltas().items())
    torch.autograd.backward(loss, inputs=[p for p in model.parameters() if p.requires_grad])


def step_sample(method: str, hp: Mapping, taskset: TaskSet, grads: Mapping[str, torch.Tensor], steps: int) -> Sample:
    """Build the method's model (timed), one untimed step, then ``steps`` timed steps."""
    release_memory()
    model, built = timed(partial(build, method, taskset, **hp))
    merge_step(model, grads)
    _, stepping = timed(lambda: [merge_step(model, grads) for _ in range(steps)])
    return Sample(stepping / steps, count=sum(b.size for b in model.banks) // len(model.banks), build=built)


def merge_step_vit(args, rng: random.Random) -> dict[str, list[Sample]]:
    """Part 2: ``{config: [sample per round]}``, every config interleaved."""
    taskset = random_taskset(VIT_B32_ATTENTION, args.vit_tasks, rank=args.vit_rank, seed=0)
    g = torch.Generator().manual_seed(1)
    grads = {m: torch.randn(768, 768, generator=g) for m in taskset.module_names}
    routes = {label: partial(step_sample, method, hp, taskset, grads, args.vit_steps) for label, (method, hp) in CONFIGS.items()}
    return interleave(routes, args.rounds, rng)


def times_cells(samples: Mapping[str, list[Sample]], label: str) -> str:
    """Median CPU and wall time per iteration, and medians of per-round ratios to AdaMerging."""
    own, ref = [s.per_iter for s in samples[label]], [s.per_iter for s in samples[REFERENCE]]
    t, ratio = median(own), median_ratio(own, ref)
    return f"{t.cpu:>10.4f}{t.wall:>10.4f}{ratio.cpu:>10.2f}{ratio.wall:>10.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few iterations and tasks: a smoke run")
    parser.add_argument("--micro", default="data/micro", help="the built micro benchmark")
    parser.add_argument("--rank", type=int, default=16, help="adapter rank of the micro benchmark (4 or 16)")
    parser.add_argument("--tasks", type=int, default=8, help="how many micro tasks (default all 8)")
    parser.add_argument("--batch", type=int, default=16, help="images per task per step (default 16, the papers')")
    parser.add_argument("--iters", type=int, default=30, help="timed iterations per method and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first, in the same run (at least 1)")
    parser.add_argument("--vit-tasks", type=int, default=8)
    parser.add_argument("--vit-rank", type=int, default=16)
    parser.add_argument("--vit-steps", type=int, default=5, help="timed merge steps per method and round")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"interleaved rounds (each method once per round; default {ROUNDS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the route order")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine OpenMP threads spin-wait on busy cores)")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.iters, args.warmup, args.rank, args.vit_tasks, args.vit_steps = 3, 5, 1, 4, 3, 2
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the timed iterations start after it)")
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    print(f"torch {torch.__version__} on {torch.get_num_threads()} CPU thread(s) ({machine()}, {load()}); "
          f"{args.rounds} interleaved rounds; every route float32 (banks decomposed in float64); "
          "ratios are medians of per-round ratios")

    samples = micro_end_to_end(args, rng)
    plain = median([s.per_iter for s in samples[PLAIN]])
    plain_peak = statistics.median(s.peak for s in samples[PLAIN])
    print(f"\n1. micro benchmark end to end: {args.tasks} tasks, rank {args.rank}, batch {args.batch}/task, "
          f"{args.iters} timed iterations (after {args.warmup} warm-up)")
    print(f"   {'method':<24}{'CPU s/it':>10}{'wall s/it':>10}{'CPU ×Ada':>10}{'wall ×Ada':>10}{'peak MiB':>10}"
          f"{'x plain f/b':>13}{'merged rank':>13}")
    print(f"   {PLAIN:<24}{plain.cpu:>10.4f}{plain.wall:>10.4f}{'—':>10}{'—':>10}{plain_peak / 2**20:>10.1f}{1:>13.2f}")
    for label in CONFIGS:  # the plain step is one call, not a loop's iteration: its time is shown, not compared
        peak = statistics.median(s.peak for s in samples[label])
        mem_ratio = peak / plain_peak if plain_peak else float("nan")
        print(f"   {label:<24}{times_cells(samples, label)}{peak / 2**20:>10.1f}{mem_ratio:>13.2f}{samples[label][0].count:>13}")
    print(f"   {load()}")

    samples = merge_step_vit(args, rng)
    print(f"\n2. merge step (form ΔW(c) + backward) at ViT-B/32 attention shapes: 48 × (768 × 768), "
          f"T = {args.vit_tasks}, r = {args.vit_rank}, {args.vit_steps} steps")
    print(f"   {'method':<24}{'CPU s/st':>10}{'wall s/st':>10}{'CPU ×Ada':>10}{'wall ×Ada':>10}{'directions/module':>19}"
          f"{'build CPU s':>13}{'build wall s':>14}")
    for label in CONFIGS:
        built = median([s.build for s in samples[label]])
        print(f"   {label:<24}{times_cells(samples, label)}{samples[label][0].count:>19}{built.cpu:>13.2f}{built.wall:>14.2f}")
    print(f"   {load()}")


if __name__ == "__main__":
    main()
