"""What every merge space shares: a bilinear representation ``ΔW_t = P X_t Qᵀ``.

All three spaces (full, KnOTS, Core) are of one form. A space picks, per module, a left map ``P``
(``out × p``) with a left inverse ``P⁺`` on the span of the tasks' ``B_t``, and a right map
``Q`` (``in × q``, orthonormal columns) spanning the tasks' rows of ``A_t``; task ``t`` is
represented by ``X_t = P⁺ ΔW_t Q`` and a merged ``X*`` is mapped back to ``ΔW* = P X* Qᵀ``:

============  ==================  =============  ============  =============================
space         P                   P⁺             Q             X_t
============  ==================  =============  ============  =============================
full          I                   I              I             ``B_t A_t``  (out × in)
knots paper   U                   Uᵀ             I             ``diag(s) V_t`` (k × in)
knots layer   U diag(s)           diag(1/s) Uᵀ   I             ``V_t``  (k × in)
core          U_B^ref             U_B^refᵀ       V_A^ref       ``M_t`` (≤ Tr × ≤ Tr)
============  ==================  =============  ============  =============================

Because the maps are linear and lossless on the tasks' spans, any linear merge (task
arithmetic) gives the same ΔW in every space (003 Eq. 11); non-linear merges differ, which is
the point of having spaces. The same maps carry LoRA factors into a space (``B_t -> P⁺ B_t``,
``A_t -> A_t Q``; for methods that merge factors) and input Gram matrices
(``G -> Qᵀ G Q``; RegMean). A space never knows which method runs in it.

``scope`` says what an element-wise method sees: ``"module"`` (one matrix per module, the
default) or ``"model"`` (the concatenation of every module's representation, so that e.g. a
TIES top-k trim is global across layers as in the KnOTS paper). Methods that need a matrix
always run per module.

A map may be held as the product of two factors that is never formed (:class:`Factored`): the
Core space's ``U_B^ref = [B_1 … B_T] · V_B Σ_B⁻¹`` is the tasks' own stack times a small coefficient
matrix. Every operation below accepts either form; :meth:`Space.reconstruct` folds a factored right
map's coefficients into the left factor, so that the right factor of the result is the stack itself.

A space whose maps come from decompositions (knots: the SVD of ``[ΔW_1 … ΔW_T]``; core: the
reference bases) computes them in :meth:`Space.basis` and builds the projection from them in
``project(updates, basis)``; the basis is the expensive part and depends only on the tasks'
updates and the options named in ``basis_options``, so it can be computed once, stored
(:mod:`mergelab.bases`) and passed back in. The full space has none.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from mergelab.errors import InputError
from mergelab.params import Param, params_of_dataclass, resolve
from mergelab.taskset import Dense, LowRank, Update

__all__ = ["Context", "Factored", "Space", "StoredBasis", "numbered", "output_dtype", "require_low_rank"]


@dataclass(frozen=True, eq=False)
class Factored:
    """A ``rows × cols`` map held as ``outer @ inner`` and never formed: ``outer`` (``rows × k``) is
    large, ``inner`` (``k × cols``) small, so applying the map costs one product with ``outer``.

    It composes with tensors by ``@`` on either side (``F @ X = outer (inner X)``,
    ``X @ F = (X outer) inner``), transposes (``F.T``), and takes its leading rows (``F[:p]``) or
    columns (``F[:, :p]``) from the factor that holds them.
    """

    outer: Tensor
    inner: Tensor

    @property
    def T(self) -> Factored:  # noqa: N802 (the transpose, as Tensor.T)
        return Factored(self.inner.mT, self.outer.mT)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.outer.shape[0], self.inner.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    def to(self, dtype: torch.dtype) -> Factored:
        return Factored(self.outer.to(dtype), self.inner.to(dtype))

    def dense(self) -> Tensor:
        """The formed ``rows × cols`` matrix."""
        return self.outer @ self.inner

    def __matmul__(self, x: Tensor) -> Tensor:
        return self.outer @ (self.inner @ x)

    def __rmatmul__(self, x: Tensor) -> Tensor:
        return (x @ self.outer) @ self.inner

    def __getitem__(self, index: slice | tuple[slice, slice]) -> Factored:
        if isinstance(index, slice):  # leading rows
            return Factored(self.outer[index], self.inner)
        rows, cols = index
        assert rows == slice(None), "a Factored map slices its rows or its columns, not both"
        return Factored(self.outer, self.inner[:, cols])


Map = Tensor | Factored


@dataclass(frozen=True, eq=False)
class Context:
    """What :meth:`Space.reconstruct` needs for one module: ``ΔW = P X Qᵀ`` (``None`` = identity).

    ``left_scale``: set when ``P`` is not an isometry but ``P = U diag(left_scale)`` with ``U``
    orthonormal (KnOTS ``per_layer``); ``diag(left_scale) X`` then has the singular values of
    ``ΔW`` (:meth:`isometric`). ``spectral``: what a stage that fills null directions (registry
    ``frame``: Iso-C, Iso-CTS) acts on here — ``"represented"``: the isometric coordinates of the
    representation; ``"update"``: the reconstructed ``out × in`` update ``P X Qᵀ`` (:meth:`update`),
    after which the module is in the full space's coordinates. ``info`` holds space-specific numbers
    for analysis (singular values, basis ranks).
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    left: Map | None = None
    left_pinv: Map | None = None
    right: Map | None = None
    left_scale: Tensor | None = None
    spectral: Literal["represented", "update"] = "represented"
    info: Mapping[str, Any] = field(default_factory=dict)

    def isometric(self, x: Tensor | LowRank) -> Tensor | LowRank:
        """``x`` (a representation, or factors ``(P⁺ B, A Q)``) in coordinates whose maps are
        isometries: ``diag(left_scale) x`` (or ``x``)."""
        if self.left_scale is None:
            return x
        if isinstance(x, LowRank):
            return LowRank(self.left_scale.to(x.B.dtype)[:, None] * x.B, x.A)
        return self.left_scale.to(x.dtype)[:, None] * x

    def update(self, x: Tensor) -> Tensor:
        """The dense ``out × in`` update ``P x Qᵀ`` of a representation ``x`` (float64)."""
        y = x.to(torch.float64) if self.left is None else self.left.to(torch.float64) @ x.to(torch.float64)
        return y if self.right is None else y @ self.right.to(torch.float64).T

    def frame(self) -> Tensor:
        """The identity of the weight's own coordinates, ``F_ij = δ_ij`` (``out × in``), in this space's:
        ``P⁺ F Q`` (float64), computed as ``P⁺[:, :p] Q[:p]`` with ``p = min(out, in)``. Spectral
        methods pair completed null directions with it (:mod:`mergelab.merging.completion`)."""
        m, n = self.shape
        p = min(m, n)
        left = torch.eye(m, p, dtype=torch.float64) if self.left_pinv is None else self.left_pinv[:, :p].to(torch.float64)
        right = torch.eye(p, n, dtype=torch.float64) if self.right is None else self.right[:p].to(torch.float64)
        return left @ right

    def from_isometric(self, y: Tensor | LowRank) -> Tensor | LowRank:
        """The inverse of :meth:`isometric` (a zero scale, an all-zero module, maps to zero)."""
        if self.left_scale is None:
            return y
        s = self.left_scale
        inv = torch.where(s > 0, 1.0 / s.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(s))
        if isinstance(y, LowRank):
            return LowRank(inv.to(y.B.dtype)[:, None] * y.B, y.A)
        return inv.to(y.dtype)[:, None] * y


def output_dtype(updates: Sequence[Update]) -> torch.dtype:
    """The dtype merged updates are returned in: the inputs' promoted dtype, at least float32."""
    dtype = torch.float32
    for u in updates:
        dtype = torch.promote_types(dtype, u.dtype)
    return dtype


def require_low_rank(updates: Sequence[Update], space: str) -> list[LowRank]:
    """The updates as LowRank, or an InputError saying why this space needs factors."""
    dense = [i for i, u in enumerate(updates) if not isinstance(u, LowRank)]
    if dense:
        raise InputError(
            f"the {space} space is built from LoRA factors, but task #{dense[0]} gives a dense update of shape "
            f"{tuple(updates[dense[0]].shape)} (a full fine-tune); merge dense updates in the full space (--space full)"
        )
    return list(updates)  # type: ignore[arg-type]


@dataclass(frozen=True)
class StoredBasis:
    """How a decomposition is kept in the store (:mod:`mergelab.bases`, key ``bases.<name>``): its code
    version (bump it when its tensors change for the same inputs), the options that key it with their
    defaults, and how one module's decomposition becomes named tensors and back."""

    version: str
    options: Mapping[str, Any]
    encode: Callable[[Any], dict[str, Tensor]]
    decode: Callable[[Mapping[str, Tensor]], Any]


def numbered(tensors: Mapping[str, Tensor], name: str) -> list[Tensor]:
    """``tensors["<name>.0"], tensors["<name>.1"], …``: a list a :class:`StoredBasis` encoded by position."""
    count = sum(1 for k in tensors if k.rsplit(".", 1)[0] == name)
    return [tensors[f"{name}.{i}"] for i in range(count)]


@dataclass(frozen=True)
class Space:
    """Base class of the merge spaces; subclasses are frozen dataclasses whose fields are options."""

    name: ClassVar[str] = "space"
    #: which space options exist, their types and ranges (filled per subclass)
    option_intervals: ClassVar[Mapping[str, Any]] = {}
    #: the options that change :meth:`basis` (they key a stored basis); empty for a space without one
    basis_options: ClassVar[tuple[str, ...]] = ()
    #: how :meth:`basis` is kept in the store (``None``: a space without a basis)
    stored_basis: ClassVar[StoredBasis | None] = None
    #: whether ``reconstruct(project(updates))`` gives every task's update back (the maps are lossless on
    #: the tasks' spans), so a linear merge is the full space's (003 Eq. 11); :mod:`mergelab.conformance`
    #: checks both where it is set
    lossless: ClassVar[bool] = True

    # Every subclass has a ``scope`` field: ``"module"`` or ``"model"`` (module docstring).

    # --- what a subclass provides ------------------------------------------------------------

    def project(self, updates: Sequence[Update], basis: Any = None) -> tuple[list[Tensor | LowRank], Context]:
        """The per-task representations ``X_t`` of one module's updates (a matrix, or its factors
        where the space has them: Core's ``M_t``), and the context.

        ``basis``: this module's :meth:`basis` of the same updates, computed earlier (or read from
        the store); ``None`` computes it. Either way the result is the same, bit for bit.
        """
        raise NotImplementedError

    def basis(self, updates: Sequence[Update]) -> Any:
        """The decomposition the projection of one module is built on, or ``None`` (no basis)."""
        return None

    def basis_key_options(self) -> dict[str, Any]:
        """The options in ``basis_options`` with their values (what a stored basis is keyed on)."""
        return {name: getattr(self, name) for name in self.basis_options}

    # --- shared ----------------------------------------------------------------------------

    @classmethod
    def option_params(cls) -> dict[str, Param]:
        return params_of_dataclass(cls, cls.option_intervals)

    def configure(self, **options: Any) -> Space:
        """A copy with the given options, validated (InputError names the allowed ones)."""
        values = resolve(self.option_params(), {**self.options(), **options}, f"space {self.name!r}")
        return dataclasses.replace(self, **values)

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def reconstruct(self, merged: Tensor | LowRank, ctx: Context) -> Update:
        """``ΔW = P X Qᵀ`` as a LowRank (never materialised) unless the space is the full space.

        A merged matrix ``X`` gives ``LowRank(P X, Qᵀ)``; with a factored right map ``Q = S C``
        (:class:`Factored`) the coefficients are folded into the left factor,
        ``LowRank(P X Cᵀ, Sᵀ)``, so that ``Q`` is never formed. Merged factors ``(b, a)`` give
        ``LowRank(P b, a Qᵀ)``, of their own rank.
        """
        if isinstance(merged, LowRank):
            B = merged.B if ctx.left is None else ctx.left @ merged.B.to(ctx.left.dtype)
            A = merged.A if ctx.right is None else merged.A.to(ctx.right.dtype) @ ctx.right.T
            return LowRank(B.to(ctx.dtype), A.to(ctx.dtype))
        if ctx.left is None and ctx.right is None:
            return Dense(merged.to(ctx.dtype))
        if ctx.right is None:  # ΔW = P X: P is the B factor, X the A factor
            return LowRank(ctx.left.to(ctx.dtype), merged.to(ctx.dtype))
        if isinstance(ctx.right, Factored):
            X, right = merged.to(ctx.right.dtype) @ ctx.right.inner.T, ctx.right.outer  # (p, k), (in, k)
        else:
            X, right = merged.to(ctx.right.dtype), ctx.right
        B = X if ctx.left is None else ctx.left @ X
        return LowRank(B.to(ctx.dtype), right.T.to(ctx.dtype))

    def factors(self, updates: Sequence[Update], ctx: Context) -> list[LowRank]:
        """Each task's LoRA factors in this space's coordinates: ``(P⁺ B_t, A_t Q)``."""
        work = ctx.left_pinv.dtype if ctx.left_pinv is not None else (ctx.right.dtype if ctx.right is not None else None)
        out = []
        for u in require_low_rank(updates, self.name):
            B, A = (u.B, u.A) if work is None else (u.B.to(work), u.A.to(work))
            out.append(LowRank(B if ctx.left_pinv is None else ctx.left_pinv @ B, A if ctx.right is None else A @ ctx.right))
        return out

    def gram(self, gram: Tensor, ctx: Context) -> Tensor:
        """An input Gram matrix ``G`` (in × in) in this space's input coordinates: ``Qᵀ G Q``."""
        if ctx.right is None:
            return gram
        Q = ctx.right
        return Q.T @ gram.to(Q.dtype) @ Q
