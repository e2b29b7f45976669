"""Coverage statistics (001 Sec. 2.2 / App. D, 002 Sec. 4): known answers and Gram route == explicit SVD."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergelab.analysis.coverage import energy_rank, erank, erank_gram, subspace_coverage
from mergelab.analysis.spectra import singular_values
from mergelab.taskset import Dense, LowRank, TaskSet, TaskUpdate


def _orthonormal(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]


@given(st.integers(1, 9), st.integers(1, 9), st.data())
@settings(max_examples=40, deadline=None)
def test_erank_of_a_flat_spectrum_equals_its_rank(n, m, data):
    k = data.draw(st.integers(1, min(n, m)))
    scale = data.draw(st.floats(1e-3, 1e3))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    X = scale * _orthonormal(n, k, g) @ _orthonormal(m, k, g).T  # k equal singular values
    assert math.isclose(erank(X), k, rel_tol=1e-9)
    assert math.isclose(erank_gram(X @ X.T), k, rel_tol=1e-9)


def test_erank_known_values_and_bounds():
    assert erank(torch.zeros(4, 3)) == 0.0
    assert math.isclose(erank(torch.diag(torch.tensor([5.0, 0.0, 0.0]))), 1.0)
    # two singular values with energies 3:1 -> p = (3/4, 1/4)
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert math.isclose(erank(torch.diag(torch.tensor([math.sqrt(3.0), 1.0], dtype=torch.float64))), expected, rel_tol=1e-12)
    X = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    assert 1.0 <= erank(X) <= 5.0


def test_orthonormal_rank1_directions_cover_their_full_count():
    """Mutually orthogonal, equal-norm rank-1 directions: every stack has a flat spectrum."""
    out, inp, ranks = 10, 9, [2, 3, 1]
    g = torch.Generator().manual_seed(0)
    U, V = _orthonormal(out, sum(ranks), g), _orthonormal(inp, sum(ranks), g)
    tasks, start = [], 0
    for t, r in enumerate(ranks):
        cols = slice(start, start + r)
        tasks.append(TaskUpdate(f"t{t}", {"blocks.0.attn.q_proj.weight": LowRank(2.0 * U[:, cols], V[:, cols].T)}))
        start += r
    ds = subspace_coverage(TaskSet(tuple(tasks)))
    assert np.allclose(ds.erank_task.values[:, 0], ranks)
    assert math.isclose(float(ds.erank_per_task_sum[0]), sum(ranks), rel_tol=1e-9)
    assert math.isclose(float(ds.erank_aware[0]), sum(ranks), rel_tol=1e-9)
    # ΔW_t has squared norm 4·r_t: the agnostic stack's spectrum is (4r_t) -> not flat unless ranks are equal
    p = np.array(ranks) / sum(ranks)
    assert math.isclose(float(ds.erank_agnostic[0]), math.exp(-(p * np.log(p)).sum()), rel_tol=1e-9)
    assert ds.lora_rank.values[:, 0].tolist() == ranks


def _vec_rank1(u: LowRank) -> torch.Tensor:
    """Rows vec(b_j a_jᵀ) of the rank-1 stack, built explicitly (the naive route)."""
    B, A = u.B.double(), u.A.double()
    return torch.einsum("oj,ji->joi", B, A).reshape(u.rank, -1)


@st.composite
def tasksets(draw):
    T = draw(st.integers(1, 3))
    out, inp = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    ranks = draw(st.lists(st.integers(1, 4), min_size=T, max_size=T))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    tasks = []
    for t, r in enumerate(ranks):
        scale = draw(st.floats(0.05, 20.0))
        B = torch.randn(out, r, generator=g, dtype=dtype) * scale
        A = torch.randn(r, inp, generator=g, dtype=dtype)
        tasks.append(TaskUpdate(f"t{t}", {"layers.0.mlp.fc1.weight": LowRank(B, A)}))
    return TaskSet(tuple(tasks))


@given(tasksets())
@settings(max_examples=60, deadline=None)
def test_gram_route_erank_equals_explicit_svd_erank(ts):
    ds = subspace_coverage(ts)
    ups = ts.updates("layers.0.mlp.fc1.weight")
    per_task = [erank(_vec_rank1(u)) for u in ups]
    aware = erank(torch.cat([_vec_rank1(u) for u in ups]))
    agnostic = erank(torch.stack([u.dense(torch.float64).reshape(-1) for u in ups]))
    assert np.allclose(ds.erank_task.values[:, 0], per_task, rtol=1e-7, atol=1e-9)
    assert math.isclose(float(ds.erank_per_task_sum[0]), sum(per_task), rel_tol=1e-7)
    assert math.isclose(float(ds.erank_aware[0]), aware, rel_tol=1e-7)
    assert math.isclose(float(ds.erank_agnostic[0]), agnostic, rel_tol=1e-7)


def test_energy_rank_known_values():
    sigma = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14: cumulative 0.643, 0.929, 1
    assert energy_rank(sigma, 0.95) == 3
    assert energy_rank(sigma, 0.90) == 2
    assert energy_rank(sigma, 0.60) == 1
    assert energy_rank(sigma, 1.0) == 3
    assert energy_rank(torch.zeros(3)) == 0
    with pytest.raises(ValueError):
        energy_rank(sigma, 0.0)


@given(tasksets(), st.sampled_from([0.5, 0.9, 0.95, 0.99]))
@settings(max_examples=30, deadline=None)
def test_energy_rank_per_task_matches_the_dense_spectrum(ts, energy):
    ds = subspace_coverage(ts, energy=energy)
    for t, u in enumerate(ts.updates("layers.0.mlp.fc1.weight")):
        e = torch.linalg.svdvals(u.dense(torch.float64)) ** 2
        c = torch.cumsum(e, 0) / e.sum()
        assert int(ds.energy_rank[t, 0]) == int((c < energy - 1e-12).sum()) + 1


def test_dense_updates_get_agnostic_coverage_and_nan_rank1_stacks():
    g = torch.Generator().manual_seed(3)
    lr = LowRank(torch.randn(5, 2, generator=g), torch.randn(2, 4, generator=g))
    dense = Dense(torch.randn(5, 4, generator=g))
    ts = TaskSet((TaskUpdate("lora", {"w": lr, "b": Dense(torch.randn(5, generator=g))}),
                  TaskUpdate("full", {"w": dense, "b": Dense(torch.randn(5, generator=g))})))
    ds = subspace_coverage(ts)
    assert list(ds.module.values) == ["w"]  # the 1-D bias is not a matrix
    assert np.isnan(ds.erank_aware.values).all() and np.isnan(ds.erank_task.values).all()
    X = torch.stack([lr.dense(torch.float64).reshape(-1), dense.delta.double().reshape(-1)])
    assert math.isclose(float(ds.erank_agnostic[0]), erank(X), rel_tol=1e-9)
    assert int(ds.energy_rank[1, 0]) == energy_rank(singular_values(dense))
    assert ds.lora_rank.values[:, 0].tolist() == [2, 0]
