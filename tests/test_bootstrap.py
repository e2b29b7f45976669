"""Paired, task-stratified bootstrap intervals of normalised-accuracy gains (results' ``gain_ci``)."""

import numpy as np
import pytest

from mergelab.evaluation.bootstrap import paired_interval, resample_counts
from mergelab.study.results import interval_label

SIZES = {"digits": 300, "textures": 200}


def _outcomes(rng: np.random.Generator, accuracy: float) -> dict[str, np.ndarray]:
    return {t: rng.random(n) < accuracy for t, n in SIZES.items()}


def test_resamples_keep_every_task_size_and_are_reproducible():
    counts = resample_counts(SIZES, resamples=50, seed=3)
    assert {t: c.shape for t, c in counts.items()} == {"digits": (50, 300), "textures": (50, 200)}
    assert all(np.allclose(c.sum(1), 1.0) for c in counts.values())  # each row: N_t draws over N_t
    again = resample_counts(SIZES, resamples=50, seed=3)
    assert all(np.array_equal(counts[t], again[t]) for t in SIZES)


def test_a_model_against_itself_has_a_zero_interval():
    a = _outcomes(np.random.default_rng(0), 0.7)
    assert paired_interval(a, a, {t: 0.9 for t in SIZES}, resample_counts(SIZES, 200)) == (0.0, 0.0)


def test_the_interval_brackets_the_normalised_gap_and_pairing_narrows_it():
    rng = np.random.default_rng(1)
    b = _outcomes(rng, 0.6)
    a = {t: v | (rng.random(v.size) < 0.1) for t, v in b.items()}  # b's hits plus ~4 % more: a paired, small gain
    normaliser = {"digits": 0.9, "textures": 0.5}
    counts = resample_counts(SIZES, 1000)
    gap = np.mean([(a[t].mean() - b[t].mean()) / normaliser[t] for t in SIZES])
    low, high = paired_interval(a, b, normaliser, counts)
    assert 0 < low < gap < high  # significant: every extra hit is a gain on the same images
    shuffled = {t: rng.permutation(v) for t, v in b.items()}  # the same accuracies, unpaired outcomes
    low_u, high_u = paired_interval(a, shuffled, normaliser, counts)
    assert high_u - low_u > 2 * (high - low)


@pytest.mark.parametrize(("low", "high", "label"), [(0.003, 0.02, "[+0.3,+2.0]*"), (-0.01, 0.004, "[-1.0,+0.4]"),
                                                    (-0.05, -0.01, "[-5.0,-1.0]*"), (np.nan, np.nan, "—")])
def test_interval_labels_mark_significant_gains(low, high, label):
    assert interval_label(low, high) == label
