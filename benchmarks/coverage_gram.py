"""Coverage statistics by the Gram route vs a naive vectorised SVD (issue 6: goal >= 100x faster).

One 768 x 768 module (a ViT-B/32 attention projection) with T = 8 LoRA tasks of rank r = 16, i.e.
K = 128 rank-1 directions. Both routes compute the statistics of 001 Sec. 2.2 / App. D and 002
Sec. 4 for that module:

- naive: vectorise every rank-1 direction ``b a^T`` and every ``Delta W_t`` (rows of 589,824
  float64 entries), take explicit SVDs of the stacks (per task, Delta W stack, rank-1 stack) and
  of each dense ``Delta W_t`` (95 %-energy rank);
- Gram: ``mergelab.analysis.coverage.subspace_coverage`` (one K x K direction Gram from the
  factors, its blocks and block sums; energy ranks from r x r cores).

The script first checks that both give the same numbers, then times them in the same process
(best of ``--repeats`` for the naive route, of 100 runs for the Gram route) and prints both times and their ratio; it also reports the eranks alone
(the three stacks, without the energy ranks).

    PYTHONPATH=lib:. python benchmarks/coverage_gram.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import numpy as np
import torch

from mergelab.analysis.coverage import erank, erank_gram, subspace_coverage
from mergelab.analysis.factored import block_sum, direction_gram
from mergelab.analysis.spectra import energy_rank
from mergelab.synthetic import random_taskset

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


def best_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per route (best is kept)")
    parser.add_argument("--size", type=int, default=768)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
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
    t_gram = best_time(lambda: subspace_coverage(ts), 100)
    t_naive = best_time(lambda: naive_coverage(updates), args.repeats)
    t_naive_erank = best_time(lambda: naive_coverage(updates, with_energy_rank=False), args.repeats)
    t_gram_erank = best_time(lambda: gram_eranks(updates), 100)

    print(f"coverage of one {args.size}x{args.size} module, T={args.tasks} tasks x r={args.rank} = K={K} directions "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()})")
    print("  same results: erank per task / Delta W stack / rank-1 stack and 95%-energy ranks agree (rtol 1e-8)")
    print(f"  naive vectorised SVD : {t_naive:9.4f} s   (eranks only: {t_naive_erank:.4f} s)")
    print(f"  Gram route           : {t_gram:9.4f} s   (eranks only: {t_gram_erank:.4f} s)")
    print(f"  speed-up             : {t_naive / t_gram:9.1f} x  (eranks only: {t_naive_erank / t_gram_erank:.1f} x; goal >= 100 x)")


if __name__ == "__main__":
    main()
