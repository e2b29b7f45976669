"""Core Space analyses of 003 (Sec. 5.2, App. C.2): truncation, SAR per space, reference bases, merged rank.

Weight-only counterparts of 003's analysis section, each a pure function of a TaskSet returning an
xarray Dataset (schemas in ``docs/store.md`` §6). Notation and shapes follow
:mod:`mergelab.spaces.core`: ``A_t: (r_t, in)``, ``B_t: (out, r_t)`` (PEFT; 003 writes
``A^{(t)} ∈ R^{r×n}``, ``B^{(t)} ∈ R^{m×r}``, the same orientation), reference bases
``U_B^ref (out, d_U)``, ``V_A^ref (in, d_V)`` (003 Eq. 3) and core matrices
``M_t = (U_B^refᵀ B_t)(A_t V_A^ref)`` (003 Eq. 8).

- :func:`truncation_curves` (003 Sec. 5.2 "Truncation", Fig. 4): merge (Task Arithmetic in the
  paper), take the SVD of the merged matrix *in the space* (``ΔW_merged`` in full space,
  ``M_merged`` in Core space), set ``σ_i = 0`` for ``i > (1 − p)·dim(Σ)``, and measure what the
  truncation removes. 003 plots the accuracy of the truncated merge; from weights alone we report
  the relative Frobenius error and the retained energy (:func:`truncated_merge` gives the
  truncated merged update itself, for an evaluation flow to score).
- :func:`sar_by_space` (003 Sec. 5.2, Fig. 5): :func:`~mergelab.analysis.spectra.pairwise_sar`
  on the updates ``ΔW_t`` and on the core matrices ``M_t``, stacked along ``space``.
- the reference-basis ablation (003 Sec. 5.2, Tab. 5): :mod:`mergelab.analysis.basis_ablation`.
- :func:`merged_rank_grid` (003 App. C.2, Tab. 6): the numerical rank of the merged ``ΔW`` per
  method and space, by :func:`mergelab.merging.merge` and
  :func:`~mergelab.analysis.spectra.merged_rank`.

Every function runs on the task set's LoRA modules (2-D parameters that are LowRank in every task;
packed q/k/v projections split into views, as the other analyses), because the Core space is
defined from LoRA factors. SVDs are float64 (:mod:`mergelab.linalg`); no ``out × in`` matrix is
formed except where the full space itself is dense (a full-space merge).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from mergelab.analysis.factored import annotated, dataset_attrs, matrix_taskset
from mergelab.analysis.settings import MethodName, MethodNames, RelativeTolerance, Share, SpaceNames
from mergelab.analysis.spectra import SAR_RETAINED, merged_rank, pairwise_sar, singular_values
from mergelab.linalg import lowrank_svd, svd64
from mergelab.merging import merge
from mergelab.naming import module_coords
from mergelab.params import Interval
from mergelab.spaces import Context, Space, get_space
from mergelab.taskset import LowRank, MergedUpdate, TaskSet, Update

__all__ = [
    "SAR_SPACES",
    "TABLE6_METHODS",
    "TABLE6_SPACES",
    "TRUNCATION_FRACTIONS",
    "TRUNCATION_SPACES",
    "kept_rank",
    "merged_in_space",
    "merged_rank_grid",
    "sar_by_space",
    "truncated_merge",
    "truncation_curves",
    "truncation_error_curve",
]

#: Fractions ``p`` of ``dim(Σ)`` set to zero (003 Fig. 4's x-axis; the paper does not list its grid).
TRUNCATION_FRACTIONS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(20))
#: The spaces 003 Fig. 4 compares.
TRUNCATION_SPACES: tuple[str, ...] = ("full", "core")
#: The spaces 003 Fig. 5 compares.
SAR_SPACES: tuple[str, ...] = ("full", "core")
#: The methods and spaces of 003 Tab. 6 (TA, TSV, TIES in Full, KnOTS, Core).
TABLE6_METHODS: tuple[str, ...] = ("task_arithmetic", "tsv", "ties")
TABLE6_SPACES: tuple[str, ...] = ("full", "knots", "core")

#: Slack so that ``(1 − p)·dim`` that is an integer up to rounding is not floored one too low.
_FLOOR_SLACK = 1e-9


def _nanmean(values: np.ndarray, axis: int | tuple[int, ...]) -> np.ndarray:
    """Mean over ``axis`` ignoring NaN; NaN where every value is NaN (without a RuntimeWarning)."""
    finite = ~np.isnan(values)
    count = finite.sum(axis=axis)
    total = np.where(finite, values, 0.0).sum(axis=axis)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


# --- truncation (003 Sec. 5.2, Fig. 4) ----------------------------------------------------------


def kept_rank(dim: int, fraction: float) -> int:
    """Components kept when the fraction ``p`` of least significant singular values is truncated.

    003 Sec. 5.2: "we truncate a fraction of p least significant values, i.e. ``σ_i = 0`` for
    ``i > (1 − p)·dim(Σ)``", so ``⌊(1 − p)·dim(Σ)⌋`` components stay.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"the truncated fraction must lie in [0, 1], got {fraction}")
    return int(math.floor((1.0 - fraction) * dim + _FLOOR_SLACK))


def truncation_error_curve(sigma: Tensor | np.ndarray, dim: int) -> np.ndarray:
    """Relative error ``‖X − X_k‖_F / ‖X‖_F = sqrt(Σ_{i>k} σ_i² / Σ_i σ_i²)`` for ``k = 0 … dim``.

    ``X_k`` keeps the top ``k`` singular components of ``X`` (Eckart–Young); ``sigma`` are the
    singular values of ``X`` (descending), padded with zeros up to ``dim = dim(Σ)``. NaN for a
    zero matrix.
    """
    s = np.asarray(sigma, dtype=np.float64)
    assert s.size <= dim, (s.size, dim)
    energy = np.zeros(dim)
    energy[: s.size] = s**2
    tail = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])  # tail[k] = Σ_{i>k} σ_i² (1-based i)
    total = tail[0]
    if total <= 0.0:
        return np.full(dim + 1, np.nan)
    return np.sqrt(tail / total)


def merged_in_space(merged: Update, space: Space, ctx: Context) -> Update:
    """A merged update in the space's coordinates, ``X* = P⁺ ΔW* Q`` (see :mod:`mergelab.spaces.base`).

    The inverse of :meth:`Space.reconstruct`: the merged core ``M*`` in Core space (003 Eq. 10
    read backwards), the merged ``ΔW*`` itself in full space. Returned as factors
    ``(P⁺ B*, A* Q)`` when the space has maps (never the ``out × in`` matrix).
    """
    if ctx.left_pinv is None and ctx.right is None:
        return merged
    return space.factors([merged], ctx)[0]


def _svd(update: Update) -> tuple[Tensor, Tensor, Tensor]:
    """All singular triplets of a 2-D update, from the factors when low rank (float64)."""
    if isinstance(update, LowRank):
        return lowrank_svd(update.B, update.A, truncate=False)
    return svd64(update.delta)


def _space_dim(space: Space, updates: Sequence[Update]) -> tuple[int, Context]:
    """``dim(Σ)`` of the merged matrix in the space (``min`` of a task representation's shape) and the context."""
    matrices, ctx = space.project(updates)
    return min(matrices[0].shape), ctx


def truncated_merge(taskset: TaskSet, fraction: float, *, method: str = "task_arithmetic", space: str = "core",
                    hyper_parameters: Mapping[str, Any] | None = None) -> MergedUpdate:
    """The merge with the fraction ``p`` of least significant singular values truncated in ``space`` (003 Sec. 5.2, Fig. 4).

    Merges with :func:`mergelab.merging.merge`, takes the SVD of every merged matrix in the
    space's coordinates (:func:`merged_in_space`: ``ΔW_merged`` in full space, ``M_merged`` in
    Core space), keeps the top :func:`kept_rank` ``(dim(Σ), p)`` components and maps back. Each
    truncated matrix module is a LowRank; non-matrix parameters are kept as merged. This is what an
    evaluation flow scores to redraw 003 Fig. 4 with accuracies.
    """
    sp = get_space(space)
    merged = merge(taskset, method, sp, **dict(hyper_parameters or {}))
    out: dict[str, Update] = {}
    for name, update in merged.modules.items():
        if len(update.shape) != 2:
            out[name] = update
            continue
        dim, ctx = _space_dim(sp, taskset.updates(name))
        U, s, Vh = _svd(merged_in_space(update, sp, ctx))
        k = min(kept_rank(dim, fraction), s.numel())
        cols = max(k, 1)  # a LowRank has at least one column; zero it when nothing is kept
        kept = s[:cols] * (torch.arange(cols) < k).to(s.dtype)
        out[name] = sp.reconstruct(LowRank(U[:, :cols] * kept, Vh[:cols]), ctx)
    meta = {**merged.meta, "truncation": {"fraction": float(fraction), "space": sp.name}}
    return MergedUpdate(out, merged.base, meta)


def truncation_curves(taskset: TaskSet, *, method: MethodName = "task_arithmetic", spaces: SpaceNames = TRUNCATION_SPACES,
                      fractions: Annotated[Sequence[float], Interval(0, 1)] = TRUNCATION_FRACTIONS, hyper_parameters: Mapping[str, Any] | None = None,
                      split_packed: bool = True) -> xr.Dataset:
    """Core- vs full-space truncation of the merged update (003 Sec. 5.2 "Truncation", Fig. 4).

    For every space and LoRA module: merge with ``method`` (003: Task Arithmetic), take the
    singular values ``σ`` of the merged matrix in the space (``ΔW_merged``, ``out × in``, in full
    space; ``M_merged``, ``d_U × d_V`` (``Tr × Tr``), in Core space), ``dim(Σ)`` = the smaller side
    of that matrix, and truncate the fraction ``p`` of least significant values (``σ_i = 0`` for
    ``i > (1 − p)·dim(Σ)``). What the truncation removes, relative to the untruncated merge:
    ``sqrt(Σ_{i>k} σ_i² / Σ_i σ_i²)`` with ``k`` the kept rank (the relative Frobenius error of
    the reconstructed ``ΔW`` too, since the Core maps are isometries).

    Dims ``space``, ``module`` (``layer``/``kind`` coords), ``fraction`` (``p``), ``rank`` (kept
    rank ``k = 0 … max dim(Σ)``) and ``component`` (1-based). Variables: ``dim_sigma``,
    ``singular_value``, ``relative_error`` (by kept rank), ``kept_rank``, ``truncation_error``
    and ``retained_energy`` (by ``p``) and ``truncation_error_mean`` (over modules; the curve of
    Fig. 4). NaN beyond a module's ``dim(Σ)`` and where the merge is zero.
    """
    lora = matrix_taskset(taskset, split_packed=split_packed, lora_only=True)
    modules = list(lora.module_names)
    spaces = list(spaces)
    fractions = np.asarray([float(p) for p in fractions])
    dims, sigmas, resolved = _merged_spectra(lora, modules, method, spaces, hyper_parameters)
    n = int(dims.max())
    sv, err_by_rank, kept, err = _truncation_errors(dims, sigmas, fractions, (len(spaces), len(modules)))
    by_p = ("space", "module", "fraction")
    return xr.Dataset(
        {
            "dim_sigma": annotated(("space", "module"), dims, "dim(Σ): singular values of the merged matrix in the space"),
            "singular_value": annotated(("space", "module", "component"), sv, "singular value σ_k of the merged matrix in the space",
                                        "weight units"),
            "relative_error": annotated(("space", "module", "rank"), err_by_rank,
                                        "relative Frobenius error of the merge truncated to its top-k components"),
            "kept_rank": annotated(by_p, kept, "kept rank ⌊(1 − p)·dim(Σ)⌋"),
            "truncation_error": annotated(by_p, err, "relative Frobenius error after truncating the fraction p"),
            "retained_energy": annotated(by_p, 1.0 - err**2, "energy retained after truncating the fraction p"),
            "truncation_error_mean": annotated(("space", "fraction"), _nanmean(err, axis=1),
                                               "relative truncation error averaged over modules"),
        },
        coords={"space": np.array(spaces, dtype=object), **module_coords(modules, taskset.layout), "fraction": fractions,
                "rank": np.arange(n + 1), "component": np.arange(1, n + 1)},
        attrs=dataset_attrs(taskset, title="core- vs full-space truncation of the merged update", method=method,
                            hyper_parameters=resolved, paper="003 Sec. 5.2 (Fig. 4)"),
    )


def _merged_spectra(lora: TaskSet, modules: Sequence[str], method: str, spaces: Sequence[str],
                    hyper_parameters: Mapping[str, Any] | None) -> tuple[np.ndarray, dict[tuple[int, int], np.ndarray], dict[str, Any]]:
    """Step 1 of :func:`truncation_curves`: per (space, module), ``dim(Σ)`` and the singular values of the merged matrix in the
    space (003 Sec. 5.2), and the merge's resolved hyper-parameters."""
    dims = np.zeros((len(spaces), len(modules)), dtype=np.int64)
    sigmas: dict[tuple[int, int], np.ndarray] = {}
    resolved: dict[str, Any] = {}
    for i, space in enumerate(spaces):
        sp = get_space(space)
        merged = merge(lora, method, sp, **dict(hyper_parameters or {}))
        resolved = merged.meta["hyper_parameters"]
        for j, name in enumerate(modules):
            dims[i, j], ctx = _space_dim(sp, lora.updates(name))
            sigmas[i, j] = singular_values(merged_in_space(merged.modules[name], sp, ctx)).numpy()
    return dims, sigmas, resolved


def _truncation_errors(dims: np.ndarray, sigmas: Mapping[tuple[int, int], np.ndarray], fractions: np.ndarray,
                       shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Step 2 of :func:`truncation_curves`: per (space, module) of ``shape``, the singular values padded to the largest
    ``dim(Σ)``, the relative error by kept rank ``sqrt(Σ_{i>k} σ_i² / Σ_i σ_i²)``, and by fraction ``p`` the kept rank
    and its error."""
    n = int(dims.max())
    sv = np.full((*shape, n), np.nan)
    err_by_rank = np.full((*shape, n + 1), np.nan)
    kept = np.zeros((*shape, len(fractions)), dtype=np.int64)
    err = np.full((*shape, len(fractions)), np.nan)
    for (i, j), s in sigmas.items():
        d = int(dims[i, j])
        sv[i, j, :d] = 0.0
        sv[i, j, : s.size] = s
        curve = truncation_error_curve(s, d)
        err_by_rank[i, j, : d + 1] = curve
        kept[i, j] = [kept_rank(d, p) for p in fractions]
        err[i, j] = curve[kept[i, j]]
    return sv, err_by_rank, kept, err


# --- SAR per space (003 Sec. 5.2, Fig. 5) -------------------------------------------------------


def sar_by_space(taskset: TaskSet, *, spaces: SpaceNames = SAR_SPACES, retained: Share = SAR_RETAINED,
                 split_packed: bool = True) -> xr.Dataset:
    """Subspace alignment ratio between every pair of task updates in full and Core space (003 Sec. 5.2, Fig. 5).

    :func:`~mergelab.analysis.spectra.pairwise_sar` on ``ΔW_t`` (full) and on the core matrices
    ``M_t`` (core), stacked along a ``space`` dim: variables ``sar(space, task, reference,
    module)``, ``k_reference``, ``sar_mean`` and ``sar_offdiag_mean(space)`` (the bars of Fig. 5).
    Only LoRA modules enter, in both spaces, so that the two are averaged over the same modules.
    """
    lora = matrix_taskset(taskset, split_packed=split_packed, lora_only=True)
    per_space = [pairwise_sar(lora, retained=retained, split_packed=False, space=space) for space in spaces]
    ds = xr.concat(per_space, dim=xr.DataArray(np.array(list(spaces), dtype=object), dims="space"),
                   combine_attrs="drop")
    ds.attrs = dataset_attrs(taskset, title="subspace alignment ratio between task updates, per space",
                             spaces=list(spaces), retained=retained,
                             paper="003 Sec. 5.2 (Fig. 5); Marczak et al. 2025 Eqs. (5)-(6)")
    return ds


# --- rank of the merged update per method and space (003 App. C.2, Tab. 6) ----------------------


def merged_rank_grid(taskset: TaskSet, *, methods: MethodNames = TABLE6_METHODS, spaces: SpaceNames = TABLE6_SPACES,
                     hyper_parameters: Mapping[str, Mapping[str, Any]] | None = None, rtol: RelativeTolerance = None,
                     split_packed: bool = True) -> xr.Dataset:
    """Numerical rank ``r_ΔW`` of the merged update for every method × space (003 App. C.2, Tab. 6).

    Each cell is :func:`mergelab.merging.merge` then :func:`~mergelab.analysis.spectra.merged_rank`
    (``rtol=None``: ``max(out, in)·eps`` of the merged dtype). ``hyper_parameters`` maps a method to
    its hyper-parameters (default: the registry defaults). Dims ``method``, ``space``, ``module``;
    variables ``merged_rank``, ``merged_rank_mean(method, space)`` (the cells of Tab. 6),
    ``max_rank = min(out, in)`` and ``total_lora_rank = Σ_t r_t`` (``Tr``, the bound in Core and
    KnOTS space).
    """
    lora = matrix_taskset(taskset, split_packed=split_packed, lora_only=True)
    modules = list(lora.module_names)
    ranks = np.empty((len(methods), len(spaces), len(modules)), dtype=np.int64)
    resolved: dict[str, dict[str, Any]] = {}
    chosen = dict(hyper_parameters or {})
    for i, method in enumerate(methods):
        for k, space in enumerate(spaces):
            merged = merge(lora, method, space, **dict(chosen.get(method, {})))
            resolved[method] = dict(merged.meta["hyper_parameters"])
            ranks[i, k] = merged_rank(merged, rtol=rtol, split_packed=False).merged_rank.sel(module=modules).values
    first = [lora.tasks[0].modules[m] for m in modules]
    return xr.Dataset(
        {
            "merged_rank": annotated(("merge_method", "space", "module"), ranks, "numerical rank r_ΔW of the merged update"),
            "merged_rank_mean": annotated(("merge_method", "space"), ranks.mean(axis=2), "r_ΔW averaged over modules"),
            "max_rank": annotated(("module",), np.array([min(u.shape) for u in first], dtype=np.int64), "min(out, in)"),
            "total_lora_rank": annotated(("module",), np.array([sum(u.rank for u in lora.updates(m)) for m in modules],
                                                               dtype=np.int64), "Σ_t r_t"),
        },
        coords={"merge_method": np.array(list(methods), dtype=object), "space": np.array(list(spaces), dtype=object),
                **module_coords(modules, taskset.layout)},
        attrs=dataset_attrs(taskset, title="rank of the merged update per method and space",
                            hyper_parameters=resolved, rtol="max(out, in) * eps(dtype)" if rtol is None else rtol,
                            paper="003 App. C.2 (Tab. 6)"),
    )
