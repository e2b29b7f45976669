"""Anisotropy of LoRA directions (001 Sec. 2.3, App. E): J from one backward pass per task."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from hypothesis import given
from hypothesis import strategies as st

from mergelab.analysis import anisotropy as an
from mergelab.experiments.model_analyses import jacobian_anisotropy
from mergelab.merging import merge
from mergelab.store import Store
from mergelab.synthetic import random_lowrank


def _updates(T: int, r: int, out: int, inp: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [random_lowrank(out, inp, r, g) for _ in range(T)]


@given(T=st.integers(1, 3), r=st.integers(1, 3), out=st.integers(2, 6), inp=st.integers(2, 6), seed=st.integers(0, 99))
def test_sensitivities_equal_dense_frobenius_products(T, r, out, inp, seed):
    """Known answer: J[i, k] = <G, S_k>_F with S_k formed densely, for both bases."""
    updates = _updates(T, r, out, inp, seed)
    G = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    for build in an.BASES.values():
        basis = build(updates)
        dense = torch.stack([(G * basis.direction(k)).sum() for k in range(basis.size)])
        torch.testing.assert_close(an.sensitivities(G, basis), dense, rtol=1e-10, atol=1e-12)


def test_bases_reassemble_each_task_update():
    """Raw directions of task i sum to ΔW_i; SVD directions weighted by σ_k do too (001 Eqs. (1), (8)-(9)),
    so Σ over task i's directions of (weighted) J equals <G, ΔW_i>."""
    updates = _updates(3, 2, 5, 4, seed=3)
    G = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    raw, svd = an.raw_basis(updates), an.svd_basis(updates)
    from mergelab.spaces.knots import knots_svd

    s = knots_svd(updates)[1]
    for i, u in enumerate(updates):
        expected = float((G * u.dense(torch.float64)).sum())
        assert float(an.sensitivities(G, raw)[raw.owner == i].sum()) == pytest.approx(expected, rel=1e-9)
        assert float((an.sensitivities(G, svd)[svd.owner == i] * s).sum()) == pytest.approx(expected, rel=1e-9)
    assert torch.equal(raw.index, torch.tensor([1, 2, 1, 2, 1, 2]))
    assert svd.size == 3 * s.numel()


def test_kappa_and_xi_by_hand():
    assert an.kappa(np.array([0.0, 1.0, -4.0, 2.0])) == 4.0  # exact zero excluded, signs ignored
    assert np.isnan(an.kappa(np.zeros(3)))
    h = np.array([1.0, -2.0, 0.5])
    assert an.xi(h, -3 * h) == pytest.approx(0.0, abs=1e-15)  # a sign flip is the same direction
    assert an.xi(np.array([1.0, 0.0]), np.array([0.0, 2.0])) == 1.0
    assert an.xi(np.array([1.0, 1.0]), np.array([1.0, 0.0])) == pytest.approx(1 - 1 / np.sqrt(2))
    assert np.isnan(an.xi(h, np.zeros(3)))


def test_one_backward_per_task_matches_per_direction_derivatives(micro_pair):
    """On the micro model, J from G_i = ∂f_i/∂W equals d/dε f_i(W + ε S_k) computed direction by direction."""
    taskset, backbone = micro_pair.taskset, micro_pair.backbone
    batches = micro_pair.val_batches("textures", batch_size=8, batches=2)
    head = micro_pair.head("textures")
    params = merge(taskset, "task_arithmetic", "full", alpha=0.3).apply(backbone.base_state())
    name = "transformer.resblocks.1.attn.v_proj.weight"
    _, grads = an.loss_gradients(backbone, [head], [batches], params, [name])
    for basis in (an.raw_basis(taskset.updates(name)), an.svd_basis(taskset.updates(name))):
        picks = [0, basis.size - 1]
        fast = an.sensitivities(grads[0][name], basis)[picks]
        slow = an.naive_sensitivities(backbone, head, batches, params, name, basis, picks)
        torch.testing.assert_close(fast, slow, rtol=2e-3, atol=1e-6)


def test_micro_run_has_named_dims_finite_values_and_round_trips(micro_pair):
    ds = jacobian_anisotropy(micro_pair, batch_size=8, batches=1)
    assert ds.J.dims == ("basis", "task", "module", "direction")
    assert list(ds.basis.values) == ["raw", "svd"] and [str(t) for t in ds.task.values] == ["digits", "textures"]
    assert set(ds.kind.values.tolist()) == {"q", "k", "v", "out"} and sorted(set(ds.layer.values.tolist())) == [0, 1, 2, 3]
    assert (ds.n_directions.sel(basis="raw") == 8).all()  # 2 tasks × r = 4
    for b in ("raw", "svd"):
        k = int(ds.n_directions.sel(basis=b).max())
        assert np.isfinite(ds.J.sel(basis=b).isel(direction=slice(0, k))).all()
    assert np.isfinite(ds.loss).all() and (ds.n_images == 8).all()
    assert ((ds.xi >= 0) & (ds.xi <= 1)).all()
    assert (ds.kappa_uniform >= 1).all() and (ds.kappa_J >= 1).all()
    np.testing.assert_allclose(ds.energy_fraction.sum("component"), 1.0, rtol=1e-12)
    hu = ds.J.mean("task")
    xr.testing.assert_allclose(hu.where(ds.direction_task >= 0), ds.h_uniform.where(ds.direction_task >= 0))
    store = Store("memory://anisotropy-test")
    key = store.key("anisotropy.jacobian_anisotropy", "1", taskset=micro_pair.taskset, batch_size=8, batches=1)
    store.put_dataset(key, ds)
    xr.testing.assert_identical(store.get_dataset(key).drop_attrs(deep=False), ds.drop_attrs(deep=False))
