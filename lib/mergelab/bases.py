"""Bases as reusable artifacts: the decompositions behind the knots and core spaces and behind the
SVD banks of TARA-B and AdaRank, computed once per task set and shared through the store.

Computing a basis is the expensive, reusable part of a merge in the knots or core space and of
building an SVD bank; it depends only on the task set's updates and a few options, not on the
method, its hyper-parameters or the benchmark data. So every study over the same adapters reads
the published basis instead of computing it again, and a merge in the knots space and a TARA-B run
share one SVD. The library does not depend on this module: ``project(taskset, space, bases=...)``
and ``adapt(..., bases=...)`` take bases from anywhere; this module is where they meet a store.

=================  =============================================  ==========================================
producer           per matrix module (``<module>::<name>``)        definition
=================  =============================================  ==========================================
``bases.core``     ``s_B`` (d_U), ``V_B`` (k × d_U), ``s_A``      reference bases, 003 Def. 1, Eq. (3):
                   (d_V), ``U_A`` (k × d_V); ``U_B_ref``          ``[B_1 … B_T] = U_B Σ_B V_Bᵀ``,
                   (out × d_U) / ``V_A_ref`` (in × d_V) only      ``[A_1; …; A_T] = U_A Σ_A V_Aᵀ``; the Gram
                   for a side the SVD fallback decomposed         route leaves ``U_B`` / ``V_A`` unformed
``bases.knots``    ``U`` (out × k), ``s`` (k), ``V.<t>`` (k × in)  the shared SVD ``[X_1 … X_T] = U diag(s)
                                                                   [V_1 … V_T]``: KnOTS (Stoica et al.,
                                                                   2025; 003 Fig. 2 middle) with ``X_t = ΔW_t``;
                                                                   TARA-B's basis (001 Eq. 8)
``bases.task_svd`` ``U.<t>``, ``s.<t>``, ``Vh.<t>`` per task       ``X_t = U_t diag(s_t) Vh_t`` (of
                                                                   ``X_t − mean_j X_j`` with ``center``),
                                                                   AdaRank's components (002 Eq. 5)
=================  =============================================  ==========================================

``X_t`` is ``ΔW_t = B_t A_t`` (``space="full"``) or the core matrix ``M_t = (U_B^refᵀ B_t)(A_t V_A^ref)``
(``space="core"``, 003 Eq. 8, in the ``bases.core`` of the same task set, whose key then enters as
``reference``): the SVDs of the core-space banks of TARA-B and AdaRank.

Each kind's format (its version, the options that key it, its tensors) belongs to whoever owns the
decomposition (:func:`stored_format`): a space's :attr:`~mergelab.spaces.Space.stored_basis` (core,
knots), or a bank's :data:`~mergelab.adaptation.bank.DECOMPOSITIONS` entry (task_svd). So a new space
with a stored basis declares it in its own module and this one is unchanged.

Keys: ``store.key("bases.<kind>", stored_format(kind).version, taskset=<TaskSet content hash>, **options)`` with
*only the options that change the basis*: a space's ``basis_options``
(``rank_rtol``; knots also ``naive``), not its ``scope`` or ``variant``, and not any merge
hyper-parameter. ``naive=True`` (form ``[ΔW_1 … ΔW_T]`` and decompose it) is the same SVD in exact
arithmetic but not in floating point (round-off, the sign of each singular pair), and it exists
to measure the paper code's cost; sharing its key would make a merge's result and its
``merge_seconds`` depend on which route happened to publish first. So it is keyed apart.

Artifacts are safetensors (float64, exactly as computed) with attrs ``kind``, ``space``,
``options``, ``modules``, ``compute_time_s`` (wall time of computing every module's basis) and
``peak_memory_mb``; the study adds those to the time and memory of the merge that used them
(``docs/store.md`` §9). Safetensors stores row-major arrays, while LAPACK returns SVD factors
column by column (and the fallback's ``V_B`` is a view ``Vh[:d].T``); the BLAS path of a product, and so its
last bit, depends on that layout. A column-major matrix is therefore written transposed under
``<name>.T`` and read back as a column-major view: a merge from loaded bases is bit-identical to
one computed in-process (``tests/test_bases.py``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from mergelab.adaptation.bank import DECOMPOSITIONS, BankBasis, core_matrices, core_rtol
from mergelab.profiling import measure
from mergelab.spaces import SPACES, CoreSpace, Space, get_space
from mergelab.spaces.base import StoredBasis, require_low_rank
from mergelab.store import Store
from mergelab.store_format import Key
from mergelab.taskset import TaskSet, Update

__all__ = ["Bases", "adaptation_bases", "bases_key", "space_bases", "stored_bases", "stored_format"]

SEP = "::"
TRANSPOSED = ".T"


def stored_format(kind: str) -> StoredBasis:
    """How bases of ``kind`` are stored: the space's of that name (:attr:`~mergelab.spaces.Space.stored_basis`),
    else the bank decomposition's (:data:`~mergelab.adaptation.bank.DECOMPOSITIONS`)."""
    space = SPACES.get(kind)
    if space is not None and space.stored_basis is not None:
        return space.stored_basis
    return DECOMPOSITIONS[kind].stored


@dataclass(frozen=True)
class Bases:
    """One kind of basis for every matrix module of a task set, and what it cost.

    ``seconds`` / ``peak_memory_mb``: recorded when the basis was computed (the same whether it was
    computed now or read back); ``hit``: read from the store.
    """

    kind: str
    key: str
    modules: dict[str, Any] = field(repr=False)
    seconds: float
    peak_memory_mb: float
    hit: bool


def bases_key(store: Store, taskset: TaskSet, kind: str, **options: Any) -> Key:
    """The content key of ``kind``'s bases of ``taskset`` (options not given take the kind's defaults)."""
    spec = stored_format(kind)
    unknown = sorted(set(options) - set(spec.options))
    assert not unknown, f"bases.{kind} is not keyed on {unknown}"
    return store.key(f"bases.{kind}", spec.version, taskset=taskset.content_hash, **{**spec.options, **options})


def _matrix_modules(taskset: TaskSet) -> list[str]:
    first = taskset.tasks[0].modules
    return [m for m in taskset.module_names if len(first[m].shape) == 2]


def _column_major(t: Tensor) -> bool:
    """Whether a matrix is laid out column by column (LAPACK's SVD factors, ``Vhᵀ`` views): products
    with it then call BLAS with the other transpose flag, which can change the last bit."""
    return t.dim() == 2 and t.stride(0) < t.stride(1)


def _encode(modules: Mapping[str, Any], kind: StoredBasis) -> dict[str, Tensor]:
    out = {}
    for module, basis in modules.items():
        for name, t in kind.encode(basis).items():
            if _column_major(t):
                out[f"{module}{SEP}{name}{TRANSPOSED}"] = t.mT  # written row-major, read back as t's layout
            else:
                out[f"{module}{SEP}{name}"] = t
    return out


def _decode(tensors: Mapping[str, Tensor], kind: StoredBasis) -> dict[str, Any]:
    per_module: dict[str, dict[str, Tensor]] = {}
    for full, t in tensors.items():
        module, name = full.rsplit(SEP, 1)
        if name.endswith(TRANSPOSED):
            name, t = name[: -len(TRANSPOSED)], t.mT
        per_module.setdefault(module, {})[name] = t
    return {m: kind.decode(named) for m, named in per_module.items()}


_LOCKS: dict[tuple[str, str], threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock(store: Store, key: str) -> threading.Lock:
    """One lock per (store, key) in this process, so concurrent nodes compute a basis once."""
    with _LOCKS_GUARD:
        return _LOCKS.setdefault((store.url, str(key)), threading.Lock())


def stored_bases(store: Store, taskset: TaskSet, kind: str, compute: Callable[[str, Sequence[Update]], Any],
                 **options: Any) -> Bases:
    """``kind``'s bases of every matrix module: read from the store when published, otherwise
    ``compute(module, updates)`` per module (timed, peak memory measured) and published.

    ``options`` key the artifact and must be what ``compute`` uses; the public helpers below
    (:func:`space_bases`, :func:`adaptation_bases`) keep the two together.
    """
    spec = stored_format(kind)
    key = bases_key(store, taskset, kind, **options)
    with _lock(store, key):
        if store.exists(key):
            attrs = store.info(key).attrs
            return Bases(kind, key, _decode(store.get_tensors(key), spec), float(attrs["compute_time_s"]),
                         float(attrs["peak_memory_mb"]), True)
        run = measure(lambda: {m: compute(m, taskset.updates(m)) for m in _matrix_modules(taskset)})
        attrs = {"kind": kind, "space": options.get("space", "full"), "options": {**spec.options, **options},
                 "modules": len(run.value), "compute_time_s": run.wall_s, "peak_memory_mb": run.peak_bytes / 2**20}
        store.put_tensors(key, _encode(run.value, spec), attrs=attrs)
        return Bases(kind, key, run.value, run.wall_s, run.peak_bytes / 2**20, False)


def space_bases(store: Store, taskset: TaskSet, space: str | Space, **options: Any) -> Bases | None:
    """The bases ``space`` (configured with ``options``) projects ``taskset`` with; ``None`` for the full space.

    ``project(taskset, space, bases=result.modules, **options)`` then builds the projection without
    decomposing anything. Knots: :meth:`~mergelab.spaces.KnotsSpace.basis` (the SVD of
    ``[ΔW_1 … ΔW_T]``, KnOTS, Stoica et al. 2025), shared with TARA-B in the full space; core:
    :meth:`~mergelab.spaces.CoreSpace.basis` (003 Eq. 3), shared with the core-space banks.
    """
    sp = get_space(space, **options)
    if sp.stored_basis is None:
        return None
    return stored_bases(store, taskset, sp.name, lambda _, updates: sp.basis(updates), **sp.basis_key_options())


def adaptation_bases(store: Store, taskset: TaskSet, method: str,
                     hp: Mapping[str, Any]) -> tuple[dict[str, BankBasis], list[Bases]] | None:
    """The decompositions of ``method``'s SVD bank with hyper-parameters ``hp`` (``None`` for a method
    whose bank is the raw factors): ``({module: BankBasis}, the stored bases used)``, to pass as
    ``adapt(..., bases=)``.

    Full space: the kind's function on the updates (TARA-B: the shared SVD, 001 Eq. 8, which is the
    KnOTS space's ``bases.knots``; AdaRank: per-task SVDs, 002 Eq. 5). Core space: ``bases.core``
    (shared with the core space) and the kind's function on the core matrices ``M_t`` (003 Eq. 8),
    truncated as :func:`~mergelab.adaptation.bank.core_bank` does.
    """
    from mergelab.adaptation import ADAPTERS

    entry = ADAPTERS[method]
    if entry.basis is None:
        return None
    kind, options_of = entry.basis
    options, spec = options_of(hp), DECOMPOSITIONS[kind]
    if hp.get("space", "full") == "full":
        svd = stored_bases(store, taskset, kind, lambda _, updates: spec.compute(updates, **options), **options)
        return {m: BankBasis(b) for m, b in svd.modules.items()}, [svd]
    reference = space_bases(store, taskset, CoreSpace())
    assert reference is not None

    def in_core(module: str, updates: Sequence[Update]) -> Any:
        lowrank = require_low_rank(updates, "core")
        return spec.compute(core_matrices(lowrank, reference.modules[module]), rank_rtol=core_rtol(lowrank), **options)

    svd = stored_bases(store, taskset, kind, in_core, space="core", reference=str(reference.key), **options)
    return {m: BankBasis(b, reference.modules[m]) for m, b in svd.modules.items()}, [reference, svd]
