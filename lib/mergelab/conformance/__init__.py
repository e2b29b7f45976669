"""Conformance suites: the checks every registered entry of a registry passes, as scikit-learn's
``check_estimator`` / ``parametrize_with_checks`` do for estimators.

``checks_for_method(name)`` (``_space``, ``_adaptive``, ``_bench``) yields the named :class:`Check` s of
one entry, :func:`registered_checks` those of every entry registered now (``@parametrize_with_checks()``
checks a new registration with no test edit). A check runs on a tiny seeded synthetic task set (a
bench kind's on its example, loaded once per process) and raises :class:`ConformanceError`.
One module per registry: :mod:`~mergelab.conformance.methods`, :mod:`~mergelab.conformance.spaces`,
:mod:`~mergelab.conformance.adaptive`, :mod:`~mergelab.conformance.benches` (shared: :mod:`~mergelab.conformance.base`).

What each suite checks, and which declarations of an entry choose checks:

- merge methods: finite full-space shapes and dtype; inputs (the tasks' tensors, side inputs) never
  mutated; the same seed gives the same merge, another seed another where ``MergeMethod.stochastic``;
  one task gives that task where ``identity`` is declared; a ``linear`` merge is the same in every
  lossless space;
- spaces: project / reconstruct gives each task and its factors back where ``Space.lossless``;
  projecting mutates nothing and repeats; every method run through it returns full-space shapes;
- adaptive methods: a few steps on a tiny model give finite coefficients, one per bank direction,
  and a merged update of the tasks' shapes in each of ``Adapter.spaces``; the same seeded batches
  give the same merge; neither the task set nor the base weights are mutated;
- bench kinds: the default settings validate, an unknown or another kind's setting is refused;
  ``BenchKind.example`` loads a Bench whose adapters fit its backbone's base state and whose layout
  knows the adapted projections.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from mergelab.conformance.adaptive import checks_for_adaptive
from mergelab.conformance.base import Check, ConformanceError
from mergelab.conformance.benches import checks_for_bench, example_bench
from mergelab.conformance.methods import checks_for_method
from mergelab.conformance.spaces import checks_for_space

__all__ = ["SUITES", "Check", "ConformanceError", "checks_for_adaptive", "checks_for_bench", "checks_for_method", "checks_for_space",
           "example_bench", "parametrize_with_checks", "registered_checks"]


# Every registry --------------------------------------------------------------------------------------


#: registry -> the checks of one of its entries.
SUITES: dict[str, Callable[[str], Iterator[Check]]] = {"method": checks_for_method, "space": checks_for_space,
                                                       "adaptive": checks_for_adaptive, "bench": checks_for_bench}


def registered_checks(registries: Sequence[str] = tuple(SUITES)) -> list[Check]:
    """Every check of every entry registered now in ``registries`` (``"method"``, ``"space"``,
    ``"adaptive"``, ``"bench"``)."""
    from mergelab.adaptation import ADAPTERS
    from mergelab.bench import BENCHES
    from mergelab.merging import METHODS
    from mergelab.spaces import SPACES

    found = {"method": METHODS, "space": SPACES, "adaptive": ADAPTERS, "bench": BENCHES}
    return [check for registry in registries for entry in found[registry] for check in SUITES[registry](entry)]


def parametrize_with_checks(registries: Sequence[str] = tuple(SUITES)):
    """A pytest ``parametrize`` decorator over :func:`registered_checks` (argument ``check``, ids
    ``registry:entry:check``), as scikit-learn's: ``@parametrize_with_checks() def test_(check): check()``."""
    import pytest

    checks = registered_checks(registries)
    return pytest.mark.parametrize("check", checks, ids=[str(c) for c in checks])
