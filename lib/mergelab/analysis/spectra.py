"""Singular spectra, numerical rank and subspace alignment of task updates.

- Per-task spectra of every module's update from its factors: with ``B = Q_B R_B`` and
  ``Aᵀ = Q_A R_A`` (thin QR), ``B A = Q_B (R_B R_Aᵀ) Q_Aᵀ``, so the singular values of the
  ``(out, in)`` update are those of the ``r × r`` core ``R_B R_Aᵀ`` (002 Sec. 4 analyses the SVD
  of each task vector; 003 Sec. 5.2 that of merged updates).
- The rank of a merged ``ΔW`` (003 App. C.2, Tab. 6) as a numerical rank with a named tolerance.
- The Subspace Alignment Ratio (SAR) of Marczak et al. (2025, "No task left behind", their
  Eqs. (5)-(6)), which 003 Sec. 5.2 / Fig. 5 evaluates between each pair of LoRA task updates,
  in full space and on the Core-space core matrices (``pairwise_sar(..., space="core")``).

SVDs run in float64 on CPU with ``full_matrices=False``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from mergelab.analysis.factored import annotated, dataset_attrs, matrix_modules, split_modules
from mergelab.analysis.settings import RelativeTolerance, Share, SpaceName
from mergelab.linalg import lowrank_svd
from mergelab.naming import module_coords
from mergelab.spaces import get_space
from mergelab.taskset import Dense, LowRank, MergedUpdate, TaskSet, Update

__all__ = [
    "ENERGY",
    "SAR_RETAINED",
    "cumulative_energy",
    "energy_rank",
    "energy_fractions",
    "left_singular_basis",
    "merged_rank",
    "numerical_rank",
    "pairwise_sar",
    "retained_rank",
    "sar",
    "sar_update",
    "singular_values",
    "task_spectra",
]

#: Energy fraction of 002 Sec. 4 ("the number of singular components that preserve 95 % of the total energy").
ENERGY = 0.95

#: Default fraction of ‖Δ_M‖_F that the reference subspace of SAR must retain (Iso-C Eq. (6)).
SAR_RETAINED = 0.95

#: Slack on cumulative fractions so that a threshold of exactly 1.0 is met despite rounding.
_FRACTION_SLACK = 1e-12


def _f64(t: Tensor) -> Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


def singular_values(update: Update | Tensor) -> Tensor:
    """Singular values (descending, float64) of a 2-D update; from the factors when low rank."""
    if isinstance(update, LowRank):
        return lowrank_svd(update.B, update.A, truncate=False)[1]
    delta = update.delta if isinstance(update, Dense) else update
    return torch.linalg.svdvals(_f64(delta))


def left_singular_basis(update: Update | Tensor) -> tuple[Tensor, Tensor]:
    """``(U, S)``: left singular vectors (columns) and singular values of a 2-D update."""
    if isinstance(update, LowRank):
        U, S, _ = lowrank_svd(update.B, update.A, truncate=False)
        return U, S
    delta = update.delta if isinstance(update, Dense) else update
    U, S, _ = torch.linalg.svd(_f64(delta), full_matrices=False)
    return U, S


def energy_fractions(sigma: Tensor | np.ndarray) -> np.ndarray:
    """Per-component energy ``σ_k² / Σ_j σ_j²`` (the scree curve; 001 App. E Fig. 8 uses the same form)."""
    e = np.asarray(sigma, dtype=np.float64) ** 2
    total = e.sum()
    return e / total if total > 0 else np.zeros_like(e)


def cumulative_energy(sigma: Tensor | np.ndarray) -> np.ndarray:
    """Energy retained by the top-k components, ``Σ_{j≤k} σ_j² / Σ_j σ_j²`` for k = 1, 2, … (002 Sec. 4)."""
    return np.cumsum(energy_fractions(sigma))


def numerical_rank(update: Update | Tensor, *, rtol: float | None = None) -> int:
    """Number of singular values above ``rtol · σ_max`` (003 App. C.2, "rank r_ΔW of the merged update").

    ``rtol=None`` uses the LAPACK / ``numpy.linalg.matrix_rank`` convention
    ``max(out, in) · eps(dtype)`` with the dtype the update is stored in, so a float32 merge is
    not credited with rank from its own rounding noise.
    """
    sigma = singular_values(update)
    if sigma.numel() == 0 or float(sigma[0]) == 0.0:
        return 0
    if rtol is None:
        dtype = update.dtype
        shape = update.shape
        rtol = max(shape) * torch.finfo(dtype).eps
    return int((sigma > rtol * sigma[0]).sum())


def energy_rank(sigma: Tensor | np.ndarray, energy: float = ENERGY) -> int:
    """Number of top singular components that preserve ``energy`` of ``Σσ²`` (002 Sec. 4, Fig. 3).

    The smallest ``k`` with ``Σ_{j≤k} σ_j² ≥ energy · Σ_j σ_j²``; 0 for a zero matrix.
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must lie in (0, 1], got {energy}")
    c = cumulative_energy(sigma)
    if c.size == 0 or not np.isfinite(c[-1]) or c[-1] == 0.0:
        return 0
    return int(np.argmax(c >= energy - _FRACTION_SLACK)) + 1


def retained_rank(sigma: Tensor | np.ndarray, retained: float = SAR_RETAINED) -> int:
    """``k_M`` of Iso-C Eq. (6): the fewest top components whose projection keeps ``retained`` of the norm.

    ``k_M = min{k : ‖Π_{k,M} Δ_M‖_F ≥ retained · ‖Δ_M‖_F}``, i.e. the rank-``k`` approximation
    error is at most ``sqrt(1 - retained²) · ‖Δ_M‖_F``; as ``‖Π_k Δ‖_F² = Σ_{j≤k} σ_j²`` this is
    :func:`energy_rank` at ``retained²``. ``retained = 1`` gives the numerical rank (the whole
    column space).
    """
    if not 0.0 < retained <= 1.0:
        raise ValueError(f"retained must lie in (0, 1], got {retained}")
    return energy_rank(sigma, retained**2)


def sar(delta: Tensor, reference: Tensor, *, retained: float = SAR_RETAINED) -> float:
    """Subspace Alignment Ratio of ``delta`` with respect to ``reference`` (arbitrary matrices).

    Marczak et al. 2025, Eq. (5): ``SAR(Δ_t, Δ_M; k_M) = ‖Π_{k_M,M} Δ_t‖_F / ‖Δ_t‖_F`` with
    ``Π_{k,M} = U_{k,M} U_{k,M}ᵀ`` the projector on the top-``k_M`` left singular vectors of
    ``Δ_M`` and ``k_M`` from :func:`retained_rank` (their Eq. (6)). 003 Sec. 5.2 applies it to
    pairs of task updates in full space (``(out, in)`` matrices) and in Core space (``Tr × Tr``
    core matrices); this function takes either. 0 when ``delta`` is zero.
    """
    U, S, _ = torch.linalg.svd(_f64(reference), full_matrices=False)
    k = retained_rank(S, retained)
    d = _f64(delta)
    norm = float(d.norm())
    return float((U[:, :k].T @ d).norm()) / norm if norm > 0 else 0.0


def sar_update(delta: Update, reference: Update, *, retained: float = SAR_RETAINED) -> float:
    """:func:`sar` between two module updates in full space, from the factors when low rank.

    With ``U_k`` from :func:`~mergelab.linalg.lowrank_svd` of the reference and a low-rank ``delta = B A``,
    ``‖U_kᵀ B A‖_F`` is the norm of the factored ``(U_kᵀ B) A`` — no ``(out, in)`` matrix is formed.
    """
    U, S = left_singular_basis(reference)
    return _projected_fraction(delta, U[:, : retained_rank(S, retained)])


def _projected_fraction(delta: Update, U_k: Tensor) -> float:
    """``‖U_kᵀ Δ‖_F / ‖Δ‖_F`` for an orthonormal ``U_k`` (columns), from the factors when low rank."""
    norm = delta.norm()
    if norm == 0.0:
        return 0.0
    if isinstance(delta, LowRank):
        C, A = U_k.T @ _f64(delta.B), _f64(delta.A)  # (k, r), (r, in)
        projected = float(((C.T @ C) * (A @ A.T)).sum().clamp_min(0).sqrt())  # ‖C A‖_F
    else:
        projected = float((U_k.T @ _f64(delta.delta)).norm())
    return projected / norm


def task_spectra(taskset: TaskSet, *, split_packed: bool = True) -> xr.Dataset:
    """Singular spectrum of every task's update per module (002 Sec. 4; 003 Sec. 5.2).

    Dims ``(task, module, component)``; ``component`` runs over the longest spectrum and shorter
    ones are padded with NaN. Variables: ``singular_value``, ``energy_fraction``
    (``σ_k²/Σσ²``) and ``cumulative_energy`` (``Σ_{j≤k} σ_j²/Σσ²``).
    """
    modules = matrix_modules(taskset, split_packed=split_packed)
    spectra = {(t, m): singular_values(u).numpy() for m, ups in modules.items() for t, u in enumerate(ups)}
    n = max((len(s) for s in spectra.values()), default=0)
    shape = (len(taskset), len(modules), n)
    sv, frac, cum = (np.full(shape, np.nan) for _ in range(3))
    for j, m in enumerate(modules):
        for t in range(len(taskset)):
            s = spectra[(t, m)]
            sv[t, j, : len(s)] = s
            frac[t, j, : len(s)] = energy_fractions(s)
            cum[t, j, : len(s)] = cumulative_energy(s)
    spectrum = ("task", "module", "component")
    return xr.Dataset(
        {
            "singular_value": annotated(spectrum, sv, "singular value σ_k of ΔW_t", "weight units"),
            "energy_fraction": annotated(spectrum, frac, "energy fraction σ_k²/Σσ²"),
            "cumulative_energy": annotated(spectrum, cum, "cumulative energy Σ_{j≤k}σ_j²/Σσ²"),
        },
        coords={"task": np.array(taskset.names, dtype=object), **module_coords(list(modules), taskset.layout),
                "component": np.arange(1, n + 1)},
        attrs=dataset_attrs(taskset, title="per-task singular spectra", paper="002 Sec. 4; 003 Sec. 5.2"),
    )


def merged_rank(merged: MergedUpdate | Mapping[str, Update], *, rtol: RelativeTolerance = None,
                split_packed: bool = True) -> xr.Dataset:
    """Numerical rank ``r_ΔW`` of a merged update per module (003 App. C.2, Tab. 6).

    Dims ``(module,)``: ``merged_rank`` and ``max_rank = min(out, in)``; ``rtol`` as in
    :func:`numerical_rank` (recorded in attrs; ``None`` = ``max(out, in)·eps(dtype)``). The
    merge's ``meta`` (method, space, hyper-parameters) is kept in attrs for the flow that
    stacks ranks across methods and spaces.
    """
    modules = merged.modules if isinstance(merged, MergedUpdate) else merged
    modules = {k: u for k, u in split_modules(modules, split_packed=split_packed).items() if len(u.shape) == 2}
    names = list(modules)
    return xr.Dataset(
        {
            "merged_rank": annotated(("module",), np.array([numerical_rank(modules[m], rtol=rtol) for m in names], dtype=np.int64),
                                     "numerical rank r_ΔW of the merged update"),
            "max_rank": annotated(("module",), np.array([min(modules[m].shape) for m in names], dtype=np.int64), "min(out, in)"),
        },
        coords=module_coords(names),
        attrs={
            "title": "rank of the merged update",
            "paper": "003 App. C.2 (Tab. 6)",
            "rtol": "max(out, in) * eps(dtype)" if rtol is None else rtol,
            "merge_meta": dict(merged.meta) if isinstance(merged, MergedUpdate) else {},
            **({"dataset": merged.base.name, "base": merged.base.name} if isinstance(merged, MergedUpdate) else {}),
        },
    )


def _representations(updates: list[Update], space: str) -> list[Update]:
    """One module's per-task updates as a space represents them: the updates themselves in the
    full space (kept factored), the projected matrices ``X_t`` elsewhere (``M_t`` in Core space)."""
    if space == "full":
        return updates
    matrices, _ = get_space(space).project(updates)
    return [X if isinstance(X, LowRank) else Dense(X) for X in matrices]


def pairwise_sar(taskset: TaskSet, *, retained: Share = SAR_RETAINED, split_packed: bool = True,
                 space: SpaceName = "full") -> xr.Dataset:
    """SAR between every ordered pair of task updates, in full space or another space (003 Sec. 5.2, Fig. 5).

    ``sar(task, reference, module)`` is ``SAR(ΔW_task, ΔW_reference; k_reference)``: the
    fraction of ``‖ΔW_task‖_F`` inside the top-``k`` left singular subspace of
    ``ΔW_reference``; it is not symmetric. ``k_reference(reference, module)`` is ``k_M`` of Iso-C
    Eq. (6), ``sar_mean(task, reference)`` the mean over modules (the per-pair number behind a
    heatmap), and ``sar_offdiag_mean`` the mean over modules and pairs with task ≠ reference
    (the bar of 003 Fig. 5). With ``space="core"`` the same is computed on the core matrices
    ``M_t`` of 003 Eq. (8) instead of ``ΔW_t`` (any space of :data:`mergelab.spaces.SPACES`
    works: its per-task matrices ``X_t``); the attr ``space`` says which.
    """
    modules = matrix_modules(taskset, split_packed=split_packed)
    T = len(taskset)
    values = np.empty((T, T, len(modules)))
    ks = np.empty((T, len(modules)), dtype=np.int64)
    for j, ups in enumerate(modules.values()):
        reps = _representations(ups, space)
        bases = []
        for r, u in enumerate(reps):
            U, S = left_singular_basis(u)
            ks[r, j] = retained_rank(S, retained)
            bases.append(U[:, : ks[r, j]])
        for t, u in enumerate(reps):
            for r, U_k in enumerate(bases):
                values[t, r, j] = _projected_fraction(u, U_k)
    mean = values.mean(axis=2)
    offdiag = mean[~np.eye(T, dtype=bool)]
    names = np.array(taskset.names, dtype=object)
    return xr.Dataset(
        {
            "sar": annotated(("task", "reference", "module"), values, "SAR(ΔW_task, ΔW_reference)"),
            "k_reference": annotated(("reference", "module"), ks, "k_M of the reference update"),
            "sar_mean": annotated(("task", "reference"), mean, "SAR averaged over modules"),
            "sar_offdiag_mean": annotated((), float(offdiag.mean()) if offdiag.size else np.nan,
                                          "SAR averaged over modules and pairs task ≠ reference"),
        },
        coords={"task": names, "reference": names, **module_coords(list(modules), taskset.layout)},
        attrs=dataset_attrs(taskset, title="subspace alignment ratio between task updates", space=space,
                            retained=retained, paper="003 Sec. 5.2 (Fig. 5); Marczak et al. 2025 Eqs. (5)-(6)"),
    )
