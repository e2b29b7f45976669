"""Spectra from factors == dense SVD; numerical rank of merged updates; SAR (Marczak et al. 2025, 003 Sec. 5.2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergelab.analysis.spectra import (
    merged_rank,
    numerical_rank,
    pairwise_sar,
    retained_rank,
    sar,
    sar_update,
    singular_values,
    task_spectra,
)
from mergelab.synthetic import random_taskset
from mergelab.taskset import BaseRef, Dense, LowRank, MergedUpdate, TaskSet, TaskUpdate


@st.composite
def lowranks(draw, out=None, inp=None):
    out = out or draw(st.integers(1, 9))
    inp = inp or draw(st.integers(1, 9))
    r = draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return LowRank(torch.randn(out, r, generator=g, dtype=dtype) * draw(st.floats(0.01, 100.0)),
                   torch.randn(r, inp, generator=g, dtype=dtype))


@given(lowranks())
@settings(max_examples=80, deadline=None)
def test_spectrum_from_factors_equals_dense_svdvals(u):
    S = singular_values(u)
    dense = torch.linalg.svdvals(u.dense(torch.float64))
    assert len(S) == min(u.rank, *u.shape)
    torch.testing.assert_close(S, dense[: len(S)], rtol=1e-9, atol=1e-9 * float(dense[0]))
    assert float(dense[len(S):].abs().sum()) <= 1e-9 * len(dense) * float(dense[0])  # the rest is zero


def test_task_spectra_dataset_matches_dense_and_pads_shorter_spectra():
    ts = random_taskset({"blocks.0.attn.q_proj.weight": (7, 6), "blocks.1.mlp.fc2.weight": (5, 8)}, 3, rank=[1, 2, 4], seed=4)
    ds = task_spectra(ts)
    assert ds.sizes == {"task": 3, "module": 2, "component": 4}
    for t, task in enumerate(ts.tasks):
        for j, m in enumerate(ds.module.values):
            dense = torch.linalg.svdvals(task.modules[m].dense(torch.float64)).numpy()
            r = task.modules[m].rank
            assert np.allclose(ds.singular_value.values[t, j, :r], dense[:r], rtol=1e-9)
            assert np.isnan(ds.singular_value.values[t, j, r:]).all()
            assert math.isclose(float(ds.cumulative_energy.values[t, j, r - 1]), 1.0, rel_tol=1e-12)
            assert np.allclose(np.cumsum(ds.energy_fraction.values[t, j, :r]), ds.cumulative_energy.values[t, j, :r])


def test_numerical_rank_of_low_rank_and_destroyed_low_rank_updates():
    g = torch.Generator().manual_seed(0)
    u = LowRank(torch.randn(40, 6, generator=g), torch.randn(6, 30, generator=g))
    assert numerical_rank(u) == 6
    assert numerical_rank(Dense(u.dense())) == 6  # float32 round-off in B @ A is not rank
    trimmed = u.dense() * (torch.rand(40, 30, generator=g) > 0.5)  # magnitude-free TIES-like trim
    assert numerical_rank(Dense(trimmed)) == 30
    assert numerical_rank(Dense(torch.zeros(4, 4))) == 0
    diag = Dense(torch.diag(torch.tensor([1.0, 1e-3, 1e-6], dtype=torch.float64)))
    assert numerical_rank(diag, rtol=1e-4) == 2
    assert numerical_rank(diag, rtol=1e-8) == 3


def test_merged_rank_dataset_per_module():
    g = torch.Generator().manual_seed(1)
    merged = MergedUpdate(
        {"transformer.resblocks.0.attn.in_proj_weight": LowRank(torch.randn(12, 3, generator=g), torch.randn(3, 4, generator=g)),
         "transformer.resblocks.0.mlp.c_fc.weight": Dense(torch.randn(6, 5, generator=g)),
         "transformer.resblocks.0.ln_1.bias": Dense(torch.randn(4, generator=g))},
        BaseRef("tiny"), {"method": "ties", "space": "full"})
    ds = merged_rank(merged)
    assert ds.merged_rank.values.tolist() == [3, 3, 3, 5]  # q, k, v views of the packed LoRA, then the dense MLP
    assert ds.max_rank.values.tolist() == [4, 4, 4, 5]
    assert ds.kind.values.tolist() == ["q", "k", "v", "mlp_in"]
    assert ds.attrs["merge_meta"] == {"method": "ties", "space": "full"} and ds.attrs["dataset"] == "tiny"


def test_retained_rank_known_values():
    sigma = torch.tensor([3.0, 2.0, 1.0])  # retained norm fractions sqrt(9/14)=0.80, sqrt(13/14)=0.96, 1
    assert retained_rank(sigma, 0.95) == 2
    assert retained_rank(sigma, 0.8) == 1
    assert retained_rank(sigma, 1.0) == 3
    assert retained_rank(torch.zeros(2), 0.95) == 0


@given(st.integers(1, 8), st.integers(1, 8), st.integers(0, 2**16), st.floats(0.1, 10.0))
@settings(max_examples=60, deadline=None)
def test_sar_of_a_matrix_with_itself_is_one(n, m, seed, scale):
    X = torch.randn(n, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert math.isclose(sar(X, X, retained=1.0), 1.0, rel_tol=1e-9)
    assert math.isclose(sar(X, scale * X, retained=1.0), 1.0, rel_tol=1e-9)
    assert 0.95 - 1e-12 <= sar(X, X) <= 1.0 + 1e-12  # the default keeps 95 % of the reference's norm


def test_sar_known_answers():
    g = torch.Generator().manual_seed(0)
    e = torch.eye(4, dtype=torch.float64)
    a = e[:, :2] @ torch.randn(2, 3, generator=g, dtype=torch.float64)  # column space span(e1, e2)
    b = e[:, 2:] @ torch.randn(2, 3, generator=g, dtype=torch.float64)  # span(e3, e4)
    assert sar(a, b, retained=1.0) < 1e-12
    assert math.isclose(sar(a + b, a, retained=1.0), float(a.norm() / (a + b).norm()), rel_tol=1e-12)
    # reference with spectrum (3, 2, 1): k_M = 2 at retained 0.95, so e3 lies outside the reference subspace
    ref = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    assert sar(e[:3, 2:3], ref) < 1e-12 and math.isclose(sar(e[:3, 2:3], ref, retained=1.0), 1.0)
    assert sar(torch.zeros(3, 3), ref) == 0.0


@given(lowranks(out=6, inp=5), lowranks(out=6, inp=5), st.sampled_from([0.5, 0.95, 1.0]))
@settings(max_examples=60, deadline=None)
def test_sar_from_factors_equals_sar_of_dense_matrices(u, v, retained):
    expected = sar(u.dense(torch.float64), v.dense(torch.float64), retained=retained)
    assert math.isclose(sar_update(u, v, retained=retained), expected, rel_tol=1e-7, abs_tol=1e-9)
    assert math.isclose(sar_update(Dense(u.dense(torch.float64)), v, retained=retained), expected, rel_tol=1e-7, abs_tol=1e-9)
    assert math.isclose(sar_update(u, Dense(v.dense(torch.float64)), retained=retained), expected, rel_tol=1e-7, abs_tol=1e-9)
    assert 0.0 <= expected <= 1.0 + 1e-12


def test_pairwise_sar_dataset():
    ts = random_taskset({"blocks.0.attn.v_proj.weight": (9, 8), "blocks.1.attn.out_proj.weight": (9, 8)}, ["a", "b", "c"], rank=3, seed=2)
    ds = pairwise_sar(ts, retained=0.9)
    assert ds.sar.dims == ("task", "reference", "module") and ds.sizes == {"task": 3, "reference": 3, "module": 2}
    for j, m in enumerate(ds.module.values):
        for s in range(3):
            for r in range(3):
                dense = sar(ts.tasks[s].modules[m].dense(torch.float64), ts.tasks[r].modules[m].dense(torch.float64), retained=0.9)
                assert math.isclose(float(ds.sar[s, r, j]), dense, rel_tol=1e-7)
            assert int(ds.k_reference[s, j]) == retained_rank(singular_values(ts.tasks[s].modules[m]), 0.9)
    assert (np.diag(ds.sar_mean.values) >= 0.9 - 1e-12).all()
    off = ds.sar_mean.values[~np.eye(3, dtype=bool)]
    assert math.isclose(float(ds.sar_offdiag_mean), off.mean())
    with pytest.raises(ValueError):
        pairwise_sar(ts, retained=1.5)


def test_spectra_ignore_non_matrix_parameters():
    g = torch.Generator().manual_seed(5)
    ts = TaskSet(tuple(TaskUpdate(n, {"w": LowRank(torch.randn(4, 2, generator=g), torch.randn(2, 3, generator=g)),
                                      "ln.bias": Dense(torch.randn(4, generator=g))}) for n in ("a", "b")))
    assert list(task_spectra(ts).module.values) == ["w"]
    assert list(pairwise_sar(ts).module.values) == ["w"]
