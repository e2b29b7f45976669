"""Completing the zero singular directions that ``support="all"`` asks for, deterministically.

TSV-M, Iso-C and Iso-CTS, as published, use a fixed number of singular directions per matrix
(``⌊min(m, n)/T⌋`` per task; all ``min(m, n)``). A LoRA update has fewer non-zero singular
values than that, and the singular vectors of its zero singular values are whatever LAPACK
completes the basis with: they change with the thread count, the BLAS and with how ``ΔW`` is
factored (``(B, A)`` vs ``(3B, A/3)`` moves the core bases), and the original code's result
changes with them (issue 29: up to 98 % relative on the micro benchmark). This module fixes one
completion and says why it is the natural one.

**Rule.** The ``c`` directions a method needs beyond the ``ρ`` non-zero ones are paired unit
directions ``(u_i, v_i)`` orthogonal to *every* non-zero direction the method keeps (left and
right), and paired by the frame ``F``, the identity of the weight's own coordinates
(``F_ij = δ_ij``, ``out × in``, expressed in the coordinates the method sees): they are the leading
``c`` singular pairs of ``P_L F P_R``, ``P_L``/``P_R`` the orthogonal projectors onto the
complements of the kept left / right directions (:func:`frame_pairs`). For Iso-C (the kept
directions are those of ``X`` itself) they are exactly the zero-singular-value directions of
``X + ε P_L F P_R`` for every small ``ε > 0``: what LAPACK would return if its round-off were
replaced by a small share of the identity map.

**Why this rule.** (1) It is well-posed: the kept directions are determined up to signs (and
rotations within ties of non-zero singular values), and ``P_L F P_R`` depends only on their span,
so the result is the same for every thread count, BLAS and factorisation, to round-off (tests
pin ≤ 1e-6). Any orthonormal bases of the complements give the same pairs. (2) It is
rotation-equivariant: the frame enters as a map of the weight space (the space carries it into
its coordinates, :meth:`mergelab.spaces.Context.frame`), so Core, KnOTS and full space complete
the same ambient directions. (3) It adds no interference. The alternative that reuses the other
tasks' directions (task ``t``'s missing directions = the leading pairs of the other tasks' sum
projected onto ``t``'s null spaces) is *not* well-posed in the full space: there every such
direction lies in the span ``C`` of all tasks' updates, so ``T·⌊d/T⌋`` columns crowd into
``dim C = Σ_t r_t < d`` dimensions, TSV's ``[U_1 … U_T]`` is singular (smallest singular value
6e-18 on the micro mixed set) and its polar factor is arbitrary (45 % relative change under 1e-9
input noise, measured).

**Consequences per method** (module :mod:`mergelab.merging.spectral`):

* TSV-M: completed columns carry ``σ = 0`` and are orthogonal to every other column of
  ``[U_1 … U_T]`` and ``[V_1 … V_T]``, so both Gram matrices are block-diagonal, the polar factors
  split, and the completed block is multiplied by zero: it drops out. TSV-M's result is the same
  with and without them — the merge of the non-zero directions — for *any* completion of this
  class, so none is formed.
* Iso-C: the completed block is ``σ̄ N_L Z N_Rᵀ`` on the null spaces of ``Σ_t τ_t`` with
  ``Z = polar(N_Lᵀ F N_R)``: the isotropic null-space component closest to the identity map
  (invariant to the choice of null-space bases ``N_L``, ``N_R``).
* Iso-CTS: common directions beyond the rank of the sum and task directions beyond the rank of
  a residual are completed together, by the same rule, in the complement of all kept directions.

Generic inputs make the rule unique; only ties among the singular values of ``P_L F P_R`` (or a
zero among its leading ``c``) leave a choice, which then is resolved by LAPACK again.

**Record.** Every completion is noted (:func:`note`); :func:`recording` collects the counts per
module (:func:`at`) so the merge record says when a merge was rank-deficient
(:func:`mergelab.merging.merge` puts them in ``meta["completed_directions"]``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

from mergelab.linalg import numerical_rank, svd64

__all__ = ["at", "frame_pairs", "identity_frame", "note", "recording"]

_LOG: ContextVar[dict[str, int] | None] = ContextVar("completed_directions", default=None)
_WHERE: ContextVar[str] = ContextVar("completion_site", default="")


def identity_frame(shape: tuple[int, int]) -> Tensor:
    """The frame of a matrix seen in its own coordinates: the rectangular identity ``F_ij = δ_ij``."""
    return torch.eye(*shape, dtype=torch.float64)


def _complement_projector(kept: Tensor) -> Tensor:
    """``I − Q Qᵀ`` with ``Q`` an orthonormal basis of the span of the columns of ``kept`` (``(m, p)``)."""
    m = kept.shape[0]
    if kept.shape[1] == 0:
        return torch.eye(m, dtype=torch.float64)
    Q, s, _ = svd64(kept)
    Q = Q[:, :numerical_rank(s, tuple(kept.shape), torch.float64)]
    return torch.eye(m, dtype=torch.float64) - Q @ Q.T


def frame_pairs(frame: Tensor, U_kept: Tensor, Vh_kept: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """``(U_c (m, count), Vh_c (count, n))``: the leading ``count`` singular pairs of
    ``P_L F P_R``, ``P_L = I − Q_L Q_Lᵀ`` for an orthonormal basis ``Q_L`` of the span of
    ``U_kept``'s columns (``P_R`` likewise for ``Vh_kept``'s rows); module docstring. The pairs are
    orthonormal, orthogonal to every kept direction, and don't depend on how the kept directions
    were chosen within their span."""
    P_L = _complement_projector(U_kept.to(torch.float64))
    P_R = _complement_projector(Vh_kept.to(torch.float64).T)
    U, _, Vh = svd64(P_L @ frame.to(torch.float64) @ P_R)
    return U[:, :count], Vh[:count]


@contextmanager
def recording() -> Iterator[dict[str, int]]:
    """Collect ``{site: completed directions}`` of every completion noted inside the block."""
    log: dict[str, int] = {}
    token = _LOG.set(log)
    try:
        yield log
    finally:
        _LOG.reset(token)


@contextmanager
def at(site: str) -> Iterator[None]:
    """Name the site (a module) that completions noted inside the block belong to."""
    token = _WHERE.set(site)
    try:
        yield
    finally:
        _WHERE.reset(token)


def note(directions: int) -> None:
    """Record that ``directions`` zero singular directions were completed (no-op outside :func:`recording`)."""
    log = _LOG.get()
    if log is not None and directions > 0:
        site = _WHERE.get()
        log[site] = log.get(site, 0) + directions
