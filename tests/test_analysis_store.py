"""Every weight-only analysis Dataset writes to and reads back from the store, with warnings as errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from mergelab.analysis import basis_ablation, complexity, core_space, coverage, geometry, spectra
from mergelab.experiments.registry import ANALYSES
from mergelab.store import Store
from mergelab.synthetic import random_taskset
from mergelab.taskset import BaseRef, Dense, LowRank, MergedUpdate

SHAPES = {"transformer.resblocks.0.attn.in_proj_weight": (12, 4), "transformer.resblocks.1.mlp.c_fc.weight": (6, 4)}


def _taskset():
    return random_taskset(SHAPES, ["digits", "textures", "signs"], rank=[2, 3, 2], seed=7)


def _merged():
    g = torch.Generator().manual_seed(0)
    return MergedUpdate({"transformer.resblocks.0.attn.in_proj_weight": LowRank(torch.randn(12, 4, generator=g), torch.randn(4, 4, generator=g)),
                         "transformer.resblocks.1.mlp.c_fc.weight": Dense(torch.randn(6, 4, generator=g))},
                        BaseRef("synthetic-seed7"), {"method": "ties", "space": "full", "hp": {"density": 0.2}})


PRODUCERS = {
    "geometry.norms": lambda: geometry.norms(_taskset()),
    "geometry.cosine_similarity": lambda: geometry.cosine_similarity(_taskset()),
    "geometry.merged_similarity": lambda: geometry.merged_similarity(_taskset(), _merged()),
    "geometry.lambda_similarity": lambda: geometry.lambda_similarity(_taskset()),
    "coverage.subspace_coverage": lambda: coverage.subspace_coverage(_taskset()),
    "spectra.task_spectra": lambda: spectra.task_spectra(_taskset()),
    "spectra.pairwise_sar": lambda: spectra.pairwise_sar(_taskset()),
    "spectra.merged_rank": lambda: spectra.merged_rank(_merged()),
    "core_space.truncation_curves": lambda: core_space.truncation_curves(_taskset()),
    "core_space.sar_by_space": lambda: core_space.sar_by_space(_taskset()),
    "core_space.reference_basis_ablation": lambda: basis_ablation.reference_basis_ablation(_taskset()),
    "core_space.merged_rank_grid": lambda: core_space.merged_rank_grid(_taskset()),
    "complexity.operation_counts": lambda: complexity.operation_counts(_taskset()),
}


def test_every_weight_analysis_is_registered_under_its_producer_name():
    registered = {a.producer for a in ANALYSES.values() if a.needs in ("taskset", "merged")}
    assert registered == set(PRODUCERS)


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("producer", sorted(PRODUCERS))
def test_dataset_round_trips_through_the_store(producer, tmp_path):
    ds = PRODUCERS[producer]()
    store = Store(tmp_path / "store")
    version = next(a.version for a in ANALYSES.values() if a.producer == producer)
    key = store.key(producer, version, taskset=_taskset())
    store.put_dataset(key, ds)
    back = store.get_dataset(key)
    xr.testing.assert_identical(back.drop_attrs(deep=False), ds.drop_attrs(deep=False))
    for name, var in ds.variables.items():
        assert back[name].attrs == var.attrs
    attrs = {k: v for k, v in back.attrs.items() if k != "provenance"}
    assert attrs == {k: (list(v) if isinstance(v, tuple) else v) for k, v in ds.attrs.items()}
    assert back.attrs["provenance"]["producer"] == producer
    for dim in ({"module", "merge_method", "space"} & set(ds.dims)):  # strings survive (zarr 3 reads them as StringDType)
        assert back[dim].values.tolist() == ds[dim].values.tolist()
    assert np.isfinite(back[next(iter(back.data_vars))].values).any()


def test_model_analyses_are_registered_with_json_plain_parameters():
    """needs="bench" analyses: registered under their producer names, every parameter a plain JSON value."""
    import inspect
    import json

    bench = {a.producer: a for a in ANALYSES.values() if a.needs == "bench"}
    assert set(bench) == {"anisotropy.jacobian_anisotropy", "components.component_loss_changes",
                          "proxies.tas_sweep", "interference.embedding_interference_by_space", "core_space.truncation_accuracy",
                          "core_space.reference_basis_accuracy"}
    for analysis in bench.values():
        first, *rest = inspect.signature(analysis.fn).parameters.values()
        assert first.name == "session"
        for p in rest:
            assert p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
            json.dumps(p.default)  # tuples serialise as lists; no tensors, no objects
