"""The data model validates at construction and keeps its identities (hypothesis)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergelab.checkpoints.modules import packed_views
from mergelab.errors import InputError
from mergelab.taskset import Dense, LowRank, MergedUpdate, TaskSet, TaskUpdate

dims = st.integers(min_value=1, max_value=12)


@st.composite
def lowranks(draw, out=None, inp=None):
    out = out or draw(dims)
    inp = inp or draw(dims)
    r = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    return LowRank(torch.randn(out, r, generator=g), torch.randn(r, inp, generator=g))


@given(lowranks())
def test_lowrank_norm_matches_dense_norm(u):
    assert math.isclose(u.norm(), float(u.dense().double().norm()), rel_tol=1e-5, abs_tol=1e-9)
    assert u.shape == tuple(u.dense().shape)


@given(st.integers(1, 5), st.integers(1, 4), st.integers(0, 1000))
@settings(deadline=None, max_examples=30)
def test_taskset_accepts_heterogeneous_ranks_and_keeps_order(T, modules, seed):
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(T):
        r = t + 1
        mods = {f"m{i}.weight": LowRank(torch.randn(6, r, generator=g), torch.randn(r, 5, generator=g)) for i in range(modules)}
        tasks.append(TaskUpdate(f"t{t}", mods))
    ts = TaskSet(tuple(tasks))
    assert ts.names == tuple(f"t{t}" for t in range(T))
    assert [u.rank for u in ts.updates("m0.weight")] == list(range(1, T + 1))
    assert ts.subset(ts.names[::-1]).names == ts.names[::-1]


def test_content_hash_ignores_the_label_but_not_the_values():
    B, A = torch.ones(3, 2), torch.ones(2, 4)
    a = TaskUpdate("a", {"w": LowRank(B, A)})
    b = TaskUpdate("b", {"w": LowRank(B.clone(), A.clone())})
    c = TaskUpdate("a", {"w": LowRank(B, A * 1.0001)})
    assert a.content_hash == b.content_hash != c.content_hash


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: LowRank(torch.ones(3, 2), torch.ones(3, 4)), "disagree on the rank"),
        (lambda: LowRank(torch.ones(3, 0), torch.ones(0, 4)), "r = 0"),
        (lambda: LowRank(torch.ones(3, 2, dtype=torch.int32), torch.ones(2, 4)), "unsupported dtype"),
        (lambda: LowRank(torch.ones(3), torch.ones(2, 4)), "must be 2-D"),
        (lambda: Dense(torch.tensor([1.0, float("nan")])), "NaN/Inf"),
        (lambda: Dense(torch.tensor([float("inf")])), "NaN/Inf"),
        (lambda: TaskUpdate("", {"w": Dense(torch.ones(2))}), "non-empty name"),
        (lambda: TaskUpdate("a", {}), "no updated modules"),
        (lambda: TaskSet(()), "no tasks"),
        (lambda: TaskSet((TaskUpdate("a", {"w": Dense(torch.ones(2))}), TaskUpdate("a", {"w": Dense(torch.ones(2))}))), "duplicate task names"),
        (lambda: TaskSet((TaskUpdate("a", {"w": Dense(torch.ones(2))}), TaskUpdate("b", {"v": Dense(torch.ones(2))}))), "--modules"),
        (lambda: TaskSet((TaskUpdate("a", {"w": Dense(torch.ones(2))}), TaskUpdate("b", {"w": Dense(torch.ones(3))}))), "share one base model"),
    ],
)
def test_constructors_reject_bad_input_with_a_fix(build, message):
    with pytest.raises(InputError, match=message) as info:
        build()
    assert "\n" not in str(info.value)


def test_packed_views_split_q_k_v_and_share_A():
    g = torch.Generator().manual_seed(0)
    u = LowRank(torch.randn(12, 2, generator=g), torch.randn(2, 4, generator=g))
    views = packed_views("blk.attn.in_proj_weight", u)
    assert list(views) == ["blk.attn.q_proj.weight", "blk.attn.k_proj.weight", "blk.attn.v_proj.weight"]
    stacked = torch.cat([v.dense() for v in views.values()])
    torch.testing.assert_close(stacked, u.dense())
    assert all(v.A is u.A for v in views.values())
    assert packed_views("blk.mlp.c_fc.weight", u) == {"blk.mlp.c_fc.weight": u}


def test_merged_update_apply_adds_scaled_delta_without_mutating_base():
    base = {"w": torch.zeros(3, 4), "b": torch.ones(3)}
    merged = MergedUpdate({"w": LowRank(torch.ones(3, 1), torch.ones(1, 4))})
    out = merged.apply(base, scale=0.5)
    torch.testing.assert_close(out["w"], torch.full((3, 4), 0.5))
    assert out["b"] is base["b"] and base["w"].abs().sum() == 0
    with pytest.raises(InputError, match="lacks 1 merged"):
        merged.apply({"b": torch.ones(3)})


def test_merged_update_tensor_round_trip():
    merged = MergedUpdate({"w": LowRank(torch.ones(3, 2), torch.ones(2, 4)), "b": Dense(torch.arange(3.0))}, meta={"method": "x"})
    back = MergedUpdate.from_tensors(merged.to_tensors(), merged.base, merged.meta)
    assert back.content_hash == merged.content_hash
    assert isinstance(back.modules["w"], LowRank) and isinstance(back.modules["b"], Dense)
