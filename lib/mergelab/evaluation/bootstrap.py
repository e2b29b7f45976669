"""Paired, task-stratified bootstrap intervals for differences of mean normalised accuracy.

Two models scored on the same test images differ by ``Δ = mean_t (acc_t(a) − acc_t(b)) / ft_t``
(the papers' normalised accuracy, 003 Tab. 3, averaged over tasks; ``ft_t`` the fine-tuned
model's accuracy on task ``t``, a fixed normaliser). Resampling the images of each task with
replacement (stratified: every resample keeps each task's size) and scoring both models on the
*same* resample (paired: the per-image outcomes move together) gives Δ's bootstrap distribution;
its 2.5 and 97.5 % percentiles are the 95 % interval (Efron & Tibshirani, 1993, ch. 13). A gap
is significant when its interval excludes 0.

The resamples are drawn once per study (:func:`resample_counts`, seeded), so every method is
compared with its baseline on the same resamples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["LEVEL", "RESAMPLES", "paired_interval", "resample_counts"]

#: Bootstrap resamples and interval level of the study results.
RESAMPLES, LEVEL = 1000, 0.95


def resample_counts(sizes: Mapping[str, int], resamples: int = RESAMPLES, seed: int = 0) -> dict[str, np.ndarray]:
    """Per task, ``(resamples, N_t)`` weights: how often each image is drawn in each resample, over
    ``N_t`` (a row times the outcomes is that resample's accuracy)."""
    rng = np.random.default_rng(seed)
    return {task: rng.multinomial(n, np.full(n, 1.0 / n), size=resamples) / n for task, n in sizes.items()}


def paired_interval(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], normaliser: Mapping[str, float],
                    counts: Mapping[str, np.ndarray], level: float = LEVEL) -> tuple[float, float]:
    """The ``level`` percentile interval of ``mean_t (acc_t(a) − acc_t(b)) / normaliser_t`` over the
    resamples ``counts`` (:func:`resample_counts`); ``a`` / ``b``: each task's per-image outcomes (0/1)
    of the two models on the same images, in the same order."""
    tasks: Sequence[str] = list(counts)
    gaps = sum(counts[t] @ (np.asarray(a[t], float) - np.asarray(b[t], float)) / normaliser[t] for t in tasks) / len(tasks)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(gaps, [tail, 100 - tail])
    return float(low), float(high)
