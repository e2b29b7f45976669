"""The accuracy columns of 003's Core Space analyses: truncated merges (Fig. 4) and reference bases (Tab. 5).

:mod:`mergelab.analysis.core_space` measures both from weights alone (what a truncation removes,
how far a basis is from the updates); 003 plots the merged models' accuracy. These run the model
through a :class:`~mergelab.bench.BenchSession` and are registered in
:data:`mergelab.experiments.registry.ANALYSES` with ``needs="bench"``:

* :func:`truncation_accuracy` — 003 Sec. 5.2 "Truncation", Fig. 4: the merge (Task Arithmetic in
  the paper) with the fraction ``p`` of least significant singular values of the merged matrix
  set to zero in full vs Core space (:func:`~mergelab.analysis.core_space.truncated_merge`),
  evaluated per task;
* :func:`reference_basis_accuracy` — 003 Sec. 5.2 "Choice of the reference basis", Tab. 5's
  accuracy column: a method (TIES in the paper) merged in the Core space of each candidate
  reference basis (:func:`~mergelab.analysis.basis_ablation.candidate_bases`) and evaluated.

Accuracy is top-1 on ``split`` (``test`` by default: these redraw the papers' figures and select
nothing), normalised by each task's fine-tuned model on the same split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import numpy as np
import xarray as xr

from mergelab.analysis.basis_ablation import BASES, candidate_bases
from mergelab.analysis.core_space import TRUNCATION_SPACES, truncated_merge
from mergelab.analysis.factored import annotated, dataset_attrs
from mergelab.analysis.settings import MethodName, Seed, SpaceNames, Split
from mergelab.bench import BenchSession
from mergelab.bench.session import Params
from mergelab.merging import derive_seed, merge, project
from mergelab.params import Interval
from mergelab.spaces.base import require_low_rank

__all__ = ["TRUNCATION_ACCURACY_FRACTIONS", "reference_basis_accuracy", "truncation_accuracy"]

#: The truncated fractions ``p`` evaluated for 003 Fig. 4 (every tenth; an evaluation each).
TRUNCATION_ACCURACY_FRACTIONS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(10))


def _accuracies(session: BenchSession, params: Params | None, split: str) -> np.ndarray:
    """Top-1 accuracy per task of the session's task set (in its order) on ``split``."""
    return np.array([session.accuracy(name, split, params)[0] for name in session.taskset.names])


def _finetuned(session: BenchSession, split: str) -> np.ndarray:
    return np.array([session.accuracy(name, split, session.finetuned(name))[0] for name in session.taskset.names])


def _scored(values: np.ndarray, finetuned: np.ndarray, dims: tuple[str, ...], split: str) -> dict[str, xr.DataArray]:
    """``accuracy``, ``normalized_accuracy`` (both with ``task`` last) and its mean over tasks."""
    normalized = values / finetuned
    return {
        "accuracy": annotated((*dims, "task"), values, f"top-1 accuracy on {split}"),
        "normalized_accuracy": annotated((*dims, "task"), normalized, "accuracy / fine-tuned accuracy"),
        "normalized_accuracy_mean": annotated(dims, normalized.mean(axis=-1), "normalised accuracy averaged over tasks"),
        "finetuned_accuracy": annotated(("task",), finetuned, f"fine-tuned model's top-1 accuracy on {split}"),
    }


def truncation_accuracy(session: BenchSession, *, method: MethodName = "task_arithmetic", spaces: SpaceNames = TRUNCATION_SPACES,
                        fractions: Annotated[Sequence[float], Interval(0, 1)] = TRUNCATION_ACCURACY_FRACTIONS,
                        hyper_parameters: Mapping[str, Any] | None = None, split: Split = "test") -> xr.Dataset:
    """003 Fig. 4: accuracy of the merge truncated by the fraction ``p`` in each space.

    For every space and ``p``: :func:`~mergelab.analysis.core_space.truncated_merge` (``⌊(1 − p)·dim(Σ)⌋``
    components of each merged matrix kept in the space's coordinates) evaluated on every task. Dims
    ``space``, ``fraction``, ``task``; variables ``accuracy``, ``normalized_accuracy``,
    ``normalized_accuracy_mean`` (the curve of Fig. 4) and ``finetuned_accuracy``.
    """
    taskset, fractions = session.taskset, [float(p) for p in fractions]
    values = np.array([[_accuracies(session, session.weights(truncated_merge(taskset, p, method=method, space=space,
                                                                           hyper_parameters=hyper_parameters)), split)
                        for p in fractions] for space in spaces])
    return xr.Dataset(
        _scored(values, _finetuned(session, split), ("space", "fraction"), split),
        coords={"space": np.array(list(spaces), dtype=object), "fraction": np.array(fractions),
                "task": np.array(taskset.names, dtype=object)},
        attrs=dataset_attrs(taskset, title="Accuracy of the truncated merge, full vs Core space", paper="003 Sec. 5.2, Fig. 4",
                            method=method, hyper_parameters=dict(hyper_parameters or {}), split=split),
    )


def reference_basis_accuracy(session: BenchSession, *, method: MethodName = "ties", hyper_parameters: Mapping[str, Any] | None = None,
                             bases: Sequence[Literal["first_task", "random_orthonormal", "concatenation"]] = BASES, seed: Seed = 0,
                             split: Split = "test") -> xr.Dataset:
    """003 Tab. 5's accuracy column: ``method`` merged in the Core space of each reference basis.

    Every matrix module's candidate bases come from
    :func:`~mergelab.analysis.basis_ablation.candidate_bases` (the random one drawn with
    ``derive_seed(seed, module)``, as in :func:`~mergelab.analysis.basis_ablation.reference_basis_ablation`,
    so the two Datasets describe the same bases); the task set is projected with them
    (:func:`mergelab.merging.project`), merged and evaluated. Only the concatenation of 003 Eq. (3)
    is lossless. Dims ``basis``, ``task``; variables as :func:`truncation_accuracy`'s.
    """
    taskset = session.taskset
    modules = [m for m in taskset.module_names if len(taskset.updates(m)[0].shape) == 2]
    candidates = {m: candidate_bases(require_low_rank(taskset.updates(m), "core"), seed=derive_seed(seed, m)) for m in modules}
    values = np.array([_accuracies(session, session.weights(merge(project(taskset, "core", bases={m: c[basis] for m, c in candidates.items()}),
                                                                  method, **dict(hyper_parameters or {}))), split)
                       for basis in bases])
    return xr.Dataset(
        _scored(values, _finetuned(session, split), ("basis",), split),
        coords={"basis": np.array(list(bases), dtype=object), "task": np.array(taskset.names, dtype=object)},
        attrs=dataset_attrs(taskset, title="Accuracy of a Core Space merge per reference basis", paper="003 Sec. 5.2, Tab. 5",
                            method=method, hyper_parameters=dict(hyper_parameters or {}), split=split, seed=seed),
    )
