"""What an analysis setting may be: ``Annotated`` types that a study checks when it loads
(:func:`mergelab.params.check_setting`), so a study with a bad setting is refused before any node runs
instead of failing, or silently computing nonsense, inside its analysis.

An analysis function annotates its keyword-only settings with these (or with its own ``Annotated``
rule); the annotations change nothing when the function is called from Python.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Literal

from mergelab.adaptive_spec import MAX_BATCH
from mergelab.merging.methods import METHODS
from mergelab.params import Among, Interval
from mergelab.spaces import SPACES

__all__ = ["BatchCount", "BatchSize", "MethodName", "MethodNames", "RelativeTolerance", "Scaling", "Seed", "Share",
           "SpaceName", "SpaceNames", "Split"]

#: A share of spectral energy or of singular values kept, in (0, 1].
Share = Annotated[float, Interval(0.0, 1.0, low_open=True)]
#: A relative tolerance for a numerical rank, in (0, 1); ``None`` takes the default.
RelativeTolerance = Annotated[float | None, Interval(0.0, 1.0, low_open=True, high_open=True)]
#: A task-arithmetic scaling λ, finite (the range of an adaptive method's starting coefficient).
Scaling = Annotated[float, Interval(-1000.0, 1000.0)]
#: Examples per batch (at most an adaptive run's batch).
BatchSize = Annotated[int, Interval(1, MAX_BATCH)]
#: How many batches, at least one; ``None``: the whole split.
BatchCount = Annotated[int | None, Interval(1, math.inf)]
#: A seed of a random choice.
Seed = Annotated[int, Interval(0, 2**63 - 1)]
#: A registered merge method or composition (``tsv+iso_c``).
MethodName = Annotated[str, Among(METHODS, "merge method")]
MethodNames = Annotated[Sequence[str], Among(METHODS, "merge method")]
#: A registered merging space.
SpaceName = Annotated[str, Among(SPACES, "space")]
SpaceNames = Annotated[Sequence[str], Among(SPACES, "space")]
#: An evaluation split of a bench's tasks.
Split = Literal["val", "test"]
