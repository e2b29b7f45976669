"""Figure functions draw from tiny synthetic Datasets and say what they were computed on (Agg backend)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
import xarray as xr
from matplotlib.figure import Figure

from analysis import figures
from mergelab.analysis import core_space, coverage, geometry, spectra
from mergelab.store import Store
from mergelab.synthetic import random_taskset
from mergelab.taskset import BaseRef, Dense, LowRank, MergedUpdate

SHAPES = {f"visual.transformer.resblocks.{i}.{p}.weight": (8, 6) for i in range(3)
          for p in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.c_fc")}
LABEL = "micro benchmark (synthetic test adapters)"


@pytest.fixture(scope="module")
def taskset():
    return random_taskset(SHAPES, ["digits", "textures", "signs", "landcover"], rank=[2, 3, 2, 4], seed=11)


def _merged(taskset, method: str, seed: int) -> MergedUpdate:
    g = torch.Generator().manual_seed(seed)
    modules = {m: (LowRank(torch.randn(8, 3, generator=g), torch.randn(3, 6, generator=g)) if method != "ties"
                   else Dense(torch.randn(8, 6, generator=g))) for m in taskset.module_names}
    return MergedUpdate(modules, BaseRef("synthetic-seed11"), {"method": method, "space": "full"})


def _labelled(ds: xr.Dataset) -> xr.Dataset:
    ds.attrs["dataset"] = LABEL
    return ds


def _check(fig: Figure, label: str = LABEL) -> None:
    assert isinstance(fig, Figure)
    assert label in fig.get_suptitle()
    drawn = [ax for ax in fig.axes if ax.lines or ax.collections or ax.patches or ax.images]
    assert drawn, "no axes has anything drawn on it"
    fig.canvas.draw()  # renders on Agg without error


def test_coverage_figures(taskset):
    ds = _labelled(coverage.subspace_coverage(taskset))
    fig = figures.coverage_erank(ds)
    _check(fig)
    assert [ax.get_title() for ax in fig.axes[:5]] == ["q", "k", "v", "out", "mlp_in"]
    assert len(fig.axes[0].lines) == 3 and len(fig.axes[0].lines[0].get_xdata()) == 3  # three curves over three layers
    _check(figures.coverage_erank(ds, kinds=["q"]))
    fig = figures.energy_rank_per_task(ds)
    _check(fig)
    assert [ax.get_title() for ax in fig.axes[:2]] == ["layer 0 mlp_in", "layer 2 mlp_in"]  # first and last MLP


def test_geometry_figures(taskset):
    _check(figures.task_vector_norms(_labelled(geometry.norms(taskset))))
    fig = figures.task_vector_norms_per_layer(_labelled(geometry.norms(taskset)))
    _check(fig)
    assert len(fig.axes[0].lines) >= 4  # one line per task
    fig = figures.cosine_heatmap(_labelled(geometry.cosine_similarity(taskset)))
    _check(fig)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()][-1] == "Σ"
    _check(figures.similarity_across_lambda(_labelled(geometry.lambda_similarity(taskset))))


def test_merged_model_figures(taskset):
    single = _labelled(geometry.merged_similarity(taskset, _merged(taskset, "tsv", 0)))
    fig = figures.merged_cosines(single)
    _check(fig)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["tsv"]
    stacked = xr.concat([geometry.merged_similarity(taskset, _merged(taskset, m, i)) for i, m in enumerate(["average", "metagpt", "normavg"])],
                        dim=xr.DataArray(["average", "metagpt", "normavg"], dims="method"))
    fig = figures.merged_cosines(_labelled(stacked))
    _check(fig)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["average", "metagpt", "normavg"]
    # a study stacks method and space; a method missing from a space is no row
    by_space = xr.concat([stacked, stacked.isel(method=[0])], dim=xr.DataArray(["full", "core"], dims="space"), join="outer")
    fig = figures.merged_cosines(_labelled(by_space))
    _check(fig)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["average/full", "average/core", "metagpt/full", "normavg/full"]

    _check(figures.merged_rank_summary(spectra.merged_rank(_merged(taskset, "ties", 1))), label="synthetic-seed11")
    ranks = xr.concat([xr.concat([spectra.merged_rank(_merged(taskset, m, i + j)) for j, _ in enumerate(("full", "core"))],
                                 dim=xr.DataArray(["full", "core"], dims="space")) for i, m in enumerate(("task_arithmetic", "ties"))],
                      dim=xr.DataArray(["task_arithmetic", "ties"], dims="method"))
    _check(figures.merged_rank_summary(_labelled(ranks)))


def test_spectra_and_sar_figures(taskset):
    fig = figures.singular_spectra(_labelled(spectra.task_spectra(taskset)), module="visual.transformer.resblocks.1.attn.v_proj.weight")
    _check(fig)
    assert "layer 1 v" in fig.get_suptitle() and len(fig.axes[0].lines) == 4
    sar = _labelled(spectra.pairwise_sar(taskset))
    _check(figures.sar_heatmap(sar))
    _check(figures.sar_bars(sar))
    both = xr.concat([sar, spectra.pairwise_sar(taskset, retained=1.0)], dim=xr.DataArray(["full", "full r=1"], dims="space"))
    fig = figures.sar_bars(both)
    _check(fig)
    assert len(fig.axes[0].patches) == 2


def test_core_space_figures_and_tables(taskset):
    sub = taskset.restrict([r"visual\.transformer\.resblocks\.[01]\.attn\.(q|v)_proj\.weight"])
    truncation = _labelled(core_space.truncation_curves(sub))
    fig = figures.core_truncation_curves(truncation)
    _check(fig)
    assert len(fig.axes[0].lines) == 2 and [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["full space", "core space"]

    sar = _labelled(core_space.sar_by_space(sub))
    fig = figures.sar_heatmap(sar)
    _check(fig)
    assert [ax.get_title() for ax in fig.axes[:2]] == ["full space", "core space"]
    fig = figures.sar_bars(sar)
    _check(fig)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["full", "core"]

    bases = _labelled(core_space.reference_basis_ablation(sub))
    table = figures.reference_basis_table(bases)
    assert list(table.index) == ["(1) first task", "(2) random orthonormal", "(3) concatenation (Eq. 3)"]
    assert table.attrs["dataset"] == LABEL
    assert table.loc["(3) concatenation (Eq. 3)", "Avg. ε_U"] < 1e-9 < table.loc["(1) first task", "Avg. ε_U"]
    assert table.loc["(1) first task", "Shape U"] == "m × 2"  # the first task has rank 2
    _check(figures.reference_basis_errors(bases))

    ranks = _labelled(core_space.merged_rank_grid(sub))
    fig = figures.merged_rank_summary(ranks)
    _check(fig)
    assert len(fig.axes[0].patches) >= 9  # three methods × three spaces
    table = figures.merged_rank_table(ranks)
    assert list(table.index) == ["full", "knots", "core"] and list(table.columns) == ["task_arithmetic", "tsv", "ties"]
    assert table.attrs["dataset"] == LABEL and table.attrs["total_lora_rank"] == 11.0
    assert table.loc["core", "task_arithmetic"] == float(ranks.merged_rank_mean.sel(space="core")[0])


def test_figures_draw_from_the_store_and_fall_back_to_the_base_name(taskset, tmp_path):
    store = Store(tmp_path / "store")
    key = store.key("coverage.subspace_coverage", "1", taskset=taskset)
    store.put_dataset(key, coverage.subspace_coverage(taskset))
    ds = store.get_dataset(key)
    _check(figures.coverage_erank(ds), label="synthetic-seed11")  # the producer's default label: the base name
    del ds.attrs["dataset"]
    assert figures.UNLABELLED in figures.energy_rank_per_task(ds).get_suptitle()
    assert np.isfinite(ds.erank_aware.values).all()


def test_energy_rank_and_per_layer_norm_tables(taskset):
    coverage_ds = _labelled(coverage.subspace_coverage(taskset))
    table = figures.energy_rank_table(coverage_ds)
    assert table.shape == (15, 4) and list(table.columns) == ["digits", "textures", "signs", "landcover"]
    assert table.loc["layer 1 v", "landcover"] == int(coverage_ds.energy_rank.sel(task="landcover", module="visual.transformer.resblocks.1.attn.v_proj.weight"))
    assert (table.max() <= [2, 3, 2, 4]).all() and table.attrs["dataset"] == LABEL  # at most the LoRA rank

    norms = _labelled(geometry.norms(taskset))
    table = figures.task_vector_norms_per_layer_table(norms)
    assert list(table.columns) == ["Layer-1", "Layer-2", "Layer-3", "Avg."] and list(table.index) == ["digits", "textures", "signs", "landcover"]
    layer0 = [m for m in SHAPES if ".resblocks.0." in m]
    expected = float(np.sqrt((norms.norm.sel(task="signs", module=layer0) ** 2).sum()))
    assert table.loc["signs", "Layer-1"] == pytest.approx(expected)
    assert np.allclose((table.iloc[:, :3] ** 2).sum(axis=1), norms.total_norm.values ** 2)  # the layers partition the task vector
    assert table.loc["signs", "Avg."] == pytest.approx(table.loc["signs"].iloc[:3].mean())
