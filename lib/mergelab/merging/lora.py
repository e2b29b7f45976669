"""Merges of LoRA factors rather than of update matrices: Linear (TA on A and B) and LoRA-LEGO.

These take each task's factors ``LowRank(B_t, A_t)`` (PEFT shapes ``B_t: (out, r_t)``,
``A_t: (r_t, in)``; 001 writes ``ΔW_i = B_i A_iᵀ``, so 001's ``A_i`` is our ``A_tᵀ``) in the
coordinates of the space they run in, and return factors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from mergelab.errors import InputError
from mergelab.taskset import LowRank, TaskSet

__all__ = ["linear", "lora_lego", "lora_lego_feasible", "lora_scalings", "semantic_units"]


def _pad_rank(B: torch.Tensor, A: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.cat([B, B.new_zeros(B.shape[0], r - B.shape[1])], dim=1),
            torch.cat([A, A.new_zeros(r - A.shape[0], A.shape[1])], dim=0))


def lora_scalings(taskset: TaskSet) -> dict[str, list[Tensor]]:
    """``{module: [s_t]}``: each task's LoRA scaling ``α_t / r_t`` (times any layout factor) at a
    module, from the adapter metadata (1 where there is none, e.g. a synthetic task set)."""
    return {m: [torch.tensor(float((t.meta.get("modules") or {}).get(m, {}).get("scaling", 1.0)), dtype=torch.float64)
                for t in taskset] for m in taskset.module_names}


def linear(factors: Sequence[LowRank], scalings: Sequence[Tensor] | None = None, *, alpha: float = 0.3) -> LowRank:
    """Linear (the LoRA-aware baseline of 001 = TARA-Merging, 2026, Sec. 4 (vii); PEFT
    ``combination_type="linear"``): task arithmetic on the factors, as PEFT's
    ``add_weighted_adapter``: with ``s_t = α_t / r_t`` and the raw factors ``B_t / s_t`` (a
    :class:`LowRank` carries the scaling in ``B``), ``B* = Σ_t √|alpha s_t| (B_t / s_t)`` and
    ``A* = sign(alpha) Σ_t √|alpha s_t| A_t``, so ``ΔW = alpha (Σ_t B_t)(Σ_t A_t)`` when every
    ``s_t`` is equal, cross terms ``B_s A_t`` included (by design; PEFT issue #3004 discusses them).
    ``scalings``: the ``s_t`` (the driver derives them from the adapters, :func:`lora_scalings`);
    ``None`` means equal scalings. Departure: PEFT refuses heterogeneous ranks; here they are
    zero-padded to the largest rank, i.e. rank-1 components are paired by index.
    """
    r = max(f.rank for f in factors)
    s = [1.0] * len(factors) if scalings is None else [float(x) for x in scalings]
    padded = [_pad_rank(f.B, f.A, r) for f in factors]
    root = [math.sqrt(abs(alpha) * s_t) for s_t in s]
    B = torch.stack([b * (w / s_t) for (b, _), w, s_t in zip(padded, root, s, strict=True)]).sum(dim=0)
    A = math.copysign(1.0, alpha) * torch.stack([a * w for (_, a), w in zip(padded, root, strict=True)]).sum(dim=0)
    return LowRank(B, A)


def semantic_units(factors: Sequence[LowRank]) -> tuple[np.ndarray, np.ndarray]:
    """LoRA-LEGO's minimal semantic units: one row per rank-1 pair, ``[a_k, b_k]`` with ``a_k`` a
    row of ``A_t`` and ``b_k`` the matching column of ``B_t``; returns ``(a (N, in), b (N, out))``."""
    a = np.concatenate([f.A.to(torch.float64).numpy() for f in factors], axis=0)
    b = np.concatenate([f.B.to(torch.float64).T.numpy() for f in factors], axis=0)
    return a, b


def lora_lego_feasible(taskset: TaskSet, hp: Mapping[str, Any]) -> None:
    """InputError unless every module of LoRA factors has at least ``k`` minimal semantic units
    (Σ_t r_t, :func:`lora_lego`'s clusters), so a study refuses ``k`` before any node merges."""
    k = hp.get("k")
    units = {name: sum(t.modules[name].rank for t in taskset.tasks if isinstance(t.modules.get(name), LowRank))
             for name in taskset.module_names}
    fewest = min((n for n in units.values() if n), default=None)
    if k is not None and fewest is not None and k > fewest:
        raise InputError(f"k={k} clusters but only {fewest} minimal semantic units (Σ_t r_t) in a module; choose k <= {fewest}")


def lora_lego(factors: Sequence[LowRank], *, k: int | None = None, alpha: float = 1.0, param_reweight: bool = True,
              output_reweight: bool = True, features: Literal["raw", "normalized"] = "raw", n_init: int = 10,
              seed: int = 0) -> LowRank:
    """LoRA-LEGO (Zhao et al., ICLR 2025; 001 Sec. 4 (ix) and App. C.3).

    1. Minimal semantic units ``u = [a, b]`` of every task (:func:`semantic_units`).
    2. k-means (scikit-learn ``KMeans``, ``n_init`` restarts, ``random_state=seed``) into ``k``
       clusters, ``k = max_t r_t`` by default (001 searches k ∈ {8, 16, 32, 64, 128}). Features:
       the raw units as 001 App. C.3 states (``"raw"``), or ``[a/‖a‖, b/‖b‖]`` as the
       TARA-Merge re-implementation (``"normalized"``).
    3. Centroid ``μ`` = mean of the raw member units.
    4. Parameter reweighting (001 App. C.3): ``μ' = ((1/p) Σ_i ‖u_i‖ / ‖μ‖) μ`` (L2 norm of the
       whole unit as printed; TARA-Merge matches ∞-norms instead).
    5. Output reweighting: the merged LoRA is scaled by ``√r / √k`` (r the original rank).
    6. ``ΔW = alpha · Σ_c b̄_c ā_cᵀ``, returned as factors of rank ``k``.

    Decision: a unit's ``b`` carries the task's LoRA scaling ``α_t / r_t`` (the task set folds it into
    ``B``), so tasks with a larger ``α/r`` weigh more in the clustering and the centroids. With one
    ``α/r`` for all tasks (the papers' setting) every ``b`` half shares one factor, so the clusters
    can still differ from those of unscaled ``B`` factors when ``α/r ≠ 1``; ``features="normalized"``
    removes the dependence (each half is normalised).

    It takes 8 parameters because it is a registered merge method: after the factors, each keyword is a hyper-parameter
    the registry reads from this signature (001 App. C.3's ``k`` and α, the two reweightings, the units' features,
    KMeans' restarts and seed).
    """
    from sklearn.cluster import KMeans

    a, b = semantic_units(factors)
    n_units = a.shape[0]
    r = max(f.rank for f in factors)
    k = r if k is None else k
    if k > n_units:
        raise InputError(f"k={k} clusters but only {n_units} minimal semantic units (Σ_t r_t); choose k <= {n_units}")
    units = np.concatenate([a, b], axis=1)
    if features == "normalized":
        norm = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(np.float64).tiny)  # noqa: E731
        feats = np.concatenate([norm(a), norm(b)], axis=1)
    else:
        feats = units
    labels = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(feats).labels_
    centroids = np.zeros((k, units.shape[1]))
    for c in range(k):
        members = units[labels == c]
        if len(members) == 0:
            continue
        mu = members.mean(axis=0)
        if param_reweight:
            mu_norm = np.linalg.norm(mu)
            mu = mu * (np.linalg.norm(members, axis=1).mean() / mu_norm) if mu_norm > 0 else mu
        centroids[c] = mu
    scale = alpha * (math.sqrt(r) / math.sqrt(k) if output_reweight else 1.0)
    n_in = a.shape[1]
    dtype = factors[0].B.dtype
    A = torch.from_numpy(centroids[:, :n_in]).to(dtype)  # (k, in)
    B = torch.from_numpy(centroids[:, n_in:].T.copy()).to(dtype) * scale  # (out, k)
    return LowRank(B, A)
