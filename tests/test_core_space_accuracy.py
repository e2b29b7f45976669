"""mergelab.experiments.core_space_accuracy: the accuracy of 003 Fig. 4's truncated merges and of 003 Tab. 5's bases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mergelab.evaluation import evaluate_task
from mergelab.merging import merge
from mergelab.taskset import Dense, MergedUpdate


def test_truncation_accuracy_matches_a_hand_truncated_full_space_merge(bench_datasets, micro_pair):
    ds = bench_datasets["truncation_accuracy"]
    assert ds.normalized_accuracy.dims == ("space", "fraction", "task") and list(ds.fraction.values) == [0.0, 0.5, 0.9]
    # p = 0 keeps every component: the untruncated merge, in either space (Core Space is lossless for TA, 003 Eq. 11)
    ta = merge(micro_pair.taskset, "task_arithmetic", "full")
    params = ta.apply(micro_pair.base)
    for t, name in enumerate(micro_pair.taskset.names):
        expected = evaluate_task(micro_pair.backbone, micro_pair.bench.tasks[name], params)
        assert float(ds.accuracy.sel(space="full", fraction=0.0, task=name)) == pytest.approx(expected, abs=1e-12)
        assert float(ds.accuracy.sel(space="core", fraction=0.0, task=name)) == pytest.approx(expected, abs=0.011)  # one image of 100
    # p = 0.5 in full space by hand: the top ⌊0.5 · min(out, in)⌋ singular components of every merged ΔW
    kept = {}
    for module, update in ta.modules.items():
        delta = update.dense(torch.float64)
        U, s, Vh = torch.linalg.svd(delta, full_matrices=False)
        k = math.floor(0.5 * min(delta.shape))
        kept[module] = Dense(((U[:, :k] * s[:k]) @ Vh[:k]).float())
    params = MergedUpdate(kept, ta.base, {}).apply(micro_pair.base)
    for name in micro_pair.taskset.names:
        expected = evaluate_task(micro_pair.backbone, micro_pair.bench.tasks[name], params)
        assert float(ds.accuracy.sel(space="full", fraction=0.5, task=name)) == pytest.approx(expected, abs=0.011)
    finetuned = ds.finetuned_accuracy.values
    np.testing.assert_allclose(ds.normalized_accuracy.values, ds.accuracy.values / finetuned)
    np.testing.assert_allclose(ds.normalized_accuracy_mean.values, ds.normalized_accuracy.mean("task").values)


def test_the_concatenation_basis_is_the_core_merge_and_other_bases_are_scored_alike(bench_datasets, micro_pair):
    ds = bench_datasets["reference_basis_accuracy"]
    assert list(ds.basis.values) == ["first_task", "random_orthonormal", "concatenation"] and ds.attrs["method"] == "ties"
    params = merge(micro_pair.taskset, "ties", "core").apply(micro_pair.base)
    for name in micro_pair.taskset.names:  # the concatenation (003 Eq. 3) is the Core space's own basis
        expected = evaluate_task(micro_pair.backbone, micro_pair.bench.tasks[name], params)
        assert float(ds.accuracy.sel(basis="concatenation", task=name)) == expected
    assert np.isfinite(ds.normalized_accuracy.values).all() and (ds.accuracy.values >= 0).all()
