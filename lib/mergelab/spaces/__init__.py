"""Merge spaces: where a merge method sees the tasks.

``SPACES[name]`` is a configured space; ``space.project(updates) -> (matrices, ctx)`` maps one
module's per-task updates to same-shape matrices and ``space.reconstruct(merged, ctx)`` maps a
merged matrix back to an :data:`~mergelab.taskset.Update`. ``space.configure(**options)``
returns a copy with other options (``SPACES["knots"].configure(naive=True)``).

========  ==========================  ===========================================
name      representation of task t    module
========  ==========================  ===========================================
full      ``B_t A_t``                 :mod:`mergelab.spaces.full`
knots     blocks of Vᵀ from the SVD   :mod:`mergelab.spaces.knots`
          of ``[ΔW_1 … ΔW_T]``
core      ``(U_Bᵀ B_t)(A_t V_A)``     :mod:`mergelab.spaces.core`
========  ==========================  ===========================================

A new space is a frozen dataclass subclassing :class:`Space` that implements ``project``
(returning a :class:`Context` with its ``P``, ``P⁺``, ``Q`` maps) plus one line below (or
``SPACES.register(name, space)``).
"""

from __future__ import annotations

from mergelab.registry import Registry
from mergelab.spaces.base import Context, Space
from mergelab.spaces.core import CoreSpace
from mergelab.spaces.full import FullSpace
from mergelab.spaces.knots import KnotsSpace

__all__ = ["SPACES", "Context", "CoreSpace", "FullSpace", "KnotsSpace", "Space", "get_space"]

SPACES: Registry[Space] = Registry("space", {
    "full": FullSpace(),
    "knots": KnotsSpace(),
    "core": CoreSpace(),
})


def get_space(space: str | Space, **options) -> Space:
    """A space by name (or an instance), configured with ``options``; InputError if unknown."""
    if isinstance(space, Space):
        return space.configure(**options) if options else space
    return SPACES[space].configure(**options) if options else SPACES[space]
