"""The registry of adaptation studies: the preference studies of 001 and the AdaRank ablation of 002.

``ADAPTATION_STUDIES[name]`` is the only list of them. A study YAML runs any of them from its
``adaptation_studies:`` section (``name: {settings}``); the study flow publishes each Dataset under
``studies/<study>/<ref>``, which notebooks 50 and 60 read. Settings are the study function's keyword
arguments plus the shared schedule (:data:`SCHEDULE`: ``iters``, ``batch_size``, ``lr``) and
``tasks`` (a subset of the benchmark's tasks, in order). Bump an entry's ``version`` whenever its
output changes for the same inputs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import xarray as xr

from mergelab.adaptation.preferences import pareto_sweep, sensitivity_cloud, stch_alpha_ablation
from mergelab.adaptation.studies import AdaptationSetting, adarank_ablation
from mergelab.errors import InputError

if TYPE_CHECKING:
    from mergelab.bench import Bench

__all__ = ["ADAPTATION_STUDIES", "SCHEDULE", "AdaptationStudy", "check_settings", "run_study"]

#: Settings that configure the :class:`AdaptationSetting` rather than the study function.
SCHEDULE = ("iters", "batch_size", "lr", "tasks")


@dataclass(frozen=True)
class AdaptationStudy:
    """A study function ``fn(setting, **settings) -> Dataset``, its store ref and code version."""

    fn: Callable[..., xr.Dataset]
    ref: str
    version: str

    @property
    def producer(self) -> str:
        return f"adaptation.{self.fn.__name__}"

    def allowed(self) -> list[str] | None:
        """The keyword settings ``fn`` takes (``None``: any, it forwards ``**hp``)."""
        params = list(inspect.signature(self.fn).parameters.values())[1:]
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return None
        return [p.name for p in params if p.name != "dataset"]


#: Versions 2 of the preference studies: the STCH anchors no longer shift TARA's batches.
ADAPTATION_STUDIES: dict[str, AdaptationStudy] = {
    "pareto": AdaptationStudy(pareto_sweep, "preferences/pareto", "3"),  # 3: dimension merge_method
    "cloud": AdaptationStudy(sensitivity_cloud, "preferences/cloud", "3"),
    "stch_alpha": AdaptationStudy(stch_alpha_ablation, "preferences/stch_alpha", "3"),
    "adarank_ablation": AdaptationStudy(adarank_ablation, "ablations/adarank", "1"),
}


def check_settings(name: str, settings: Mapping[str, Any]) -> None:
    """Raise :class:`InputError` naming the study or setting that does not exist."""
    if name not in ADAPTATION_STUDIES:
        raise InputError(f"unknown adaptation study {name!r}; allowed: {', '.join(ADAPTATION_STUDIES)}")
    allowed = ADAPTATION_STUDIES[name].allowed()
    if allowed is None:
        return
    unknown = [k for k in settings if k not in allowed and k not in SCHEDULE]
    if unknown:
        raise InputError(f"{name}: unknown setting {unknown[0]!r}; allowed: {', '.join([*SCHEDULE, *allowed])}")


def run_study(name: str, bench: Bench, settings: Mapping[str, Any], *, seed: int, dataset: str) -> xr.Dataset:
    """Run study ``name`` on ``bench`` (its ``tasks`` subset, the schedule in ``settings``, ``seed``)."""
    check_settings(name, settings)
    schedule = {k: settings[k] for k in ("iters", "batch_size", "lr") if k in settings}
    setting = AdaptationSetting.from_bench(bench, settings.get("tasks"), seed=seed, **schedule)
    own = {k: v for k, v in settings.items() if k not in SCHEDULE}
    return ADAPTATION_STUDIES[name].fn(setting, dataset=dataset, **own)
