"""The registry of analyses: what each one computes, from what, at which code version.

``ANALYSES[name]`` is the only list of analyses: the study spec validates ``analyses:`` against
it, the ``analyze`` flow runs its entries and keys their Datasets in the store as
``store.key(entry.producer, entry.version, **inputs)``. Bump an entry's ``version`` whenever its
output changes for the same inputs, so stale artifacts are never reused.

``needs`` says what the function takes first: ``"taskset"`` (weight-only statistics),
``"merged"`` (called as ``fn(merged=…, **params)`` on each selected merge of the sweep, plus
``taskset=…`` when the function has that parameter; the study stacks the results along
``method`` and ``space``) or ``"bench"`` (the model and task
data, for gradients and features).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import xarray as xr

from mergelab.analysis import anisotropy, components, core_space, coverage, geometry, interference, proxies, spectra

__all__ = ["ANALYSES", "Analysis"]


@dataclass(frozen=True)
class Analysis:
    fn: Callable[..., xr.Dataset]
    version: str
    needs: Literal["taskset", "merged", "bench"] = "taskset"
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def producer(self) -> str:
        """The producer name in store keys: ``<module>.<function>`` (e.g. ``geometry.norms``)."""
        return f"{self.fn.__module__.rsplit('.', 1)[-1]}.{self.fn.__name__}"


ANALYSES: dict[str, Analysis] = {
    "norms": Analysis(geometry.norms, "2"),  # 2: packed q/k/v projections split into views
    "cosine": Analysis(geometry.cosine_similarity, "1"),
    "lambda_similarity": Analysis(geometry.lambda_similarity, "1"),
    "coverage": Analysis(coverage.subspace_coverage, "1"),
    "spectra": Analysis(spectra.task_spectra, "1"),
    "sar": Analysis(spectra.pairwise_sar, "1"),
    "truncation": Analysis(core_space.truncation_curves, "1"),
    "sar_spaces": Analysis(core_space.sar_by_space, "1"),
    "reference_bases": Analysis(core_space.reference_basis_ablation, "1"),
    "merged_rank_spaces": Analysis(core_space.merged_rank_grid, "2"),  # 2: dimension merge_method
    "merged_similarity": Analysis(geometry.merged_similarity, "2", needs="merged"),  # 2: stacked along merge_method
    "merged_rank": Analysis(spectra.merged_rank, "2", needs="merged"),
    "anisotropy": Analysis(anisotropy.jacobian_anisotropy, "2", needs="bench"),  # 2: labelled task loss by default
    "components": Analysis(components.component_loss_changes, "2", needs="bench"),
    "tas_sweep": Analysis(proxies.tas_sweep, "1", needs="bench"),
    "embedding_interference": Analysis(interference.merged_embedding_interference, "1", needs="bench"),
}
