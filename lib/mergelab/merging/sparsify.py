"""Element-wise sparsification and sign consensus: TIES, DARE, magnitude pruning, Breadcrumbs.

Shared semantics (the reference implementations disagree on these points; here are
the choices, each also stated in the method's docstring):

* **Trim scope**: the tensor a method is given. Per module in the full and core spaces
  (PEFT, mergekit, Core Space's per-layer merger); global across layers in the KnOTS paper
  variant and with ``scope="model"`` (original TIES / KnOTS code) — the space decides.
* **Top-k**: exactly ``k = int(density · numel)`` entries by magnitude (``torch.topk``, as
  PEFT), not a ``kthvalue`` threshold that keeps every tie (KnOTS / FusionBench).
  ``density`` is the kept fraction (KnOTS' "topK 20" is ``density=0.2``).
* **Sign election** on the *unweighted* trimmed values (TIES paper, PEFT): ``"sum"`` elects
  ``sign(Σ_t τ_t)`` (PEFT "total"), ``"count"`` elects ``sign(Σ_t sign τ_t)`` (PEFT
  "frequency"); a zero total elects ``+`` (PEFT, mergekit).
* **Disjoint mean**: the mean over the tasks whose (non-zero) entry agrees with the elected
  sign; entries nobody keeps stay 0.
* **Weights**: one global ``alpha`` multiplies the result (001 λ, 003 α). PEFT's per-task
  ``weights`` enter after the election, so PEFT with all weights equal to ``alpha`` is the
  same function (tests/test_merging_peft.py).
* **DARE**: drop each entry with probability ``p`` (001's and 003's notation; PEFT's
  ``density = 1 − p``), rescale survivors by ``1/(1 − p)`` (not mergekit's L1 rescaling).
  Masks come from ``torch.Generator().manual_seed(seed)``, drawn task by task in order; the
  merge driver derives a distinct seed per module. Inputs are never modified in place (the
  Core Space code's cache bug).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from mergelab.errors import InputError
from mergelab.taskset import TaskSet

__all__ = ["breadcrumbs", "dare_linear", "dare_ties", "disjoint_mean", "elect_sign", "keeps_entries", "magnitude_prune",
           "magnitude_trim", "random_drop", "ties"]

Sign = Literal["sum", "count"]


def magnitude_trim(stacked: Tensor, density: float) -> Tensor:
    """TIES "trim" of every task at once: each task's tensor (``stacked[t]``) keeps its own
    ``int(density · numel)`` largest-magnitude entries, the rest are zeroed."""
    if density >= 1:
        return stacked
    flat = stacked.reshape(stacked.shape[0], -1)  # (T, numel)
    kept = flat.abs().topk(int(density * flat.shape[1]), dim=1, sorted=False).indices
    return torch.zeros_like(flat).scatter_(1, kept, flat.gather(1, kept)).reshape(stacked.shape)


def random_drop(delta: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """DARE (Yu et al., 2024; 001 Sec. 4 (iv)): drop each entry with probability ``p`` and
    rescale the survivors by ``1/(1 − p)``, so ``E[result] = delta``. The keep probability is
    held in float32 for half-precision inputs (bf16 would round 0.9 to 0.898); float32 and float64
    inputs draw in their own dtype, PEFT's random stream."""
    if p <= 0:
        return delta
    dtype = delta.dtype if delta.dtype in (torch.float32, torch.float64) else torch.float32
    keep = torch.bernoulli(torch.full(delta.shape, 1.0 - p, dtype=dtype, device=delta.device), generator=generator)
    return delta * keep.to(delta.dtype) / (1.0 - p)


def elect_sign(stacked: Tensor, sign: Sign = "sum") -> Tensor:
    """TIES "elect" (Yadav et al., 2023, Eq. 2 of the TIES paper): per entry, whether ``+`` is
    elected (``True``) or ``-``, from the sum of the values (``"sum"``) or of their signs
    (``"count"``); ties elect ``+``."""
    total = stacked.sum(dim=0) if sign == "sum" else stacked.sign().sum(dim=0)
    return total >= 0


def disjoint_mean(stacked: Tensor, positive: Tensor) -> Tensor:
    """TIES "disjoint merge": the mean over tasks whose non-zero entry has the elected sign
    (``positive``: :func:`elect_sign`)."""
    agree = torch.where(positive, stacked > 0, stacked < 0)
    return torch.where(agree, stacked, 0.0).sum(dim=0) / agree.sum(dim=0).clamp_min(1)


def ties(deltas: Sequence[Tensor], *, density: float = 0.2, alpha: float = 1.0, sign: Sign = "sum") -> Tensor:
    """TIES-Merging (Yadav et al., 2023; 001 Sec. 4 (iii); 003 Sec. 5): trim each task to its
    top ``density`` fraction by magnitude, elect a sign per entry, take the disjoint mean, and
    scale by ``alpha``. Semantics: module docstring. Defaults: ``density=0.2`` (TIES paper's
    k = 20 %), ``alpha=1`` (001 App. C.3 searches λ ∈ 0.8 … 1.8)."""
    trimmed = magnitude_trim(torch.stack(list(deltas)), density)
    return alpha * disjoint_mean(trimmed, elect_sign(trimmed, sign))


def dare_linear(deltas: Sequence[Tensor], *, p: float = 0.5, alpha: float = 0.3, seed: int = 0) -> Tensor:
    """DARE + task arithmetic (Yu et al., 2024): ``alpha · Σ_t DARE_p(τ_t)`` (PEFT ``dare_linear``).
    Default ``p=0.5`` (FusionBench), ``alpha=0.3`` (TA)."""
    g = torch.Generator().manual_seed(seed)
    return alpha * torch.stack([random_drop(d, p, g) for d in deltas]).sum(dim=0)


def dare_ties(deltas: Sequence[Tensor], *, p: float = 0.1, density: float = 1.0, alpha: float = 1.0,
              sign: Sign = "sum", seed: int = 0) -> Tensor:
    """DARE-TIES (Yu et al., 2024; 001 Sec. 4 (iv); KnOTS-DARE-TIES): DARE with drop rate ``p``,
    then TIES (trim to ``density``, elect, disjoint mean), times ``alpha``.

    ``density=1`` (no trim) is PEFT's ``dare_ties`` and the KnOTS configs (topK 100, p 0.1);
    003 Tab. 7 uses topK 10 (``density=0.1``) in core space.
    """
    g = torch.Generator().manual_seed(seed)
    dropped = [random_drop(d, p, g) for d in deltas]
    return ties(dropped, density=density, alpha=alpha, sign=sign)


def magnitude_prune(deltas: Sequence[Tensor], *, density: float = 0.2, alpha: float = 0.3) -> Tensor:
    """Magnitude pruning + task arithmetic (TIES' "trim" step alone: Yadav et al., 2023, Sec. 3; PEFT
    ``magnitude_prune``): ``alpha · Σ_t trim_density(τ_t)``."""
    return alpha * magnitude_trim(torch.stack(list(deltas)), density).sum(dim=0)


def _breadcrumb(delta: Tensor, density: float, gamma: float) -> Tensor:
    n = delta.numel()
    n_keep = int(density * n)
    n_top = min(int(gamma * n), n - n_keep)
    flat = delta.reshape(-1)
    order = flat.abs().argsort(descending=True, stable=True)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[n_top:n_top + n_keep]] = True
    return torch.where(mask, flat, torch.zeros_like(flat)).reshape(delta.shape)


def breadcrumbs(deltas: Sequence[Tensor], *, density: float = 0.9, gamma: float = 0.01, alpha: float = 0.3) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky, 2023): per task and tensor, drop the ``gamma``
    fraction of largest-magnitude outliers and the smallest entries so that a ``density``
    fraction remains, then ``alpha · Σ_t``.

    Parameterised as mergekit's ``magnitude_outliers`` sparsifier; when
    ``density + gamma > 1`` fewer outliers are dropped so that ``density`` is kept, as there.
    """
    return alpha * torch.stack([_breadcrumb(d, density, gamma) for d in deltas]).sum(dim=0)


def keeps_entries(taskset: TaskSet, hp: Mapping[str, Any]) -> None:
    """InputError when a sparsifier's kept fraction (``density``; DARE's ``1 − p``, in expectation)
    leaves less than one entry of the largest module: the merge would be empty, the base model (or, for
    DARE, a few survivors rescaled by ``1/(1 − p)``), so a study refuses it before any node merges."""
    largest = max(math.prod(update.shape) for task in taskset.tasks for update in task.modules.values())
    density, p = hp.get("density"), hp.get("p")
    if density is not None and density * largest < 1:
        raise InputError(f"density={density:g} keeps less than one entry of the largest module ({largest} entries), so the merge "
                         f"would be empty; choose density >= 1/{largest}")
    if p is not None and (1.0 - p) * largest < 1:
        raise InputError(f"p={p!r} keeps a fraction 1 - p = {1.0 - p:.3g} of each update, less than one entry of the largest module "
                         f"({largest} entries), so the merge would be empty or a few entries rescaled by 1/(1 - p); "
                         f"choose p <= 1 - 1/{largest}")
