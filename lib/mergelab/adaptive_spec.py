"""The spec of one adaptive (test-time adaptation) run of a study, as its ``adaptive:`` section lists them.

:class:`AdaptiveSpec` names a method of :data:`mergelab.adaptation.ADAPTERS` and its settings (steps, learning
rate, batch, objective, scalarization, optimizer, starting grid); :mod:`mergelab.config` holds the whole study.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from mergelab.errors import InputError
from mergelab.strict import Float, Int, Strict, safe_name

if TYPE_CHECKING:
    from mergelab.adaptation.loop import Schedule

__all__ = ["MAX_BATCH", "MAX_ITERS", "AdaptiveSpec", "check_labels_allowed"]

#: Most steps of one adaptive run (the papers take 250 to 500).
MAX_ITERS = 100_000
#: Most unlabeled val images per task in one step (a step reads at most the task's whole val split).
MAX_BATCH = 65_536


class AdaptiveSpec(Strict):
    """A test-time adaptation method of :data:`mergelab.adaptation.ADAPTERS` and its settings.

    ``objective``, ``scalarization``, ``optimizer``: ``None`` takes the method's paper setting
    (Adam for AdaMerging and AdaRank, AdamW for TARA). ``start_grid``: values of starting
    hyper-parameters chosen on val by the study's selection rule before the first step (default: the
    method's own, e.g. AdaRank-CART's λ over 0.1 … 3.0 as 002 App. A; ``{}`` in the registry means none).
    """

    method: str
    iters: Int = 250
    lr: Float = 1e-3
    batch_size: Int = 16
    objective: Literal["entropy", "tas", "labels"] | None = None
    scalarization: Literal["sum", "stch", "stch_signed"] | None = None
    optimizer: Literal["adam", "adamw"] | None = None
    alpha: Float = 1.0
    preference: list[Float] | None = None
    hp: dict[str, Any] = Field(default_factory=dict)
    start_grid: dict[str, list[Float]] | None = None
    label: str | None = None

    @field_validator("method")
    @classmethod
    def _known(cls, method: str) -> str:
        from mergelab.adaptation import ADAPTERS

        ADAPTERS.require(method)
        return method

    @field_validator("label")
    @classmethod
    def _safe_label(cls, label: str | None) -> str | None:
        return None if label is None else safe_name(label, "adaptive label")

    @model_validator(mode="after")
    def _valid_settings(self) -> AdaptiveSpec:
        from mergelab.adaptation import ADAPTERS

        if not 1 <= self.iters <= MAX_ITERS:
            raise ValueError(f"{self.name}: iters={self.iters} must be at least 1 and at most {MAX_ITERS}")
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise ValueError(f"{self.name}: batch_size={self.batch_size} must be at least 1 and at most {MAX_BATCH} "
                             "(a step reads at most a task's whole val split)")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"{self.name}: lr={self.lr} must be a positive number")
        if self.preference is not None:  # its length is checked against the merged tasks (StudySpec._fit_the_tasks)
            from mergelab.adaptation.objectives import validate_preference

            validate_preference(self.preference, len(self.preference))
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"{self.name}: alpha={self.alpha} (the STCH smoothing, 001 Eq. 10: Ψ = α log Σ exp(ρ_t f_t / α)) "
                             "must be a positive number")
        adapter = ADAPTERS[self.method]
        who = self.method if self.name == self.method else f"{self.name} ({self.method})"
        adapter.check(self.hp, who)
        for key, values in (self.start_grid or {}).items():
            for value in values:
                adapter.check({key: value}, who)
        empty = [k for k, values in (self.start_grid or {}).items() if not values]
        if empty:
            raise ValueError(f"{self.name}: start_grid {empty[0]!r} lists no value")
        return self

    @property
    def name(self) -> str:
        """The label of this run in the results (``method`` unless ``label`` is given)."""
        return self.label or self.method

    @property
    def schedule(self) -> Schedule:
        """How the run steps, as one value (:class:`~mergelab.adaptation.loop.Schedule`)."""
        from mergelab.adaptation.loop import Schedule

        return Schedule(iters=self.iters, lr=self.lr, batch_size=self.batch_size, objective=self.objective,
                        scalarization=self.scalarization, optimizer=self.optimizer, alpha=self.alpha,
                        preference=None if self.preference is None else tuple(self.preference))


def check_labels_allowed(adaptive: Iterable[AdaptiveSpec], allow_labels: bool) -> None:
    """Objective ``labels`` reads validation labels: only where a study sets ``allow_labels`` (``mergelab adapt
    --allow-labels``). An InputError (a ``ValueError``, so a study's validator reports it as its own) otherwise."""
    if not allow_labels and any(a.objective == "labels" for a in adaptive):
        raise InputError("objective 'labels' uses validation labels; set allow_labels: true (mergelab adapt: --allow-labels) to allow it")
