"""KnOTS space (Stoica et al., 2025; 001 Sec. 4 (viii), 003 Fig. 2 middle).

The SVD of the horizontal concatenation ``[ΔW_1 … ΔW_T] = U diag(s) Vᵀ`` (``out × T·in``);
``Vᵀ`` splits column-wise into per-task blocks ``V_t`` (``k × in``) with
``ΔW_t = U diag(s) V_t``. A merged block ``V*`` goes back as ``U diag(s) V*``.

Computing the SVD. ``naive=True`` forms the ``out × T·in`` matrix and decomposes it in float64,
as the KnOTS code does (``O(n³T²)``, 003 App. B): the cost reference. The default computes the
same SVD exactly from the factors: ``[ΔW_1 … ΔW_T] = [B_1 … B_T] · blockdiag(A_1 … A_T)``;
with ``[B_1 … B_T] = Q_B R_B`` and ``A_tᵀ = Q_t R_t`` (reduced QR),
``[ΔW_1 … ΔW_T] = Q_B · (R_B blockdiag(R_tᵀ)) · blockdiag(Q_tᵀ)``, so the SVD of the small
``Tr × Tr`` matrix ``C = R_B blockdiag(R_tᵀ) = U_c diag(s) V_cᵀ`` gives ``U = Q_B U_c`` and
``V_t = V_cᵀ[:, block t] Q_tᵀ``. Components are kept above the numerical rank tolerance
(``σ_max · max(shape) · eps(float64)``, or ``rank_rtol``; at least one); the KnOTS code uses an absolute
``s > 1e-5``, which depends on the scale of the updates.

Two variants (the paper's and its code's, as the KnOTS and Core Space code run them), the paper's by default:

* ``variant="paper"`` (KnOTS paper and code, ``SVDMerger``): a task is represented by
  ``diag(s) V_t`` and element-wise methods see every layer's ``diag(s) V_t`` flattened into one
  vector per task (``scope="model"``), so a TIES / DARE top-k trim is global across layers.
  Reconstruction is ``U · X*``.
* ``variant="per_layer"`` (the Core Space repository's ``knots`` mode): a task is ``V_t``
  without ``s`` and every method runs per layer; reconstruction is ``U diag(s) X*``. The map
  ``U diag(s)`` is not an isometry; TSV-M and CART run on ``V_t`` as in that code, and methods of
  LoRA factors (LoRA-LEGO, Linear) get the factors in isometric coordinates
  (``(Uᵀ B_t, A_t)``, :meth:`Context.isometric`), so that LoRA-LEGO clusters on the units' true
  geometry (on ``(diag(1/s) Uᵀ B_t, A_t)`` a unit's ``b`` half would be stretched by ``1/s``)
  and merges as in the paper variant and the other spaces.

Stages that flatten the spectrum over the null space too (registry ``frame``: Iso-C and Iso-CTS,
also as ``+iso_c``), option ``spectral``:

* ``"update"`` (default; 003's code, which isotropises the *reconstructed* ΔW with ``--isotropize``):
  the stage acts on the ``out × in`` update ``ΔW = U X`` (``U diag(s) X`` per layer) over all
  ``min(out, in)`` singular values, and the module stays in the full space from there (the result
  is dense). Iso-C in KnOTS space then equals Iso-C in the full space, and ``ties+iso_c`` is
  003's KnOTS-TIES+Iso-C.
* ``"represented"``: the stage acts on the representation in isometric coordinates (``X``, or
  ``diag(s) X`` per layer): only the ``k`` directions KnOTS represents, which equals
  ``support="nonzero"`` on the reconstructed update; the result stays low rank.

The other spectral stages (the truncated SVD of the sum, STAR) give the same merge either way (zero
singular values count for nothing in a truncation), so they always run on the representation and
stay low rank.

Task arithmetic gives ``Σ_t ΔW_t`` in both. The KnOTS code also multiplies every task by one
task-agnostic coefficient; here that is the method's ``alpha``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from mergelab.linalg import numerical_rank, svd64
from mergelab.params import Interval
from mergelab.spaces.base import Context, Space, StoredBasis, numbered, output_dtype, require_low_rank
from mergelab.taskset import LowRank, Update

__all__ = ["KnotsSpace", "knots_svd"]


def knots_svd(updates: Sequence[LowRank], *, naive: bool = False,
              rank_rtol: float | None = None) -> tuple[Tensor, Tensor, list[Tensor]]:
    """``(U (out, k), s (k,), [V_t (k, in)])`` with ``[ΔW_1 … ΔW_T] = U diag(s) [V_1 … V_T]``."""
    n_in = updates[0].shape[1]
    if naive:
        stacked = torch.cat([u.dense(torch.float64) for u in updates], dim=1)  # (out, T·in): the cost reference
        U, s, Vh = svd64(stacked)
        k = max(1, numerical_rank(s, tuple(stacked.shape), torch.float64, rank_rtol))
        return U[:, :k], s[:k], list(Vh[:k].split(n_in, dim=1))
    Q_B, R_B = torch.linalg.qr(torch.cat([u.B for u in updates], dim=1).to(torch.float64))  # (out, ≤Tr), (≤Tr, Tr)
    QR_A = [torch.linalg.qr(u.A.to(torch.float64).T) for u in updates]  # A_tᵀ = Q_t R_t: (in, ≤r_t), (≤r_t, r_t)
    C = R_B @ torch.block_diag(*[R.T for _, R in QR_A])  # (≤Tr, Σ≤r_t)
    U_c, s, Vh_c = svd64(C)
    k = max(1, numerical_rank(s, (updates[0].shape[0], len(updates) * n_in), torch.float64, rank_rtol))
    U = Q_B @ U_c[:, :k]
    blocks = Vh_c[:k].split([Q.shape[1] for Q, _ in QR_A], dim=1)
    return U, s[:k], [block @ Q.T for block, (Q, _) in zip(blocks, QR_A, strict=True)]


@dataclass(frozen=True)
class KnotsSpace(Space):
    """KnOTS space (see the module docstring).

    Options:
        variant: ``"paper"`` (``diag(s) V_t``, global trim) or ``"per_layer"`` (``V_t``).
        naive: form the ``out × T·in`` matrix and take its SVD (the paper code's cost).
        scope: overrides the variant's scope (``"model"`` for paper, ``"module"`` per layer).
        rank_rtol: relative tolerance of the kept singular values (``None``: numerical rank).
        spectral: what spectral stages act on: ``"update"`` (003's code) or ``"represented"`` (module docstring).
    """

    name: ClassVar[str] = "knots"
    option_intervals: ClassVar = {"rank_rtol": Interval(0.0, 1.0, low_open=True, high_open=True)}
    #: ``naive`` keys the basis too: it is the same SVD in exact arithmetic, not in floating point
    #: (round-off, signs of singular pairs), and it exists to measure the paper code's cost
    basis_options: ClassVar = ("naive", "rank_rtol")
    #: ``(U, s, [V_t])`` as ``U``, ``s``, ``V.<t>``; ``space`` / ``reference`` key the same SVD of core
    #: matrices, TARA-B's core-space bank (:func:`mergelab.bases.adaptation_bases`)
    stored_basis: ClassVar = StoredBasis("1", {"naive": False, "rank_rtol": None, "space": "full", "reference": None},
                                         lambda b: {"U": b[0], "s": b[1], **{f"V.{i}": V for i, V in enumerate(b[2])}},
                                         lambda t: (t["U"], t["s"], numbered(t, "V")))
    variant: Literal["paper", "per_layer"] = "paper"
    naive: bool = False
    scope: Literal["module", "model"] | None = None  # type: ignore[misc]
    rank_rtol: float | None = None
    spectral: Literal["update", "represented"] = "update"

    def __post_init__(self) -> None:
        if self.scope is None:
            object.__setattr__(self, "scope", "model" if self.variant == "paper" else "module")

    def configure(self, **options) -> KnotsSpace:
        if "variant" in options and "scope" not in options:  # the scope follows a new variant
            options = {**options, "scope": None}
        return super().configure(**options)  # type: ignore[return-value]

    def basis(self, updates: Sequence[Update]) -> tuple[Tensor, Tensor, list[Tensor]]:
        """``(U, s, [V_t])`` with ``[ΔW_1 … ΔW_T] = U diag(s) [V_1 … V_T]`` (KnOTS, Stoica et al. 2025; :func:`knots_svd`)."""
        return knots_svd(require_low_rank(updates, self.name), naive=self.naive, rank_rtol=self.rank_rtol)

    def project(self, updates: Sequence[Update], basis: tuple[Tensor, Tensor, Sequence[Tensor]] | None = None,
                ) -> tuple[list[Tensor], Context]:
        """Each task's block ``diag(s) V_t`` (paper) or ``V_t`` (per layer) of the given or computed SVD."""
        lowrank = require_low_rank(updates, self.name)
        U, s, blocks = self.basis(lowrank) if basis is None else basis
        info = {"singular_values": s, "k": int(s.numel())}
        if self.variant == "paper":
            reps = [s[:, None] * V_t for V_t in blocks]
            ctx = Context(shape=tuple(updates[0].shape), dtype=output_dtype(updates), left=U, left_pinv=U.T,
                          spectral=self.spectral, info=info)
        else:
            reps = list(blocks)
            inv_s = torch.where(s > 0, 1.0 / s.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(s))  # s = 0: all-zero module
            ctx = Context(shape=tuple(updates[0].shape), dtype=output_dtype(updates), left=U * s, left_pinv=U.T * inv_s[:, None],
                          left_scale=s, spectral=self.spectral, info=info)
        return reps, ctx
