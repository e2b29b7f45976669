"""Coverage statistics by the Gram route vs a naive vectorised SVD (issue 6: goal >= 100x faster).

One 768 x 768 module (a ViT-B/32 attention projection) with T = 8 LoRA tasks of rank r = 16, i.e.
K = 128 rank-1 directions. Both routes compute the statistics of 001 Sec. 2.2 / App. D and 002
Sec. 4 for that module:

- naive: vectorise every rank-1 direction ``b a^T`` and every ``Delta W_t`` (rows of 589,824
  float64 entries), take explicit SVDs of the stacks (per task, Delta W stack, rank-1 stack) and
  of each dense ``Delta W_t`` (95 %-energy rank);
- Gram: ``mergelab.analysis.coverage.subspace_coverage`` (one K x K direction Gram from the
  factors, its blocks and block sums; energy ranks from r x r cores).

Both routes are float64 throughout (from float32 factors). The script first checks that both give
the same numbers, then times four routes: each route in full and the eranks alone (the three stacks,
without the energy ranks). Methodology (``benchmarks/timing.py``): the four routes run once per round,
in a fresh random order, for ``--rounds`` rounds (a Gram route as ``--gram-calls`` calls, its time per
call reported); each is timed in process CPU time and wall time, and the speed-ups are medians of
per-round ratios, printed with the median times and the load average.

    PYTHONPATH=lib:. python benchmarks/coverage_gram.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable

import numpy as np
import torch

from mergelab.analysis.coverage import erank, erank_gram, subspace_coverage
from mergelab.analysis.factored import block_sum, direction_gram
from mergelab.analysis.spectra import energy_rank
from mergelab.synthetic import random_taskset

from timing import ROUNDS, load, machine, median, median_ratio, timed_routes

MODULE = "visual.transformer.resblocks.0.attn.q_proj.weight"


def naive_coverage(updates, energy: float = 0.95, with_energy_rank: bool = True) -> dict[str, object]:
    """The three eranks (and energy ranks) from explicitly vectorised stacks, float64 SVDs."""
    rows = [torch.einsum("oj,ji->joi", u.B.double(), u.A.double()).reshape(u.rank, -1) for u in updates]  # (r_t, d*m)
    aware = torch.cat(rows)  # (K, d*m)
    agnostic = torch.stack([r.sum(0) for r in rows])  # vec(Delta W_t) = sum of its rank-1 rows, (T, d*m)
    out: dict[str, object] = {
        "erank_task": [erank(r) for r in rows],
        "erank_agnostic": erank(agnostic),
        "erank_aware": erank(aware),
    }
    if with_energy_rank:
        out["energy_rank"] = [energy_rank(torch.linalg.svdvals(u.dense(torch.float64)), energy) for u in updates]
    return out


def gram_eranks(updates) -> dict[str, object]:
    """The three eranks alone by the Gram route (what ``subspace_coverage`` does per module)."""
    H = direction_gram(updates)  # (K, K)
    edges = np.cumsum([0] + [u.rank for u in updates])
    return {
        "erank_task": [erank_gram(H[a:b, a:b]) for a, b in zip(edges[:-1], edges[1:])],
        "erank_agnostic": erank_gram(block_sum(H, [u.rank for u in updates])),
        "erank_aware": erank_gram(H),
    }


def repeated(fn: Callable[[], object], calls: int) -> Callable[[], None]:
    """``fn`` called ``calls`` times in a row (one timed route: a fast call is timed as many)."""
    def route() -> None:
        for _ in range(calls):
            fn()
    return route


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", "--repeats", type=int, default=ROUNDS,
                        help=f"interleaved rounds (each route once per round; default {ROUNDS})")
    parser.add_argument("--gram-calls", type=int, default=100, help="calls of a Gram route per round (its time is per call)")
    parser.add_argument("--size", type=int, default=768)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="seed of the route order")
    args = parser.parse_args()

    ts = random_taskset({MODULE: (args.size, args.size)}, args.tasks, rank=args.rank, seed=0)
    updates = ts.updates(MODULE)
    K = args.tasks * args.rank

    ds = subspace_coverage(ts)
    ref = naive_coverage(updates)
    assert np.allclose(ds.erank_task.values[:, 0], ref["erank_task"], rtol=1e-8)
    assert np.isclose(float(ds.erank_agnostic[0]), ref["erank_agnostic"], rtol=1e-8)
    assert np.isclose(float(ds.erank_aware[0]), ref["erank_aware"], rtol=1e-8)
    assert ds.energy_rank.values[:, 0].tolist() == ref["energy_rank"]

    assert np.allclose(gram_eranks(updates)["erank_task"], ref["erank_task"], rtol=1e-8)
    routes = {"naive": lambda: naive_coverage(updates), "naive eranks": lambda: naive_coverage(updates, with_energy_rank=False),
              "gram": repeated(lambda: subspace_coverage(ts), args.gram_calls),
              "gram eranks": repeated(lambda: gram_eranks(updates), args.gram_calls)}
    samples = timed_routes(routes, args.rounds, random.Random(args.seed))
    samples = {label: [t / (args.gram_calls if label.startswith("gram") else 1) for t in times] for label, times in samples.items()}
    t = {label: median(times) for label, times in samples.items()}
    full, eranks = median_ratio(samples["naive"], samples["gram"]), median_ratio(samples["naive eranks"], samples["gram eranks"])

    print(f"coverage of one {args.size}x{args.size} module, T={args.tasks} tasks x r={args.rank} = K={K} directions "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads, {machine()}, {load()}); "
          f"median of {args.rounds} interleaved rounds, CPU / wall seconds")
    print("  same results: erank per task / Delta W stack / rank-1 stack and 95%-energy ranks agree (rtol 1e-8)")
    print(f"  naive vectorised SVD (float64): {t['naive'].cpu:9.4f} / {t['naive'].wall:9.4f} s   "
          f"(eranks only: {t['naive eranks'].cpu:.4f} / {t['naive eranks'].wall:.4f} s)")
    print(f"  Gram route (float64)          : {t['gram'].cpu:9.4f} / {t['gram'].wall:9.4f} s   "
          f"(eranks only: {t['gram eranks'].cpu:.4f} / {t['gram eranks'].wall:.4f} s)")
    print(f"  speed-up, CPU / wall          : {full.cpu:9.1f} / {full.wall:9.1f} x  (eranks only: {eranks.cpu:.1f} / {eranks.wall:.1f} x; "
          f"goal >= 100 x; medians of per-round ratios)")
    print(f"  {load()} after")


if __name__ == "__main__":
    main()
