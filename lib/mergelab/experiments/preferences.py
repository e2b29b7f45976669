"""Preference studies of TARA (001 Sec. 4 "Two-Task Trade-Off Analysis" and "Preference Sensitivity
Analysis", Figs. 3, 4, 10, 11; 000 Fig. 10, the STCH α ablation).

Every study adapts on unlabeled **validation** batches (:class:`~mergelab.experiments.adaptation_studies.AdaptationSetting`)
and reports top-1 accuracy on the requested ``splits`` (``val`` and ``test`` by default: the test
split is evaluated for reporting only). TARA optimises the smooth Tchebycheff scalarisation of the
per-task entropies (001 Eq. 10, anchors ``z_i`` = entropy with only task i's adapter); AdaMerging, the
adaptive baseline, optimises the preference-weighted sum ``Σ_i ρ_i f_i`` of the same entropies (001
Sec. 4: "For AdaMerging we use a weighted sum of per-task pseudo-objectives"). Each method's
scalarisation is its registry default (``ADAPTERS[m].scalarization``) unless ``hyper_parameters[m]``
overrides it.

Datasets (dims):

* :func:`pareto_sweep` — ``weight(preference, task)``, ``accuracy(method, preference, task, split)``,
  ``final_loss(method, preference, task)``, ``baseline_accuracy(baseline, task, split)``.
* :func:`sensitivity_cloud` — ``weight(preference, task)``, ``accuracy(method, preference, focal, split)``,
  ``mean(method, split, focal)``, ``covariance(method, split, focal, focal_other)``,
  ``ellipse_width / ellipse_height / ellipse_angle(method, split)``.
* :func:`stch_alpha_ablation` — ``accuracy(method, alpha, task, split)``, ``finetuned_accuracy(task, split)``,
  ``normalized_accuracy(method, alpha, task, split)``, ``average_normalized_accuracy(method, alpha, split)``.

Each study takes the adaptation setting, then one parameter per option a study's entry may give, read from its
signature by :mod:`mergelab.experiments.registry`: why each takes more than six parameters.

The micro benchmark's numbers are its own, never the papers'.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import numpy as np
import xarray as xr
from pydantic import Field

from mergelab.adaptation import ADAPTERS
from mergelab.experiments.adaptation_studies import AdaptationSetting, Splits, check_splits, final_losses
from mergelab.errors import InputError
from mergelab.merging import merge
from mergelab.params import Among, Interval, PerTask, Tasks

__all__ = ["MAX_PREFERENCES", "PARETO_BASELINES", "covariance_ellipse", "pareto_preferences", "pareto_sweep", "sample_preferences",
           "sensitivity_cloud", "stch_alpha_ablation"]

DEFAULT_METHODS = ("tara_b", "adamerging")
#: Preferences one study sweeps, each one adaptive run per method: 001's figures draw 11 to 30; a study asking
#: for more than this is a typo (issue 30 probe 552: 10^9 failed with a traceback after the references ran).
MAX_PREFERENCES = 1_000
#: ``n_preferences`` of a Pareto sweep or a sensitivity cloud.
NPreferences = Annotated[int, Interval(2, MAX_PREFERENCES)]
#: The STCH smoothings α (001 Eq. 10) an ablation sweeps: at least one, each positive (issue 30 probe 560-563:
#: refused only after the references ran, α = 0 never finished).
Alphas = Annotated[Sequence[float], Interval(0, low_open=True), Field(min_length=1)]
#: The adaptive methods a preference study runs (a study's ``methods:`` is checked against it when it loads).
Methods = Annotated[Sequence[str], Among(ADAPTERS, "adaptive method")]


def _methods(methods: Sequence[str], hyper_parameters: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    unknown = [m for m in methods if m not in ADAPTERS]
    if unknown or not methods:
        raise InputError(f"unknown adaptive method(s) {unknown or methods}; choose from {', '.join(ADAPTERS)}")
    hyper_parameters = dict(hyper_parameters or {})
    extra = sorted(set(hyper_parameters) - set(methods))
    if extra:
        raise InputError(f"hyper_parameters given for {extra}, which are not among methods {list(methods)}")
    return {m: dict(hyper_parameters.get(m, {})) for m in methods}


def _scalarizations(methods: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    return {m: hp.get("scalarization", ADAPTERS[m].scalarization) for m, hp in methods.items()}


def _finish(ds: xr.Dataset, dataset: str | None) -> xr.Dataset:
    if dataset:
        ds.attrs["dataset"] = dataset
    return ds


def pareto_preferences(n: int) -> np.ndarray:
    """``(n, 2)`` preferences ``ρ = (w, 1 − w)`` with ``w`` evenly spaced on ``[0, 1]`` (both ends included)."""
    if n < 2:
        raise InputError(f"a Pareto sweep needs at least 2 preferences, got {n}")
    w = np.linspace(0.0, 1.0, n)
    return np.stack([w, 1.0 - w], axis=1)


#: The static mergers 001 Figs. 3 and 10 plot as baseline points besides TA: KnOTS-TIES and LoRA-LEGO.
PARETO_BASELINES: tuple[tuple[str, str], ...] = (("ties", "knots"), ("lora_lego", "full"))


def pareto_sweep(setting: AdaptationSetting, *, pair: Annotated[Sequence[str] | None, Tasks(count=2)] = None,
                 n_preferences: NPreferences = 30,
                 methods: Methods = DEFAULT_METHODS, hyper_parameters: Mapping[str, Mapping[str, Any]] | None = None,
                 ta_lambda: float = 0.3, baselines: Sequence[Sequence[str]] = PARETO_BASELINES,
                 splits: Splits = ("val", "test"), dataset: str | None = None) -> xr.Dataset:
    """Two-task Pareto sweep (001 Fig. 3, Fig. 10): ``n_preferences`` preferences ``ρ = (w, 1 − w)``,
    one adaptation per method and preference, per-task accuracy of each merged model.

    Baseline operating points stored alongside (``baseline`` dim): the zero-shot base model, task
    arithmetic with ``λ = ta_lambda``, every ``(method, space)`` of ``baselines`` with its registry
    defaults (named ``method@space``; by default KnOTS-TIES and LoRA-LEGO, as 001 plots) and each
    task's fine-tuned model (``finetuned_<task>``), evaluated on both tasks. ``pair`` picks the two
    tasks from a larger setting.
    It takes 9 parameters: the adaptation setting and one per option a study may give (module docstring)."""
    setting = setting if pair is None else setting.subset(pair)
    if len(setting.names) != 2:
        raise InputError(f"a Pareto sweep merges two tasks, the setting has {len(setting.names)}; pass pair=(A, B)")
    splits = check_splits(splits)
    methods_hp = _methods(methods, hyper_parameters)
    rho = pareto_preferences(n_preferences)
    acc = np.zeros((len(methods_hp), n_preferences, 2, len(splits)))
    loss = np.zeros((len(methods_hp), n_preferences, 2))
    for i, (method, hp) in enumerate(methods_hp.items()):
        for p, preference in enumerate(rho):
            result = setting.adapt(method, preference=preference.tolist(), **hp)
            acc[i, p] = setting.accuracy(setting.params(result.merged), splits)
            loss[i, p] = final_losses(result)
    static = {f"{method}@{space}": setting.params(merge(setting.taskset, method, space)) for method, space in baselines}
    baselines = {"zeroshot": None, "task_arithmetic": setting.task_arithmetic(ta_lambda), **static,
                 **{f"finetuned_{name}": setting.task_params(t) for t, name in enumerate(setting.names)}}
    base_acc = np.stack([setting.accuracy(params, splits) for params in baselines.values()])
    ds = xr.Dataset(
        {"weight": (("preference", "task"), rho),
         "accuracy": (("merge_method", "preference", "task", "split"), acc),
         "final_loss": (("merge_method", "preference", "task"), loss),
         "baseline_accuracy": (("baseline", "task", "split"), base_acc)},
        coords={"merge_method": list(methods_hp), "preference": np.arange(n_preferences), "task": setting.names,
                "split": splits, "baseline": list(baselines)},
        attrs=setting.attrs(study="pareto", paper="001 Fig. 3, Fig. 10", ta_lambda=ta_lambda,
                            scalarization=_scalarizations(methods_hp), hyper_parameters=methods_hp),
    )
    return _finish(ds, dataset)


def sample_preferences(n_tasks: int, focal: Sequence[int], n: int = 30, focal_weight: float = 0.125,
                       concentration: float = 1.0, seed: int = 0) -> np.ndarray:
    """``(n, n_tasks)`` preferences with each ``focal`` task fixed at ``focal_weight`` and the remaining
    mass ``1 − len(focal)·focal_weight`` split over the other tasks by a symmetric Dirichlet
    (``concentration`` 1: uniform on that face of the simplex). 001 Sec. 4 / App. "Robustness under
    Preference Perturbations": two focal tasks at 0.125, the other six sum to 0.75.
    """
    focal = list(focal)
    rest = [t for t in range(n_tasks) if t not in focal]
    remaining = 1.0 - focal_weight * len(focal)
    if len(set(focal)) != len(focal) or not rest or remaining < 0 or focal_weight < 0:
        raise InputError(f"focal tasks {focal} at {focal_weight} each leave {remaining:.3g} for {len(rest)} other task(s); "
                         "need distinct focal tasks, at least one other task and weights summing to at most 1")
    rng = np.random.default_rng(seed)
    out = np.zeros((n, n_tasks))
    out[:, focal] = focal_weight
    out[:, rest] = remaining * rng.dirichlet(np.full(len(rest), concentration), size=n)
    return out


def covariance_ellipse(points: np.ndarray, n_std: float = 2.0) -> dict[str, np.ndarray | float]:
    """Mean, empirical covariance (``ddof = 1``) and the ``n_std``-standard-deviation ellipse of 2-D points.

    The ellipse's full axis lengths are ``2 · n_std · sqrt(λ)`` for the covariance eigenvalues
    ``λ_max`` (``width``) and ``λ_min`` (``height``); ``angle`` is the direction of the major axis in
    degrees from the first coordinate axis (matplotlib's ``Ellipse(xy, width, height, angle)``).
    """
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) < 2:
        raise InputError(f"covariance ellipses need at least two 2-D points, got shape {points.shape}")
    mean = points.mean(0)
    cov = np.cov(points, rowvar=False, ddof=1)
    eigvals, eigvecs = np.linalg.eigh(cov)  # ascending
    eigvals = np.clip(eigvals, 0.0, None)
    major = eigvecs[:, 1]
    return {"mean": mean, "covariance": cov, "width": 2 * n_std * float(np.sqrt(eigvals[1])),
            "height": 2 * n_std * float(np.sqrt(eigvals[0])), "angle": float(np.degrees(np.arctan2(major[1], major[0])))}


def sensitivity_cloud(setting: AdaptationSetting, focal: Annotated[Sequence[str], Tasks(count=2, others=1)], *,
                      n_preferences: NPreferences = 30, focal_weight: Annotated[float, Interval(0, 0.5)] = 0.125,
                      concentration: Annotated[float, Interval(0, low_open=True)] = 1.0, preference_seed: int = 0,
                      methods: Methods = DEFAULT_METHODS, hyper_parameters: Mapping[str, Mapping[str, Any]] | None = None,
                      n_std: Annotated[float, Interval(0, low_open=True)] = 2.0, splits: Splits = ("val", "test"),
                      dataset: str | None = None) -> xr.Dataset:
    """Preference sensitivity (001 Fig. 4, Fig. 11): ``n_preferences`` random preferences over all tasks
    (:func:`sample_preferences`, the two ``focal`` tasks fixed at ``focal_weight``), one adaptation per
    method and preference, the focal tasks' accuracies, and each method's covariance ellipse of the
    resulting accuracy cloud (:func:`covariance_ellipse`).
    It takes 11 parameters: the adaptation setting and one per option a study may give (module docstring)."""
    if len(focal) != 2:
        raise InputError(f"the sensitivity cloud has two focal tasks, got {list(focal)}")
    names = setting.names
    unknown = [f for f in focal if f not in names]
    if unknown:
        raise InputError(f"focal task(s) {unknown} not in the setting's tasks {names}")
    splits = check_splits(splits)
    methods_hp = _methods(methods, hyper_parameters)
    focal_idx = [names.index(f) for f in focal]
    rho = sample_preferences(len(names), focal_idx, n_preferences, focal_weight, concentration, preference_seed)
    acc = np.zeros((len(methods_hp), n_preferences, 2, len(splits)))
    for i, (method, hp) in enumerate(methods_hp.items()):
        for p, preference in enumerate(rho):
            result = setting.adapt(method, preference=preference.tolist(), **hp)
            acc[i, p] = setting.accuracy(setting.params(result.merged), splits, tasks=focal_idx)
    mean = np.zeros((len(methods_hp), len(splits), 2))
    cov = np.zeros((len(methods_hp), len(splits), 2, 2))
    shape = np.zeros((3, len(methods_hp), len(splits)))
    for i in range(len(methods_hp)):
        for j in range(len(splits)):
            e = covariance_ellipse(acc[i, :, :, j], n_std)
            mean[i, j], cov[i, j] = e["mean"], e["covariance"]
            shape[:, i, j] = e["width"], e["height"], e["angle"]
    ds = xr.Dataset(
        {"weight": (("preference", "task"), rho),
         "accuracy": (("merge_method", "preference", "focal", "split"), acc),
         "mean": (("merge_method", "split", "focal"), mean),
         "covariance": (("merge_method", "split", "focal", "focal_other"), cov),
         "ellipse_width": (("merge_method", "split"), shape[0]),
         "ellipse_height": (("merge_method", "split"), shape[1]),
         "ellipse_angle": (("merge_method", "split"), shape[2])},
        coords={"merge_method": list(methods_hp), "preference": np.arange(n_preferences), "task": names,
                "focal": list(focal), "focal_other": list(focal), "split": splits},
        attrs=setting.attrs(study="sensitivity_cloud", paper="001 Fig. 4, Fig. 11", focal_weight=focal_weight,
                            concentration=concentration, preference_seed=preference_seed, n_std=n_std,
                            scalarization=_scalarizations(methods_hp), hyper_parameters=methods_hp),
    )
    return _finish(ds, dataset)


def stch_alpha_ablation(setting: AdaptationSetting, *, alphas: Alphas = (0.1, 0.5, 1.0, 2.0, 5.0),
                        methods: Methods = ("tara_a", "tara_b"),
                        preference: Annotated[Sequence[float] | None, PerTask()] = None,
                        hyper_parameters: Mapping[str, Mapping[str, Any]] | None = None,
                        splits: Splits = ("val", "test"), dataset: str | None = None) -> xr.Dataset:
    """000 Fig. 10: the smoothing α of STCH (001 Eq. 10) against normalised accuracy, TARA A and B.

    Normalised accuracy is ``acc / acc_finetuned`` per task (001 Tab. 1's metric, × 100 there), the
    fine-tuned accuracy measured on the same split; ``preference`` defaults to uniform.
    It takes 7 parameters: the adaptation setting and one per option a study may give (module docstring)."""
    if not alphas or any(a <= 0 for a in alphas):
        raise InputError(f"STCH alphas must be positive, got {list(alphas)}")
    splits = check_splits(splits)
    methods_hp = _methods(methods, hyper_parameters)
    acc = np.zeros((len(methods_hp), len(alphas), len(setting.names), len(splits)))
    for i, (method, hp) in enumerate(methods_hp.items()):
        hp = {"scalarization": "stch", **hp}
        for a, alpha in enumerate(alphas):
            result = setting.adapt(method, preference=preference, alpha=float(alpha), **hp)
            acc[i, a] = setting.accuracy(setting.params(result.merged), splits)
    finetuned = np.stack([setting.accuracy(setting.task_params(t), splits, tasks=[t])[0] for t in range(len(setting.names))])
    normalized = acc / finetuned
    ds = xr.Dataset(
        {"accuracy": (("merge_method", "alpha", "task", "split"), acc),
         "finetuned_accuracy": (("task", "split"), finetuned),
         "normalized_accuracy": (("merge_method", "alpha", "task", "split"), normalized),
         "average_normalized_accuracy": (("merge_method", "alpha", "split"), normalized.mean(axis=2))},
        coords={"merge_method": list(methods_hp), "alpha": np.asarray(alphas, dtype=np.float64), "task": setting.names,
                "split": splits},
        attrs=setting.attrs(study="stch_alpha", paper="000 Fig. 10", hyper_parameters=methods_hp,
                            preference=None if preference is None else list(map(float, preference))),
    )
    return _finish(ds, dataset)
