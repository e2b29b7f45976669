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

    PYTHONPATH=lib:. python benchmarks/jacobian.py [--images 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from mergelab.analysis import anisotropy as an
from mergelab.analysis.batches import task_loss
from mergelab.bench import MicroSpec, load_bench
from mergelab.bench import BenchSession
from mergelab.merging import merge

ROOT = Path(__file__).resolve().parents[1]


def plain_backwards(backbone, heads, batches, params) -> float:
    """Seconds for one plain backward pass per task: its loss differentiated w.r.t. every encoder weight."""
    start = time.perf_counter()
    for head, task_batches in zip(heads, batches, strict=True):
        leaves = {m: w.detach().clone().requires_grad_(True) for m, w in params.items() if w.is_floating_point()}
        for images, labels in task_batches:
            loss = task_loss(backbone, head, images, labels, {**params, **leaves})
            torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="validation images per task")
    parser.add_argument("--rank", type=int, default=16, help="micro adapter rank (4 or 16)")
    parser.add_argument("--module", default="transformer.resblocks.2.attn.v_proj.weight")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    session = BenchSession(load_bench(MicroSpec(root=ROOT / "data" / "micro", rank=args.rank)))
    taskset, backbone, tasks = session.taskset, session.backbone, session.names
    batches = [session.val_batches(n, batch_size=args.images, batches=1) for n in tasks]
    heads = [session.head(n) for n in tasks]
    params = {**session.base, **session.weights(merge(taskset, "task_arithmetic", "full", alpha=0.3))}
    names = list(taskset.module_names)

    an.loss_gradients(backbone, heads[:1], batches[:1], params, names)  # warm-up (lazy initialisation), untimed
    plain = plain_backwards(backbone, heads, batches, params)
    start = time.perf_counter()
    _, grads = an.loss_gradients(backbone, heads, batches, params, names)
    t_grads = time.perf_counter() - start
    bases = {(m, b): build(taskset.updates(m)) for m in names for b, build in an.BASES.items()}
    t_bases = time.perf_counter() - start - t_grads
    J = {key: torch.stack([an.sensitivities(g[key[0]], basis) for g in grads]) for key, basis in bases.items()}
    fast = time.perf_counter() - start
    n_all = sum(basis.size for basis in bases.values())

    basis = bases[(args.module, "raw")]
    start = time.perf_counter()
    slow_J = torch.stack([an.naive_sensitivities(backbone, heads[t], batches[t], params, args.module, basis)
                          for t in range(len(tasks))])
    slow = time.perf_counter() - start
    err = float(((slow_J - J[(args.module, "raw")]).abs().max() / J[(args.module, "raw")].abs().max()))
    per_direction = slow / (basis.size * len(tasks))

    T = len(tasks)
    print(f"restricted Jacobian on the micro benchmark: T={T} tasks x r={args.rank}, {len(names)} modules, "
          f"{args.images} val images per task (torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()})")
    print(f"  agreement on {args.module} (RAW, K={basis.size}): max |J_naive - J| / max |J| = {err:.2e}")
    print(f"  one backward per task, every module, RAW+SVD ({n_all} directions x {T} tasks): {fast:9.3f} s")
    print(f"  {T} plain backward passes (every encoder weight, no Jacobian): {plain:9.3f} s")
    print(f"  extraction / plain backward passes: {fast / plain:8.2f} x   (goal <= 1.5; gradients {t_grads:.3f} s = "
          f"{t_grads / plain:.2f} x, bases {t_bases:.3f} s, J {fast - t_grads - t_bases:.3f} s)")
    print(f"  one backward per direction, one module, RAW ({basis.size} directions x {T} tasks): {slow:9.3f} s")
    print(f"  measured ratio (one module's RAW directions by the naive route / everything by one backward per task): {slow / fast:8.1f} x")
    print(f"  extrapolated naive cost of everything ({n_all * T} backward passes x {per_direction * 1e3:.2f} ms): "
          f"{per_direction * n_all * T:9.1f} s -> ratio {per_direction * n_all * T / fast:8.1f} x")


if __name__ == "__main__":
    main()
