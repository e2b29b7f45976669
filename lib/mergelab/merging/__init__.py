"""Merge methods: ``METHODS`` (:mod:`mergelab.merging.methods`), ``merge`` and ``project``.

Each method is one small pure function of the per-task tensors (plus hyper-parameters) in
the family module that defines it (:mod:`~mergelab.merging.arithmetic`, :mod:`~mergelab.merging.sparsify`,
:mod:`~mergelab.merging.spectral`, …); ``METHODS`` is the only place that enumerates them, one line each
(:mod:`mergelab.merging.methods` says how to add one). ``merge(taskset, method, space, **hp)`` runs any
entry (or ``a+b`` composition) in any space (:mod:`mergelab.merging.driver`); ``project(taskset, space)``
projects once for many merges (``merge(projection, method, **hp)``).
"""

from __future__ import annotations

from mergelab.merging.driver import Projection, derive_seed, merge, merge_modules, project
from mergelab.merging.methods import METHODS
from mergelab.merging.registry import Composition, MergeMethod
from mergelab.merging.regmean import collect_input_grams

__all__ = ["METHODS", "Composition", "MergeMethod", "Projection", "collect_input_grams", "derive_seed", "merge", "merge_modules",
           "project"]
