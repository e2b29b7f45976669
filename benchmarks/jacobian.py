"""Cost of the restricted Jacobian J (001 Eq. (3)): one backward pass per task vs one per direction.

Both routes run in this process on the same inputs (the shipped micro benchmark, its 8 tasks,
rank-16 adapters, the first ``--images`` validation images of each task, the Task Arithmetic
merge with λ = 0.3):

* one-backward: ``mergelab.analysis.anisotropy.loss_gradients`` (one backward pass per task gives
  ``G_i`` of every module) and ``sensitivities`` (``J[i, k] = ℓ_kᵀ G_i r_k``) for **every** module
  and both bases (RAW and SVD);
* per-direction: ``naive_sensitivities`` (``d/dε f_i(W + ε S_k)`` with ``S_k`` formed densely, one
  backward pass per direction and task) for every RAW direction of **one** module only.

The script checks that the two routes agree on that module, prints both times, the measured ratio
(per-direction time for one module's RAW directions / one-backward time for everything) and the
extrapolated ratio for the whole analysis (per-direction cost × all directions of all modules and
both bases). Issue 6's goal is stated against a third route, **N plain backward passes** (each
task's loss differentiated with respect to every encoder weight, as one training step would): the
whole extraction (gradients, both bases of every module, every ``J``) should cost at most 1.5× that.

Precision: the encoder runs in float32 on every route; bases and ``J`` are float64. Methodology
(``benchmarks/timing.py``): the four routes (plain backward passes, the gradients alone, the whole
extraction, the per-direction route) run once per round, in a fresh random order, for ``--rounds``
rounds, after one untimed pass of each (the agreement check); each is timed in process CPU time and
wall time, ratios are medians of per-round ratios, printed with the median times and the load average.

    PYTHONPATH=lib:. python benchmarks/jacobian.py [--images 32] [--threads 2] [--rounds 5]
    PYTHONPATH=lib:. python benchmarks/jacobian.py --images 4 --rank 4 --rounds 2   # a smoke run
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from mergelab.analysis import anisotropy as an
from mergelab.analysis.batches import task_loss
from mergelab.bench import BenchSession, MicroSpec, load_bench
from mergelab.merging import merge
from mergelab.taskset import TaskSet

from timing import ROUNDS, load, machine, median, median_ratio, timed_routes

ROOT = Path(__file__).resolve().parents[1]


def plain_backwards(backbone, heads: Sequence, batches: Sequence, params: Mapping[str, torch.Tensor]) -> None:
    """One plain backward pass per task: its loss differentiated w.r.t. every encoder weight."""
    for head, task_batches in zip(heads, batches, strict=True):
        leaves = {m: w.detach().clone().requires_grad_(True) for m, w in params.items() if w.is_floating_point()}
        for images, labels in task_batches:
            loss = task_loss(backbone, head, images, labels, {**params, **leaves})
            torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)


def extraction(taskset: TaskSet, backbone, heads: Sequence, batches: Sequence, params: Mapping[str, torch.Tensor]) -> dict:
    """The whole one-backward route: gradients, both bases of every module, every ``J``; ``{(module, basis): J}``."""
    names = list(taskset.module_names)
    _, grads = an.loss_gradients(backbone, heads, batches, params, names)
    bases = {(m, b): build(taskset.updates(m)) for m in names for b, build in an.BASES.items()}
    return {key: torch.stack([an.sensitivities(g[key[0]], basis) for g in grads]) for key, basis in bases.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="validation images per task")
    parser.add_argument("--rank", type=int, default=16, help="micro adapter rank (4 or 16)")
    parser.add_argument("--module", default="transformer.resblocks.2.attn.v_proj.weight")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"interleaved rounds (each route once per round; default {ROUNDS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the route order")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    session = BenchSession(load_bench(MicroSpec(root=ROOT / "data" / "micro", rank=args.rank)))
    taskset, backbone, tasks = session.taskset, session.backbone, session.names
    batches = [session.val_batches(n, batch_size=args.images, batches=1) for n in tasks]
    heads = [session.head(n) for n in tasks]
    params = {**session.base, **session.weights(merge(taskset, "task_arithmetic", "full", alpha=0.3))}
    names = list(taskset.module_names)
    T = len(tasks)
    basis = an.BASES["raw"](taskset.updates(args.module))

    def naive() -> torch.Tensor:
        return torch.stack([an.naive_sensitivities(backbone, heads[t], batches[t], params, args.module, basis) for t in range(T)])

    J = extraction(taskset, backbone, heads, batches, params)  # untimed: the agreement check, and first-call initialisation
    plain_backwards(backbone, heads, batches, params)
    err = float(((naive() - J[(args.module, "raw")]).abs().max() / J[(args.module, "raw")].abs().max()))
    n_all = sum(j.shape[1] for j in J.values())
    routes = {"plain": lambda: plain_backwards(backbone, heads, batches, params),
              "gradients": lambda: an.loss_gradients(backbone, heads, batches, params, names),
              "extraction": lambda: extraction(taskset, backbone, heads, batches, params),
              "naive": naive}
    samples = timed_routes(routes, args.rounds, random.Random(args.seed))
    t = {label: median(times) for label, times in samples.items()}
    over_plain, grads_over_plain = median_ratio(samples["extraction"], samples["plain"]), median_ratio(samples["gradients"], samples["plain"])
    measured = median_ratio(samples["naive"], samples["extraction"])
    per_direction = t["naive"] / (basis.size * T)
    everything = per_direction * (n_all * T)

    print(f"restricted Jacobian on the micro benchmark: T={T} tasks x r={args.rank}, {len(names)} modules, "
          f"{args.images} val images per task (torch {torch.__version__}, {torch.get_num_threads()} threads, {machine()}, {load()}); "
          f"float32 encoder, float64 bases and J; median of {args.rounds} interleaved rounds, CPU / wall")
    print(f"  agreement on {args.module} (RAW, K={basis.size}): max |J_naive - J| / max |J| = {err:.2e}")
    print(f"  one backward per task, every module, RAW+SVD ({n_all} directions x {T} tasks): "
          f"{t['extraction'].cpu:9.3f} / {t['extraction'].wall:9.3f} s")
    print(f"  {T} plain backward passes (every encoder weight, no Jacobian): {t['plain'].cpu:9.3f} / {t['plain'].wall:9.3f} s")
    print(f"  extraction / plain backward passes: {over_plain.cpu:8.2f} / {over_plain.wall:.2f} x   (goal <= 1.5; gradients "
          f"{t['gradients'].cpu:.3f} / {t['gradients'].wall:.3f} s = {grads_over_plain.cpu:.2f} / {grads_over_plain.wall:.2f} x)")
    print(f"  one backward per direction, one module, RAW ({basis.size} directions x {T} tasks): {t['naive'].cpu:9.3f} / {t['naive'].wall:9.3f} s")
    print(f"  measured ratio (one module's RAW directions by the naive route / everything by one backward per task): "
          f"{measured.cpu:8.1f} / {measured.wall:.1f} x")
    print(f"  extrapolated naive cost of everything ({n_all * T} backward passes x {per_direction.cpu * 1e3:.2f} / {per_direction.wall * 1e3:.2f} ms): "
          f"{everything.cpu:9.1f} / {everything.wall:.1f} s -> ratio {everything.cpu / t['extraction'].cpu:8.1f} / "
          f"{everything.wall / t['extraction'].wall:.1f} x (of median times)")
    print(f"  {load()} after")


if __name__ == "__main__":
    main()
