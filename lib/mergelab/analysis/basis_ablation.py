"""The reference-basis ablation of 003 (Sec. 5.2 "Choice of the reference basis", Tab. 5).

:func:`reference_basis_ablation`: the alignment errors ``ε_U``, ``ε_V`` (003 Eq. 13) of three bases — the
first task's, a random orthonormal one of the concatenation's dimension, and the concatenation (Eq. 3) —
plus what each basis loses when a task update, or their Task Arithmetic sum, goes through the core and
back. Notation and shapes as in :mod:`mergelab.analysis.core_space`; it runs on the task set's LoRA
modules, in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from mergelab.analysis.factored import annotated, dataset_attrs, matrix_taskset
from mergelab.analysis.settings import Seed
from mergelab.linalg import random_orthonormal, truncated_svd
from mergelab.merging import derive_seed
from mergelab.naming import module_coords
from mergelab.spaces.core import alignment_errors, reference_bases
from mergelab.taskset import LowRank, TaskSet

__all__ = ["BASES", "candidate_bases", "core_roundtrip_error", "reference_basis_ablation"]

#: The reference bases of 003 Tab. 5, rows (1)-(3).
BASES: tuple[str, ...] = ("first_task", "random_orthonormal", "concatenation")


def candidate_bases(updates: Sequence[LowRank], *, seed: int) -> dict[str, tuple[Tensor, Tensor]]:
    """The reference bases ``(U (out, ·), V (in, ·))`` compared in 003 Tab. 5, rows (1)-(3).

    - ``first_task``: ``U_B^(1)``, ``V_A^(1)``, the left / right singular vectors of the first
      task's ``B_1`` / ``A_1`` for their non-zero singular values (``m × r``);
    - ``random_orthonormal``: Haar-random orthonormal bases with as many columns as the
      concatenation's (``m × Tr``; ``seed`` drives a ``torch.Generator``);
    - ``concatenation``: :func:`mergelab.spaces.reference_bases`, 003 Eq. (3).

    003 Tab. 5 varies ``U_B^ref`` and says "we proceed with ``V_A^ref`` analogously".
    """
    U_ref, V_ref = reference_bases(updates)
    first = updates[0]
    g = torch.Generator().manual_seed(seed)
    return {
        "first_task": (truncated_svd(first.B)[0], truncated_svd(first.A)[2].T),
        "random_orthonormal": (random_orthonormal(first.shape[0], U_ref.shape[1], g),
                               random_orthonormal(first.shape[1], V_ref.shape[1], g)),
        "concatenation": (U_ref, V_ref),
    }


def core_roundtrip_error(update: LowRank, U: Tensor, V: Tensor) -> float:
    """``‖ΔW − U (Uᵀ ΔW V) Vᵀ‖_F / ‖ΔW‖_F``: what a task update loses through the core of basis ``(U, V)``.

    003 Eq. (7) is this round trip for the reference bases, and it is exact there (Sec. 4.2). With
    ``P_U = UUᵀ``, ``P_V = VVᵀ`` the error splits into two orthogonal parts,
    ``(I − P_U) B A`` and ``P_U B · A (I − P_V)``, each a low-rank product whose norm comes from its
    factors. NaN for a zero update.
    """
    B, A = update.B.to(torch.float64), update.A.to(torch.float64)
    norm = update.norm()
    if norm == 0.0:
        return math.nan
    UB = U @ (U.T @ B)  # (out, r)
    outside_U = LowRank(B - UB, A).norm()
    outside_V = LowRank(UB, A - (A @ V) @ V.T).norm()
    return math.hypot(outside_U, outside_V) / norm


def _task_arithmetic_sum(updates: Sequence[LowRank]) -> LowRank:
    """``Σ_t B_t A_t`` as one factored update ``[B_1 … B_T] [A_1; …; A_T]``."""
    return LowRank(torch.cat([u.B.to(torch.float64) for u in updates], dim=1),
                   torch.cat([u.A.to(torch.float64) for u in updates], dim=0))


def reference_basis_ablation(taskset: TaskSet, *, seed: Seed = 0, split_packed: bool = True) -> xr.Dataset:
    """Alignment error of three choices of reference basis (003 Sec. 5.2 "Choice of the reference basis", Tab. 5).

    For every LoRA module and basis of :func:`candidate_bases`, and every task ``t``:

    - ``eps_U``: ``ε_U = r_t − ‖U_B^(t)ᵀ U‖_F²`` (003 Eq. 13, the least-squares alignment error of
      Eq. 4 with its minimiser Eq. 5); ``eps_V`` the same for ``V_A^(t)`` and ``V``
      (:func:`mergelab.spaces.core.alignment_errors`);
    - ``roundtrip_error``: :func:`core_roundtrip_error` of ``ΔW_t``;
    - ``ta_roundtrip_error(basis, module)``: the same for the Task Arithmetic sum ``Σ_t ΔW_t``, i.e.
      how far TA merged in that core is from TA in full space (003 Eq. 11 holds only when it is 0).

    ``eps_U_mean`` / ``eps_V_mean`` average over modules and tasks (Tab. 5's "Avg. ε_U");
    ``basis_dim_U`` / ``basis_dim_V`` are the bases' column counts (Tab. 5's "Shape"). The random
    basis of module ``m`` is drawn with ``derive_seed(seed, m)``. Tab. 5's accuracy column needs
    an evaluation and is not computed here.
    """
    lora = matrix_taskset(taskset, split_packed=split_packed, lora_only=True)
    modules = list(lora.module_names)
    T, M, K = len(lora), len(modules), len(BASES)
    eps = np.empty((2, K, T, M))
    roundtrip = np.empty((K, T, M))
    ta = np.empty((K, M))
    dim = np.empty((2, K, M), dtype=np.int64)
    for j, name in enumerate(modules):
        updates = lora.updates(name)
        bases = candidate_bases(updates, seed=derive_seed(seed, name))
        for b, basis in enumerate(BASES):
            U, V = bases[basis]
            dim[:, b, j] = U.shape[1], V.shape[1]
            eps[:, b, :, j] = np.asarray(alignment_errors(updates, U, V)).T
            roundtrip[b, :, j] = [core_roundtrip_error(u, U, V) for u in updates]
            ta[b, j] = core_roundtrip_error(_task_arithmetic_sum(updates), U, V)
    per_task = ("basis", "task", "module")
    return xr.Dataset(
        {
            "eps_U": annotated(per_task, eps[0], "alignment error ε_U = r_t − ‖U_B^(t)ᵀ U‖_F²"),
            "eps_V": annotated(per_task, eps[1], "alignment error ε_V = r_t − ‖V_A^(t)ᵀ V‖_F²"),
            "eps_U_mean": annotated(("basis",), eps[0].mean(axis=(1, 2)), "ε_U averaged over modules and tasks"),
            "eps_V_mean": annotated(("basis",), eps[1].mean(axis=(1, 2)), "ε_V averaged over modules and tasks"),
            "roundtrip_error": annotated(per_task, roundtrip, "relative error of ΔW_t through the core and back"),
            "ta_roundtrip_error": annotated(("basis", "module"), ta, "relative error of Σ_t ΔW_t through the core and back"),
            "basis_dim_U": annotated(("basis", "module"), dim[0], "columns of the left basis U"),
            "basis_dim_V": annotated(("basis", "module"), dim[1], "columns of the right basis V"),
        },
        coords={"basis": np.array(BASES, dtype=object), "task": np.array(lora.names, dtype=object),
                **module_coords(modules, taskset.layout)},
        attrs=dataset_attrs(taskset, title="reference-basis ablation", seed=seed, paper="003 Sec. 5.2 (Tab. 5), Eq. (13)"),
    )
