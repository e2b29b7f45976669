"""Task-vector geometry from factors == dense computations (004 Sec. 4.3, App. G)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergelab.analysis.factored import gram, inner
from mergelab.analysis.geometry import cosine_similarity, lambda_similarity, merged_similarity, norms
from mergelab.checkpoints.modules import packed_views
from mergelab.errors import InputError
from mergelab.taskset import Dense, LowRank, MergedUpdate, TaskSet, TaskUpdate

PACKED = "transformer.resblocks.0.attn.in_proj_weight"
MLP = "transformer.resblocks.1.mlp.c_fc.weight"
BIAS = "transformer.resblocks.1.ln_2.bias"


@st.composite
def mixed_tasksets(draw):
    """LoRA on a packed q/k/v projection and an MLP, a dense MLP update for some tasks, a dense bias."""
    T = draw(st.integers(1, 4))
    d, inp = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    tasks = []
    for t in range(T):
        r = draw(st.integers(1, 3))
        scale = draw(st.floats(0.1, 10.0))
        mlp = (Dense(torch.randn(5, inp, generator=g, dtype=torch.float64)) if draw(st.booleans())
               else LowRank(scale * torch.randn(5, r, generator=g), torch.randn(r, inp, generator=g)))
        tasks.append(TaskUpdate(f"t{t}", {
            PACKED: LowRank(scale * torch.randn(3 * d, r, generator=g), torch.randn(r, inp, generator=g)),
            MLP: mlp,
            BIAS: Dense(torch.randn(5, generator=g)),
        }))
    return TaskSet(tuple(tasks))


def _dense_views(task: TaskUpdate) -> dict[str, torch.Tensor]:
    out = {}
    for name, u in task.modules.items():
        out.update({k: v.dense(torch.float64) for k, v in packed_views(name, u).items()})
    return out


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


@given(mixed_tasksets())
@settings(max_examples=40, deadline=None)
def test_cosines_from_factors_equal_dense_cosines(ts):
    ds = cosine_similarity(ts)
    dense = [_dense_views(t) for t in ts.tasks]
    modules = list(ds.module.values)
    assert modules == list(dense[0])  # packed q/k/v split into views, bias kept
    flat = [torch.cat([d[m].reshape(-1) for m in modules]) for d in dense]
    total = sum(flat)
    for s in range(len(ts)):
        for t in range(len(ts)):
            for j, m in enumerate(modules):
                assert math.isclose(float(ds.gram[s, t, j]), float((dense[s][m] * dense[t][m]).sum()), rel_tol=1e-9, abs_tol=1e-9)
                assert math.isclose(float(ds.cosine[s, t, j]), _cos(dense[s][m], dense[t][m]), rel_tol=1e-7, abs_tol=1e-9)
            assert math.isclose(float(ds.cosine_total[s, t]), _cos(flat[s], flat[t]), rel_tol=1e-7, abs_tol=1e-9)
        assert math.isclose(float(ds.cosine_to_sum_total[s]), _cos(flat[s], total), rel_tol=1e-7, abs_tol=1e-9)
        for j, m in enumerate(modules):
            summed = sum(d[m] for d in dense)
            assert math.isclose(float(ds.cosine_to_sum[s, j]), _cos(dense[s][m], summed), rel_tol=1e-7, abs_tol=1e-9)
    assert np.allclose(np.diagonal(ds.cosine_total.values), 1.0)


def test_norms_split_packed_projections_without_changing_the_total():
    g = torch.Generator().manual_seed(0)
    ts = TaskSet((TaskUpdate("a", {PACKED: LowRank(torch.randn(6, 2, generator=g), torch.randn(2, 4, generator=g)),
                                   BIAS: Dense(torch.randn(5, generator=g))}),))
    split, packed = norms(ts), norms(ts, split_packed=False)
    assert split.kind.values.tolist() == ["q", "k", "v", "other"] and packed.kind.values.tolist() == ["qkv", "other"]
    assert math.isclose(float(split.total_norm[0]), float(packed.total_norm[0]), rel_tol=1e-12)
    assert math.isclose(float((split.norm[0, :3] ** 2).sum()), float(packed.norm[0, 0]) ** 2, rel_tol=1e-12)
    assert math.isclose(float(packed.norm[0, 0]), float(ts.tasks[0].modules[PACKED].dense(torch.float64).norm()), rel_tol=1e-9)


@given(mixed_tasksets(), st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_merged_similarity_equals_dense_computation(ts, seed):
    g = torch.Generator().manual_seed(seed)
    merged = MergedUpdate({PACKED: Dense(torch.randn(ts.tasks[0].modules[PACKED].shape, generator=g)),
                           MLP: LowRank(torch.randn(5, 2, generator=g), torch.randn(2, ts.tasks[0].modules[MLP].shape[1], generator=g)),
                           BIAS: Dense(torch.randn(5, generator=g))}, meta={"method": "random"})
    ds = merged_similarity(ts, merged)
    m_dense = {}
    for name, u in merged.modules.items():
        m_dense.update({k: v.dense(torch.float64) for k, v in packed_views(name, u).items()})
    modules = list(ds.module.values)
    m_flat = torch.cat([m_dense[m].reshape(-1) for m in modules])
    for t, task in enumerate(ts.tasks):
        dense = _dense_views(task)
        flat = torch.cat([dense[m].reshape(-1) for m in modules])
        assert math.isclose(float(ds.cosine_total[t]), _cos(m_flat, flat), rel_tol=1e-7, abs_tol=1e-9)
        assert math.isclose(float(ds.distance_total[t]), float((m_flat - flat).norm()), rel_tol=1e-7)
        assert math.isclose(float(ds.normalized_similarity_total[t]), 1 - float((m_flat - flat).norm() / flat.norm()), rel_tol=1e-7, abs_tol=1e-9)
        for j, m in enumerate(modules):
            assert math.isclose(float(ds.distance[t, j]), float((m_dense[m] - dense[m]).norm()), rel_tol=1e-7, abs_tol=1e-9)
            assert math.isclose(float(ds.cosine[t, j]), _cos(m_dense[m], dense[m]), rel_tol=1e-7, abs_tol=1e-9)
    assert ds.attrs["merge_meta"] == {"method": "random"}


@given(mixed_tasksets(), st.lists(st.floats(-1.0, 2.0).filter(lambda x: x == 0 or abs(x) > 1e-6), min_size=1, max_size=4))
@settings(max_examples=30, deadline=None)
def test_lambda_similarity_equals_explicit_task_arithmetic_merges(ts, lambdas):
    curve = lambda_similarity(ts, lambdas)
    for i, lam in enumerate(lambdas):
        ta = {m: Dense(lam * sum(task.modules[m].dense(torch.float64) for task in ts.tasks)) for m in ts.module_names}
        ref = merged_similarity(ts, ta)
        # distances near 0 come from a square root of a Gram difference: sqrt(fp error) ~ 1e-8
        scale = float(np.nanmax(np.abs(ref["distance_total"].values))) + 1.0
        for var in ("distance", "distance_total", "normalized_similarity_total"):
            np.testing.assert_allclose(curve[var].values[i], ref[var].values, rtol=1e-7, atol=1e-6 * scale)
        np.testing.assert_allclose(curve.cosine_total.values[i], ref.cosine_total.values, rtol=1e-7, atol=1e-9)


def test_lambda_similarity_known_answers():
    g = torch.Generator().manual_seed(1)
    big = LowRank(10 * torch.randn(6, 2, generator=g), torch.randn(2, 6, generator=g))
    small = LowRank(torch.randn(6, 2, generator=g), torch.randn(2, 6, generator=g))
    one = TaskSet((TaskUpdate("only", {"w": big}),))
    ds = lambda_similarity(one, [0.0, 0.5, 1.0])
    assert ds.normalized_similarity_total.values[:, 0].tolist() == pytest.approx([0.0, 0.5, 1.0])
    assert np.isnan(ds.cosine_total.values[0, 0]) and ds.cosine_total.values[2, 0] == pytest.approx(1.0)
    # 004 Fig. 5: a larger λ pulls the merge towards the high-norm task and away from the low-norm one
    two = lambda_similarity(TaskSet((TaskUpdate("big", {"w": big}), TaskUpdate("small", {"w": small}))), [0.2, 0.4, 0.6])
    sim = two.normalized_similarity_total.sel(task="big").values
    assert (np.diff(sim) > 0).all()
    assert two.normalized_similarity_total.sel(task="small").values[-1] < 0


def test_merged_similarity_needs_every_module():
    g = torch.Generator().manual_seed(2)
    ts = TaskSet((TaskUpdate("a", {"w": Dense(torch.randn(3, 3, generator=g)), "v": Dense(torch.randn(3, generator=g))}),))
    with pytest.raises(InputError, match="lacks 1"):
        merged_similarity(ts, {"w": Dense(torch.zeros(3, 3))})


def test_inner_and_gram_match_dense_for_every_pair_of_kinds():
    g = torch.Generator().manual_seed(3)
    ups = [LowRank(torch.randn(4, 2, generator=g), torch.randn(2, 5, generator=g)), Dense(torch.randn(4, 5, generator=g)),
           LowRank(torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64))]
    dense = torch.stack([u.dense(torch.float64).reshape(-1) for u in ups])
    expected = (dense @ dense.T).numpy()
    np.testing.assert_allclose(gram(ups), expected, rtol=1e-9)
    np.testing.assert_allclose(gram([ups[0], ups[2]]), expected[np.ix_([0, 2], [0, 2])], rtol=1e-9)
    assert inner(ups[1], ups[0]) == pytest.approx(expected[1, 0], rel=1e-9)
