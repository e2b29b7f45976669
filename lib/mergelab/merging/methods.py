"""``METHODS``: the registry of merge methods, the only place that enumerates them (the CLI, sweeps,
studies and notebooks read it; :mod:`mergelab.merging` re-exports it).

Adding a method: write ``def my_method(deltas: Sequence[Tensor], *, alpha: float = 1.0, ...) ->
Tensor`` with a docstring citing the paper and equation in its family module, then add one line here:
``"my_method": MergeMethod(my_method, grid={...}, inputs="matrices", nonmatrix="mean", identity={})``
(``inputs``, ``side``, ``nonmatrix`` and what :mod:`mergelab.conformance` checks, ``identity``,
``stochastic``, ``linear``, are described in :mod:`mergelab.merging.registry`).

``grid`` lists the values searched per hyper-parameter (defaults from 001 App. C.3, 003
App. D.2 and REFERENCES); how to search them (product or coordinate-wise as 003 does) is the
selection's business. Closed-form, data-free methods (average, MetaGPT, NormAvg) have none.
"""

from __future__ import annotations

import math

from mergelab.merging.arithmetic import average, metagpt, normavg, task_arithmetic
from mergelab.merging.consensus import consensus, consensus_feasible
from mergelab.merging.lora import linear, lora_lego, lora_lego_feasible
from mergelab.merging.registry import MergeMethod, MethodRegistry
from mergelab.merging.regmean import regmean
from mergelab.merging.sparsify import breadcrumbs, dare_linear, dare_ties, keeps_entries, magnitude_prune, ties
from mergelab.merging.spectral import cart, iso_c, iso_cts, star, svd_of_sum, svd_rank_feasible, tsv
from mergelab.params import Interval

__all__ = ["METHODS"]


def _steps(start: float, stop: float, step: float) -> tuple[float, ...]:
    return tuple(round(start + i * step, 4) for i in range(int(round((stop - start) / step)) + 1))


LAMBDA_TA = _steps(0.1, 1.0, 0.1)  # 001 App. C.3: TA scaling 0.1 … 1.0
LAMBDA_TIES = _steps(0.8, 1.8, 0.1)  # 001 App. C.3: TIES / DARE-TIES λ 0.8 … 1.8
ETA = _steps(0.1, 0.9, 0.1)  # 001 App. C.3: pruning coefficient 0.1 … 0.9
TOP_K = _steps(0.1, 1.0, 0.1)  # 003 App. D.2: top-K 10 %, 20 %, …
ALPHA_SVD = _steps(0.1, 3.0, 0.1)  # TSV / Iso originals: linspace(0, 3, 31)[1:]

UNIT_OPEN_LOW = Interval(0.0, 1.0, low_open=True)
PROBABILITY = Interval(0.0, 1.0, high_open=True)
POSITIVE_INT = Interval(1, math.inf)
SEED = Interval(0, 2**32 - 1)
RTOL = Interval(0.0, 1.0, low_open=True, high_open=True)

METHODS: MethodRegistry = MethodRegistry({
    "average": MergeMethod(average, inputs="tensors", nonmatrix="self", identity={}, linear=True),
    "task_arithmetic": MergeMethod(task_arithmetic, grid={"alpha": LAMBDA_TA}, inputs="tensors", nonmatrix="self",
                                   identity={"alpha": 1.0}, linear=True),
    "ties": MergeMethod(ties, grid={"alpha": LAMBDA_TIES, "density": ETA}, inputs="tensors", nonmatrix="self",
                        intervals={"density": UNIT_OPEN_LOW}, post=True, feasible=keeps_entries, identity={"density": 1.0}),
    "dare_linear": MergeMethod(dare_linear, grid={"alpha": LAMBDA_TA, "p": ETA}, inputs="tensors", nonmatrix="self",
                               intervals={"p": PROBABILITY, "seed": SEED}, post=True, feasible=keeps_entries,
                               identity={"p": 0.0, "alpha": 1.0}, stochastic=True),
    "dare_ties": MergeMethod(dare_ties, grid={"alpha": LAMBDA_TIES, "p": ETA, "density": TOP_K}, inputs="tensors",
                             nonmatrix="self", intervals={"p": PROBABILITY, "density": UNIT_OPEN_LOW, "seed": SEED}, post=True,
                             feasible=keeps_entries, identity={"p": 0.0}, stochastic=True),
    "magnitude_prune": MergeMethod(magnitude_prune, grid={"alpha": LAMBDA_TA, "density": ETA}, inputs="tensors",
                                   nonmatrix="self", intervals={"density": UNIT_OPEN_LOW}, post=True, feasible=keeps_entries,
                                   identity={"density": 1.0, "alpha": 1.0}),
    "breadcrumbs": MergeMethod(breadcrumbs, grid={"alpha": LAMBDA_TA, "density": (0.7, 0.8, 0.9), "gamma": (0.005, 0.01, 0.02)},
                               inputs="tensors", nonmatrix="self",
                               intervals={"density": UNIT_OPEN_LOW, "gamma": PROBABILITY}, post=True, feasible=keeps_entries,
                               identity={"density": 1.0, "gamma": 0.0, "alpha": 1.0}),
    "consensus": MergeMethod(consensus, grid={"alpha": LAMBDA_TA, "lam": (0.2, 0.3, 0.4, 0.5, 0.6)}, inputs="tensors",
                             nonmatrix="self", intervals={"lam": Interval(0.0), "k": POSITIVE_INT}, feasible=consensus_feasible,
                             identity={"k": 1, "alpha": 1.0}),
    "metagpt": MergeMethod(metagpt, inputs="tensors", side=("norms",), nonmatrix="self",
                           intervals={"power": Interval(0.0, low_open=True)}, identity={}, linear=True),
    "normavg": MergeMethod(normavg, inputs="tensors", side=("norms",), nonmatrix="self", identity={}, linear=True),
    "tsv": MergeMethod(tsv, grid={"alpha": ALPHA_SVD}, intervals={"rank_rtol": RTOL}, factored=True, identity={}),
    "iso_c": MergeMethod(iso_c, grid={"alpha": ALPHA_SVD}, intervals={"rank_rtol": RTOL}, post=True, isometric=True,
                         frame=True),
    "iso_cts": MergeMethod(iso_cts, grid={"alpha": ALPHA_SVD, "common_fraction": (0.7, 0.8, 0.9)},
                           intervals={"common_fraction": Interval(0.0, 1.0), "rank_rtol": RTOL}, post=True, isometric=True,
                           frame=True),
    "cart": MergeMethod(cart, grid={"rank_ratio": (0.04, 0.08, 0.16, 0.32), "lam": ALPHA_SVD},
                        intervals={"rank_ratio": UNIT_OPEN_LOW, "lam": Interval(0.0)}, identity={}),
    "star": MergeMethod(star, grid={"eta": (20.0, 40.0, 60.0, 80.0)}, intervals={"eta": Interval(0.0, 100.0, low_open=True)}, post=True,
                         isometric=True, identity={"eta": 100.0}),
    "svd": MergeMethod(svd_of_sum, grid={"alpha": LAMBDA_TA}, nonmatrix="sum", intervals={"rank": POSITIVE_INT}, post=True,
                       isometric=True, feasible=svd_rank_feasible, identity={"alpha": 1.0}),
    "linear": MergeMethod(linear, grid={"alpha": LAMBDA_TA}, inputs="factors", side=("scalings",), nonmatrix="sum",
                         identity={"alpha": 1.0}),
    "lora_lego": MergeMethod(lora_lego, grid={"k": (8, 16, 32, 64, 128), "param_reweight": (True, False),
                                              "output_reweight": (True, False)},
                             inputs="factors", nonmatrix="mean", intervals={"k": POSITIVE_INT, "n_init": POSITIVE_INT,
                                                                           "seed": SEED}, feasible=lora_lego_feasible, identity={}),
    "regmean": MergeMethod(regmean, grid={"nondiag": (0.1, 0.3, 0.5, 0.7, 0.9, 0.95)}, side=("grams",),
                           intervals={"nondiag": Interval(0.0, 1.0)}, identity={}),
})
