"""Preference studies (001 Figs. 3, 4, 10, 11; 000 Fig. 10) and the AdaRank ablation (002 Tab. 4) as Datasets."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from mergelab.experiments.preferences import covariance_ellipse, pareto_preferences, sample_preferences
from mergelab.errors import InputError
from mergelab.store import Store

ADAPT_TASKS = ("signs", "housenumbers", "digits")  # tests/conftest.py builds the studies on these


def test_pareto_preferences_span_the_two_task_simplex():
    rho = pareto_preferences(5)
    np.testing.assert_allclose(rho.sum(1), 1.0)
    np.testing.assert_allclose(rho[:, 0], [0, 0.25, 0.5, 0.75, 1.0])
    with pytest.raises(InputError):
        pareto_preferences(1)


def test_sampled_preferences_fix_the_focal_tasks_and_are_seeded():
    rho = sample_preferences(8, [3, 7], n=30, focal_weight=0.125, seed=4)
    assert rho.shape == (30, 8)
    np.testing.assert_allclose(rho.sum(1), 1.0)
    np.testing.assert_allclose(rho[:, [3, 7]], 0.125)
    assert (rho >= 0).all() and np.ptp(rho[:, 0]) > 0.05  # the other tasks really vary
    np.testing.assert_array_equal(rho, sample_preferences(8, [3, 7], n=30, focal_weight=0.125, seed=4))
    assert not np.allclose(rho, sample_preferences(8, [3, 7], n=30, focal_weight=0.125, seed=5))
    with pytest.raises(InputError):
        sample_preferences(3, [0, 1], focal_weight=0.6)


def test_covariance_ellipse_recovers_a_known_covariance():
    rng = np.random.default_rng(0)
    angle = np.radians(30.0)
    R = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    cov = R @ np.diag([4.0, 0.25]) @ R.T
    points = rng.multivariate_normal([1.0, -2.0], cov, size=20000)
    e = covariance_ellipse(points, n_std=2.0)
    np.testing.assert_allclose(e["mean"], [1.0, -2.0], atol=0.05)
    np.testing.assert_allclose(e["covariance"], cov, atol=0.08)
    assert e["width"] == pytest.approx(2 * 2 * 2.0, rel=0.02) and e["height"] == pytest.approx(2 * 2 * 0.5, rel=0.02)
    assert e["angle"] % 180 == pytest.approx(30.0, abs=1.0)


def test_pareto_sweep_dataset(adaptation_studies, micro):
    ds = adaptation_studies["preferences/pareto"]
    assert ds.accuracy.dims == ("merge_method", "preference", "task", "split")
    assert ds.sizes == {"merge_method": 2, "preference": 3, "task": 2, "split": 2, "baseline": 6}
    assert list(ds.task.values) == list(ADAPT_TASKS[:2])
    assert list(ds.baseline.values) == ["zeroshot", "task_arithmetic", "ties@knots", "lora_lego@full",  # 001 Fig. 3's points
                                        f"finetuned_{ADAPT_TASKS[0]}", f"finetuned_{ADAPT_TASKS[1]}"]
    assert ds.attrs["scalarization"] == {"tara_b": "stch", "adamerging": "sum"} and ds.attrs["adaptation_split"] == "val"
    acc = ds.accuracy.values
    assert np.isfinite(acc).all() and ((acc >= 0) & (acc <= 1)).all()
    base = ds.baseline_accuracy.sel(split="test")
    for t in ds.task.values:  # each fine-tuned model beats zero-shot on its own task (the micro adapters learned)
        assert float(base.sel(baseline=f"finetuned_{t}", task=t)) > float(base.sel(baseline="zeroshot", task=t))
    from mergelab.merging import merge
    from mergelab.bench import BenchSession, MicroSpec, load_bench

    session = BenchSession(load_bench(MicroSpec(root=micro.root, rank=4), list(ADAPT_TASKS[:2])))
    knots = session.weights(merge(session.taskset, "ties", "knots"))
    assert float(base.sel(baseline="ties@knots", task=ADAPT_TASKS[0])) == session.accuracy(ADAPT_TASKS[0], "test", knots)[0]


def test_sensitivity_cloud_dataset(adaptation_studies):
    ds = adaptation_studies["preferences/cloud"]
    np.testing.assert_allclose(ds.weight.sel(task=list(ADAPT_TASKS[:2])).values, 0.125)
    np.testing.assert_allclose(ds.weight.sum("task").values, 1.0)
    for method in ds.merge_method.values:
        for split in ds.split.values:
            points = ds.accuracy.sel(merge_method=method, split=split).values  # (preference, focal)
            np.testing.assert_allclose(ds["mean"].sel(merge_method=method, split=split).values, points.mean(0))
            np.testing.assert_allclose(ds.covariance.sel(merge_method=method, split=split).values, np.cov(points.T), atol=1e-12)


def test_stch_alpha_and_adarank_ablation_datasets(adaptation_studies):
    ds = adaptation_studies["preferences/stch_alpha"]
    assert ds.normalized_accuracy.dims == ("merge_method", "alpha", "task", "split")
    np.testing.assert_allclose(ds.normalized_accuracy, ds.accuracy / ds.finetuned_accuracy)
    ab = adaptation_studies["ablations/adarank"]
    assert list(ab.config.values) == ["none", "lambda", "mask", "both"]
    assert ab.average_accuracy.dims == ("origin", "config", "split")


def test_adarank_history_records_mask_fractions(adaptation_studies):
    for name in ("adapt/adarank", "adapt/adarank_cart"):
        h = adaptation_studies[name]
        kept = h.mask_kept_fraction
        assert kept.dims == ("record", "module", "task") and ((kept >= 0) & (kept <= 1)).all()
        assert h.attrs["space"] == "full" and "layer" in h.coords
    ta, cart = (adaptation_studies[n].mask_kept_fraction.isel(record=0) for n in ("adapt/adarank", "adapt/adarank_cart"))
    assert float(ta.min()) == 1.0  # the TA origin starts from every singular component
    assert float(cart.max()) < 1.0  # the CART origin keeps the top k of the centred components per task
    for name in ("adapt/adarank", "adapt/adarank_cart"):  # the masks themselves (002 Fig. 5): their share is the kept fraction
        h = adaptation_studies[name]
        assert h["mask"].dims == ("record", "module", "task", "component") and h.component.values[0] == 1
        np.testing.assert_allclose(h["mask"].mean("component", skipna=True).values, h.mask_kept_fraction.values)
        assert set(np.unique(h["mask"].values[~np.isnan(h["mask"].values)])) <= {0.0, 1.0}
    assert "mask" not in adaptation_studies["adapt/adamerging_tas"]


def test_study_datasets_round_trip_through_a_store(adaptation_studies):
    store = Store("memory://adaptation-studies")
    for name, ds in adaptation_studies.items():
        key = store.key("test.adaptation", "1", name=name)
        store.put_dataset(key, ds)
        store.set_ref(f"studies/micro/{name}", key)
        back = store.get_dataset(store.ref(f"studies/micro/{name}"))
        assert set(back.data_vars) == set(ds.data_vars)
        xr.testing.assert_allclose(back.drop_vars([c for c in back.coords if back[c].dtype.kind not in "if"]),
                                   ds.drop_vars([c for c in ds.coords if ds[c].dtype.kind not in "if"]))
        for c in ds.coords:
            assert [str(v) for v in np.ravel(back[c].values)] == [str(v) for v in np.ravel(ds[c].values)]
        assert back.attrs.get("dataset") == ds.attrs["dataset"]
