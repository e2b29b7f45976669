"""AdaRank's per-component loss changes ΔL_j(r) (002 Sec. 4, Eqs. (3)-(4))."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr

from mergelab.analysis.components import singular_components
from mergelab.experiments.model_analyses import component_loss_changes
from mergelab.errors import InputError
from mergelab.evaluation.heads import task_head
from mergelab.evaluation.metrics import predict
from mergelab.merging import merge
from mergelab.store import Store
from mergelab.synthetic import random_lowrank
from mergelab.taskset import Dense


def test_singular_components_reassemble_the_update():
    u = random_lowrank(7, 5, 3, torch.Generator().manual_seed(0))
    for update in (u, Dense(u.dense())):
        U, s, Vh = singular_components(update)
        assert s.numel() == 3 and bool((s[:-1] >= s[1:]).all())
        torch.testing.assert_close((U * s) @ Vh, u.dense(torch.float64), rtol=1e-6, atol=1e-7)


def _task_loss(backbone, task, params, n):
    """002 Eqs. 3-4's L_j: the cross-entropy of the zero-shot logits on the first n val labels."""
    images, labels = task.tensors("val")
    logits = predict(backbone, images[:n], task_head(backbone, task), params)
    return float(F.cross_entropy(logits.double(), labels[:n]))


def test_micro_loss_changes_match_an_independent_dense_route(micro_pair):
    ds = component_loss_changes(micro_pair, components=0.5, layers=[3], batch_size=8, batches=1)
    assert ds.delta_loss.dims == ("task", "module", "component", "eval_task")
    assert sorted(set(ds.layer.values.tolist())) == [3] and ds.sizes["module"] == 4
    assert (ds.n_components == 2).all() and ds.sizes["component"] == 2  # half of rank 4
    assert np.isfinite(ds.delta_loss).all() and np.isfinite(ds.base_loss).all()
    assert ((ds.energy_rank >= 1) & (ds.energy_rank <= 4)).all()
    xr.testing.assert_allclose(ds.multi_delta_loss, ds.delta_loss.sum("eval_task"))
    own = ds.delta_loss.sel(eval_task="digits", task="digits")
    xr.testing.assert_allclose(ds.own_delta_loss.sel(task="digits"), own.drop_vars("eval_task"))

    # Independent route: dense SVD of ΔW_i, MergedUpdate.apply, batched predict, float64 cross-entropy.
    ts, backbone = micro_pair.taskset, micro_pair.backbone
    name, i, r = "transformer.resblocks.3.attn.q_proj.weight", 1, 1  # textures' 2nd component
    U, s, Vh = torch.linalg.svd(ts.updates(name)[i].dense(torch.float64), full_matrices=False)
    theta_m = merge(ts.subset(["digits"]), "task_arithmetic", "full", alpha=0.3).apply(backbone.base_state())
    perturbed = dict(theta_m)
    perturbed[name] = theta_m[name] + (0.3 * s[r] * torch.outer(U[:, r], Vh[r])).float()
    task = micro_pair.bench.tasks["digits"]
    expected = _task_loss(backbone, task, perturbed, 8) - _task_loss(backbone, task, theta_m, 8)
    got = float(ds.delta_loss.sel(task="textures", module=name, component=r + 1, eval_task="digits"))
    assert got == pytest.approx(expected, rel=1e-3, abs=1e-6)
    assert float(ds.singular_value.sel(task="textures", module=name, component=r + 1)) == pytest.approx(float(s[r]), rel=1e-5)

    store = Store("memory://components-test")
    key = store.key("components.component_loss_changes", "1", taskset=ts, layers=[3])
    store.put_dataset(key, ds)
    xr.testing.assert_identical(store.get_dataset(key).drop_attrs(deep=False), ds.drop_attrs(deep=False))


def test_budget_is_validated(micro_pair):
    with pytest.raises(InputError, match="fraction"):
        component_loss_changes(micro_pair, components=0.0)
    with pytest.raises(InputError, match="selects no"):
        component_loss_changes(micro_pair, layers=[42])
