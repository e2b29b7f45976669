"""Subspace coverage of LoRA task updates: effective ranks of the three stacks and 95 %-energy ranks.

001 Sec. 2.2 and App. D measure coverage with the effective rank of Roy & Vetterli (2007): for a
matrix ``X`` with non-zero singular values ``σ_1 … σ_{R_X}``,

    p_k = σ_k² / Σ_j σ_j²,   erank(X) = exp(-Σ_k p_k log p_k),

on three stacks (one vectorised matrix per row) for every module:

- per-task sum: ``X_i = [vec(b_i1 a_i1ᵀ); …; vec(b_ir_i a_ir_iᵀ)]`` (``r_i × dm``),
  ``PerTaskSum = Σ_i erank(X_i)``;
- ΔW stack (LoRA-agnostic): ``X_agnostic = [vec(ΔW_1); …; vec(ΔW_N)]`` (``N × dm``);
- Rank-1 stack (LoRA-aware): ``X_aware = [vec(b_11 a_11ᵀ); …; vec(b_Nr_N a_Nr_Nᵀ)]`` (``Σr_i × dm``).

The ``σ_k²`` of a stack are the eigenvalues of its Gram matrix ``X Xᵀ``, which the identities of
:mod:`mergelab.analysis.factored` give from the LoRA factors: all three stacks come from the one
``K × K`` direction Gram ``H = (B_catᵀB_cat) ⊙ (A_catA_catᵀ)`` (its diagonal blocks, its block sums
and itself), so no ``dm``-long vector is ever formed.

002 Sec. 4 (Fig. 3) adds the rank that keeps 95 % of a task vector's energy.
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from mergelab.analysis.factored import annotated, block_sum, dataset_attrs, direction_gram, gram, matrix_modules
from mergelab.analysis.settings import RelativeTolerance, Share
from mergelab.analysis.spectra import ENERGY, energy_rank, singular_values
from mergelab.naming import module_coords
from mergelab.taskset import LowRank, TaskSet

__all__ = ["ENERGY", "ERANK_RTOL", "energy_rank", "erank", "erank_from_energies", "erank_gram", "subspace_coverage"]

#: Energies ``σ_k²`` at or below ``ERANK_RTOL · max σ²`` count as zero singular values (rank deficiency
#: and float64 round-off in a Gram spectrum). Their ``p log p`` terms are below 1e-10 each.
ERANK_RTOL = 1e-12


def erank_from_energies(energies: np.ndarray | Tensor, *, rtol: float = ERANK_RTOL) -> float:
    """Effective rank from squared singular values ``σ_k²`` (001 Sec. 2.2 / App. D, Roy & Vetterli 2007).

    ``exp(-Σ p_k log p_k)`` over the energies above ``rtol · max``; 0 for a zero matrix.
    """
    e = np.clip(np.asarray(energies, dtype=np.float64), 0.0, None)
    if e.size == 0 or e.max() == 0.0:
        return 0.0
    e = e[e > rtol * e.max()]
    p = e / e.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def erank(X: Tensor | np.ndarray, *, rtol: float = ERANK_RTOL) -> float:
    """Effective rank of a matrix by an explicit float64 SVD (001 Sec. 2.2 formula)."""
    sigma = torch.linalg.svdvals(torch.as_tensor(X).to(dtype=torch.float64, device="cpu"))
    return erank_from_energies(sigma.numpy() ** 2, rtol=rtol)


def erank_gram(G: np.ndarray | Tensor, *, rtol: float = ERANK_RTOL) -> float:
    """Effective rank of ``X`` given only its Gram matrix ``G = X Xᵀ`` (eigenvalues of G are ``σ_k²``)."""
    return erank_from_energies(np.linalg.eigvalsh(np.asarray(G, dtype=np.float64)), rtol=rtol)


def subspace_coverage(taskset: TaskSet, *, energy: Share = ENERGY, rtol: RelativeTolerance = ERANK_RTOL,
                      split_packed: bool = True) -> xr.Dataset:
    """Coverage statistics of every 2-D module (001 Sec. 2.2, App. D, Figs. 1 and 5; 002 Sec. 4, Fig. 3).

    Dims ``task`` and ``module`` (with ``layer`` / ``kind`` coordinates). Variables:

    - ``erank_task(task, module)``: ``erank(X_i)`` of task i's rank-1 stack;
    - ``erank_per_task_sum(module)``: ``Σ_i erank(X_i)``;
    - ``erank_agnostic(module)``: ``erank(X_agnostic)`` (ΔW stack);
    - ``erank_aware(module)``: ``erank(X_aware)`` (Rank-1 stack);
    - ``lora_rank(task, module)``: ``r_i`` (0 for a dense update);
    - ``energy_rank(task, module)``: rank keeping ``energy`` of ``‖ΔW_i‖_F²``.

    The rank-1 stacks exist only for LoRA updates: where a module has a dense update in any task
    its ``erank_task`` / ``erank_per_task_sum`` / ``erank_aware`` are NaN, while ``erank_agnostic``
    and ``energy_rank`` are computed for every 2-D module.
    """
    modules = matrix_modules(taskset, split_packed=split_packed)
    T, M = len(taskset), len(modules)
    per_task = np.full((T, M), np.nan)
    aware = np.full(M, np.nan)
    agnostic = np.empty(M)
    ranks = np.zeros((T, M), dtype=np.int64)
    e_rank = np.zeros((T, M), dtype=np.int64)
    for j, ups in enumerate(modules.values()):
        for t, u in enumerate(ups):
            e_rank[t, j] = energy_rank(singular_values(u), energy)
            ranks[t, j] = u.rank if isinstance(u, LowRank) else 0
        if all(isinstance(u, LowRank) for u in ups):
            r = ranks[:, j].tolist()
            H = direction_gram(ups)  # (K, K), K = Σ r_i
            edges = np.concatenate([[0], np.cumsum(r)])
            per_task[:, j] = [erank_gram(H[a:b, a:b], rtol=rtol) for a, b in zip(edges[:-1], edges[1:])]
            aware[j] = erank_gram(H, rtol=rtol)
            agnostic[j] = erank_gram(block_sum(H, r), rtol=rtol)
        else:
            agnostic[j] = erank_gram(gram(ups), rtol=rtol)
    return xr.Dataset(
        {
            "erank_task": annotated(("task", "module"), per_task, "erank(X_i), rank-1 stack of one task"),
            "erank_per_task_sum": annotated(("module",), per_task.sum(axis=0), "per-task sum Σ_i erank(X_i)"),
            "erank_agnostic": annotated(("module",), agnostic, "erank(X_agnostic), ΔW stack (LoRA-agnostic)"),
            "erank_aware": annotated(("module",), aware, "erank(X_aware), rank-1 stack (LoRA-aware)"),
            "lora_rank": annotated(("task", "module"), ranks, "LoRA rank r_i (0: dense update)"),
            "energy_rank": annotated(("task", "module"), e_rank, f"rank keeping {energy:.0%} of the energy of ΔW_i"),
        },
        coords={"task": np.array(taskset.names, dtype=object), **module_coords(list(modules), taskset.layout)},
        attrs=dataset_attrs(taskset, title="subspace coverage", energy=energy, erank_rtol=rtol,
                            paper="001 Sec. 2.2, App. D (Figs. 1, 5); 002 Sec. 4 (Fig. 3)"),
    )
