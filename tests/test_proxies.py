"""TAS, AdaMMS* (004 Sec. 3.2, App. D-E) and the final-embedding L1 interference (003 App. C.1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from mergelab.analysis import proxies
from mergelab.experiments import model_analyses
from mergelab.errors import InputError
from mergelab.merging import merge
from mergelab.store import Store


def test_distances_by_hand():
    a = torch.tensor([[1.0, 2.0, 2.0], [0.0, 3.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(proxies.DISTANCES["l1"](a, b), torch.tensor([4.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(proxies.DISTANCES["l2"](a, b), torch.tensor([8**0.5, 4.0], dtype=torch.float64))
    torch.testing.assert_close(proxies.DISTANCES["cos"](a, b), torch.tensor([1 - 1 / 3, 2.0], dtype=torch.float64))


def test_adamms_scores_average_both_neighbours_and_leave_the_ends_undefined():
    scores = proxies.adamms_scores([1.0, 3.0, 0.5, 0.5])  # d(α0,α1), d(α1,α2), d(α2,α3), d(α3,α4)
    np.testing.assert_array_equal(scores[1:-1], [2.0, 1.75, 0.5])
    assert np.isnan(scores[0]) and np.isnan(scores[-1])
    assert proxies.select_adamms(dict(zip([0.1, 0.2, 0.3, 0.4, 0.5], scores, strict=True))) == 0.4


def test_select_by_tas_takes_the_lowest_score():
    assert proxies.select_by_tas({"lam=0.1": 2.0, "lam=0.3": 0.7, "lam=0.5": 0.9}) == "lam=0.3"
    with pytest.raises(InputError):
        proxies.select_by_tas({"a": float("nan")})


class _Recorder:
    """A task that records which splits are read and whether labels are used."""

    def __init__(self, task):
        self.task, self.splits = task, []

    def tensors(self, split):
        self.splits.append(split)
        return self.task.tensors(split)


def test_tas_is_zero_for_the_finetuned_model_and_reads_only_val_images(micro_pair):
    ts, backbone = micro_pair.taskset, micro_pair.backbone
    base = backbone.base_state()
    ft = {**base, **micro_pair.finetuned("digits")}
    task = _Recorder(micro_pair.bench.tasks["digits"])
    for d in proxies.DISTANCES:
        assert proxies.tas(backbone, task, ft, ft, distance=d, batch_size=8, batches=1) == pytest.approx(0.0, abs=1e-6)
    merged = merge(ts, "task_arithmetic", "full", alpha=0.3).apply(base)
    value = proxies.tas(backbone, task, merged, ft, batch_size=8, batches=2)
    f = backbone.encode_image(task.task.tensors("val")[0][:16], merged).detach().double()
    g = backbone.encode_image(task.task.tensors("val")[0][:16], ft).detach().double()
    assert value == pytest.approx(float((f - g).norm(dim=-1).mean()), rel=1e-9)
    assert set(task.splits) == {"val"}
    with pytest.raises(InputError, match="distance"):
        proxies.tas(backbone, task, merged, ft, distance="l3")


def test_task_alignment_dataset(micro_pair):
    merged = merge(micro_pair.taskset, "task_arithmetic", "full", alpha=0.3)
    ds = model_analyses.task_alignment(micro_pair, merged, distances=("l1", "l2"), batch_size=8, batches=1)
    assert ds.tas.dims == ("distance", "task") and (ds.tas > 0).all()
    xr.testing.assert_allclose(ds.tas_mean, ds.tas.mean("task"))
    base = micro_pair.backbone.base_state()
    same = model_analyses.task_alignment(micro_pair, merged.apply(base), batch_size=8, batches=1)
    assert float(same.tas.sel(distance="l2", task="digits")) == pytest.approx(float(ds.tas.sel(distance="l2", task="digits")))
    l1 = model_analyses.embedding_interference(micro_pair, merged, batch_size=8, batches=1)
    np.testing.assert_allclose(l1.l1_distance.values, ds.tas.sel(distance="l1").values, rtol=1e-12)


def test_tas_sweep_over_the_lambda_grid(micro_pair):
    ds = model_analyses.tas_sweep(micro_pair, lams=[0.1, 0.5, 1.0], batch_counts=(1, 2), batch_size=8, eval_split="val")
    assert ds.tas.dims == ("lam", "distance", "n_batches", "task")
    assert list(ds.distance.values) == ["l1", "l2", "cos"] and list(ds.n_batches.values) == [1, 2]
    assert np.isfinite(ds.tas).all() and np.isfinite(ds.accuracy).all()
    assert ds.adamms.isel(lam=[0, -1]).isnull().all() and np.isfinite(ds.adamms.isel(lam=1)).all()
    assert (ds.selected_lam_adamms == 0.5).all()  # the only interior value
    assert set(ds.selected_lam_tas.values.ravel().tolist()) <= {0.1, 0.5, 1.0}
    # the one-batch score equals tas() on the same images
    ts, backbone = micro_pair.taskset, micro_pair.backbone
    base = backbone.base_state()
    params = merge(ts, "task_arithmetic", "full", alpha=0.5).apply(base)
    expected = proxies.tas(backbone, micro_pair.bench.tasks["textures"], params, {**base, **micro_pair.finetuned("textures")},
                           distance="cos", batch_size=8, batches=1)
    assert float(ds.tas.sel(lam=0.5, distance="cos", n_batches=1, task="textures")) == pytest.approx(expected, rel=1e-9)
    store = Store("memory://tas-sweep-test")
    key = store.key("proxies.tas_sweep", "1", taskset=ts, lams=[0.1, 0.5, 1.0])
    store.put_dataset(key, ds)
    xr.testing.assert_identical(store.get_dataset(key).drop_attrs(deep=False), ds.drop_attrs(deep=False))
    with pytest.raises(InputError, match="at least 3"):
        model_analyses.tas_sweep(micro_pair, lams=[0.1, 0.2])


def test_registered_interference_round_trips(micro_pair):
    ds = model_analyses.embedding_interference_by_space(micro_pair, method="ties", hp={"density": 0.5, "alpha": 1.0},
                                                        batch_size=8, batches=1)
    assert ds.l1_distance.dims == ("space", "task") and list(ds.space.values) == ["full", "core"] and (ds.l1_distance > 0).all()
    assert ds.attrs["hp"] == {"density": 0.5, "alpha": 1.0} and ds.attrs["spaces"] == ["full", "core"]
    store = Store("memory://interference-test")
    key = store.key("interference.embedding_interference_by_space", "1", taskset=micro_pair.taskset, method="ties")
    store.put_dataset(key, ds)
    xr.testing.assert_identical(store.get_dataset(key).drop_attrs(deep=False), ds.drop_attrs(deep=False))
