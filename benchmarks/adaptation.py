"""Per-iteration time and peak memory of the adaptive merges, relative to AdaMerging in the same run.

Two parts, both measured in this one process:

1. **micro end to end** — the shipped micro benchmark (``data/micro``; rank ``--rank`` adapters of
   ``--tasks`` tasks, batch ``--batch`` per task): ``mergelab.adaptation.adapt`` for AdaMerging,
   TARA-A, TARA-B (full and core space) and AdaRank (TA origin; full and core space). Time per
   iteration is the loop's own (``AdaptResult.seconds_per_iter``, after ``--warmup`` iterations
   of a separate run); peak memory is the resident-set growth during the whole ``adapt`` call
   (banks, anchors, ``--iters`` iterations; ``mergelab.profiling.measure``), relative to one plain
   forward/backward of the base model on the same batches (T task batches, entropy, gradient with
   respect to the merged weights), the step without any merge.
2. **merge step at ViT-B/32 shapes** — synthetic LoRA factors of the 48 attention matrices of
   ViT-B/32 (768 × 768, ``--vit-tasks`` tasks × rank ``--vit-rank``): the part of a step that the
   methods do differently, forming every module's ``ΔW(c)`` and back-propagating a fixed linear
   functional through it (``Σ_m <G_m, ΔW_m(c)>``), plus the one-off bank construction (SVDs).
   This is where full vs core space differ (``out·K·in`` vs ``d_U·K·d_V + out·d_U·d_V + out·d_V·in``).

A benchmark, not a test: nothing here asserts a time. Ratios compare numbers from this run only.

    PYTHONPATH=lib:. python benchmarks/adaptation.py            # the numbers in benchmarks/README.md
    PYTHONPATH=lib:. python benchmarks/adaptation.py --quick    # a smoke run (~1 min)
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from mergelab.adaptation import adapt, build
from mergelab.adaptation.objectives import entropy
from mergelab.bench import MicroSpec, load_bench
from mergelab.bench import BenchSession
from mergelab.profiling import measure, release_memory
from mergelab.synthetic import VIT_B32_ATTENTION, random_taskset

#: label -> (method, hyper-parameters); the first is the reference.
CONFIGS = {
    "adamerging": ("adamerging", {}),
    "tara_a": ("tara_a", {}),
    "tara_b (full)": ("tara_b", {"space": "full"}),
    "tara_b (core)": ("tara_b", {"space": "core"}),
    "adarank (full)": ("adarank", {"origin": "ta", "space": "full"}),
    "adarank (core)": ("adarank", {"origin": "ta", "space": "core"}),
}


def _mib(n: int) -> float:
    return n / 2**20



def micro_end_to_end(args) -> list[dict]:
    session = BenchSession(load_bench(MicroSpec(root=args.micro, rank=args.rank)))
    names = session.names[: args.tasks]
    taskset = session.taskset.subset(names)
    forward = session.forward(names, taskset.module_names)
    session.warm()  # the splits and heads before any measurement

    def plain_step() -> None:
        params = {m: w.clone().requires_grad_(True) for m, w in forward.base.items()}
        batch = [next(s) for s in session.val_streams(names, args.batch, seed=0)]
        total = sum(entropy(forward.logits(t, x, params)) for t, x in enumerate(batch))
        total.backward()

    plain_step()
    release_memory()
    plain = measure(plain_step)
    rows = [{"label": "plain forward/backward", "seconds_per_iter": plain.wall_s, "peak": plain.peak_bytes}]
    for label, (method, hp) in CONFIGS.items():
        adapt(method, taskset, forward, session.val_streams(names, args.batch, seed=0), iters=args.warmup, **hp)
        release_memory()
        run = measure(lambda method=method, hp=hp: adapt(method, taskset, forward, session.val_streams(names, args.batch, seed=1),
                                                         iters=args.iters, **hp))
        rows.append({"label": label, "seconds_per_iter": run.value.seconds_per_iter, "peak": run.peak_bytes,
                     "rank": max(u.rank for u in run.value.merged.modules.values())})
    return rows


def merge_step_vit(args) -> list[dict]:
    taskset = random_taskset(VIT_B32_ATTENTION, args.vit_tasks, rank=args.vit_rank, seed=0)
    g = torch.Generator().manual_seed(1)
    grads = {m: torch.randn(768, 768, generator=g) for m in taskset.module_names}
    rows = []
    for label, (method, hp) in CONFIGS.items():
        release_memory()
        built = measure(lambda method=method, hp=hp: build(method, taskset, **hp))
        model = built.value
        params = list(model.parameters())

        def step(model=model, params=params) -> None:
            deltas = model.deltas()
            loss = sum((grads[m] * d).sum() for m, d in deltas.items())
            torch.autograd.backward(loss, inputs=[p for p in params if p.requires_grad])

        step()
        start = time.perf_counter()
        for _ in range(args.vit_steps):
            step()
        rows.append({"label": label, "seconds_per_iter": (time.perf_counter() - start) / args.vit_steps,
                     "build_s": built.wall_s, "directions": sum(b.size for b in model.banks) // len(model.banks)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few iterations and tasks: a smoke run")
    parser.add_argument("--micro", default="data/micro", help="the built micro benchmark")
    parser.add_argument("--rank", type=int, default=16, help="adapter rank of the micro benchmark (4 or 16)")
    parser.add_argument("--tasks", type=int, default=8, help="how many micro tasks (default all 8)")
    parser.add_argument("--batch", type=int, default=16, help="images per task per step (default 16, the papers')")
    parser.add_argument("--iters", type=int, default=30, help="timed iterations per method")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations per method first")
    parser.add_argument("--vit-tasks", type=int, default=8)
    parser.add_argument("--vit-rank", type=int, default=16)
    parser.add_argument("--vit-steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine OpenMP threads spin-wait on busy cores)")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.iters, args.warmup, args.rank, args.vit_tasks, args.vit_steps = 3, 5, 1, 4, 3, 2
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__} on {torch.get_num_threads()} CPU thread(s) ({platform.machine()})")

    rows = micro_end_to_end(args)
    plain, ref = rows[0], rows[1]
    print(f"\n1. micro benchmark end to end: {args.tasks} tasks, rank {args.rank}, batch {args.batch}/task, "
          f"{args.iters} timed iterations (after {args.warmup} warm-up)")
    print(f"   {'method':<24}{'s/iter':>9}{'x AdaMerging':>14}{'peak MiB':>10}{'x plain f/b':>13}{'merged rank':>13}")
    for row in rows:  # the plain step is one measured call: its time is shown, not compared
        time_ratio = "—" if row is plain else f"{row['seconds_per_iter'] / ref['seconds_per_iter']:.2f}"
        mem_ratio = row["peak"] / plain["peak"] if plain["peak"] else float("nan")
        print(f"   {row['label']:<24}{row['seconds_per_iter']:>9.4f}{time_ratio:>14}{_mib(row['peak']):>10.1f}"
              f"{mem_ratio:>13.2f}{row.get('rank', ''):>13}")

    rows = merge_step_vit(args)
    ref = rows[0]
    print(f"\n2. merge step (form ΔW(c) + backward) at ViT-B/32 attention shapes: 48 × (768 × 768), "
          f"T = {args.vit_tasks}, r = {args.vit_rank}, {args.vit_steps} steps")
    print(f"   {'method':<24}{'s/step':>9}{'x AdaMerging':>14}{'directions/module':>19}{'bank build s':>14}")
    for row in rows:
        print(f"   {row['label']:<24}{row['seconds_per_iter']:>9.4f}{row['seconds_per_iter'] / ref['seconds_per_iter']:>14.2f}"
              f"{row['directions']:>19}{row['build_s']:>14.2f}")


if __name__ == "__main__":
    main()
