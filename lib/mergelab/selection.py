"""Selection rules: how a study (and ``mergelab merge --select``) chooses one configuration of each
method × space on the validation split (the test split never selects).

``SELECTION_RULES[name]`` is the only list of rules: the study spec validates ``selection:``
against it, the results node applies it (:func:`select`), the evaluation computes the metric it
reads (``tas`` needs the task alignment score of every merge), and ``--select`` offers its names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mergelab.registry import Registry

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["SELECTION_RULES", "SelectionRule", "select"]


@dataclass(frozen=True)
class SelectionRule:
    """The validation metric of the results Dataset a rule reads, and whether larger is better."""

    metric: str
    higher_is_better: bool
    description: str


SELECTION_RULES: Registry[SelectionRule] = Registry("selection rule", {
    "val": SelectionRule("val_norm_acc", True, "best mean normalised val accuracy (001 App. C.3, 003 App. D.2)"),
    "tas": SelectionRule("tas", False, "lowest mean task alignment score on unlabeled val images (004 Eq. 2)"),
})


def select(ds: xr.Dataset, rule: str, names: Sequence[str]) -> xr.DataArray:
    """Per method × space × seed of a results Dataset, the configuration ``rule`` chooses from the
    mean over ``names`` of its metric (NaN never selected)."""
    import numpy as np
    import xarray as xr

    spec = SELECTION_RULES[rule]
    best = "max" if spec.higher_is_better else "min"
    criterion = ds["score"].sel(task=list(names), metric=spec.metric).mean("task")
    filled = criterion.fillna(-np.inf if spec.higher_is_better else np.inf)
    chosen = filled.argmax("config") if spec.higher_is_better else filled.argmin("config")
    selected = xr.zeros_like(ds["merge_seconds"], dtype=bool)
    for i in range(len(ds.config)):
        selected[{"config": i}] = (chosen == i) & criterion.isel(config=i).notnull()
    return selected.assign_attrs(rule=rule, criterion=f"{best} mean {spec.metric} over tasks")
