"""Figure functions draw and say what they were computed on (Agg backend).

Figures of the weight-only analyses draw from tiny synthetic TaskSets; those of the model-dependent
ones (``needs="bench"``) from the real analyses on the rank-4 micro pair, computed once per session
(the ``bench_datasets`` fixture). Each analysis' figures are in ``analysis/<family>_figures.py``
(docs/extending.md, "A figure").
"""

from __future__ import annotations

import ast
import io

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
import xarray as xr
from matplotlib.figure import Figure

from conftest import REPO
from mergelab_figures import (anisotropy_figures, components_figures, core_space_figures, coverage_figures, geometry_figures,
                               proxies_figures, spectra_figures, style)
from mergelab_figures.style import PaperFigure
from mergelab.analysis import basis_ablation, core_space, coverage, geometry, spectra
from mergelab.experiments import model_analyses
from mergelab.experiments.registry import ANALYSES
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
    assert isinstance(fig, PaperFigure)  # every builder's figure is tidied when drawn (mergelab_figures.style)
    assert label in fig.get_suptitle()
    drawn = [ax for ax in fig.axes if ax.lines or ax.collections or ax.patches or ax.images]
    assert drawn, "no axes has anything drawn on it"
    fig.savefig(io.BytesIO(), format="png")  # renders (a bare Figure's canvas.draw() draws nothing)
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is not None:  # beside or below the data, never over it
            box, frame = legend.get_window_extent(), ax.get_window_extent()
            assert box.x0 >= frame.x1 - 1 or box.y1 <= frame.y0 + 1


def test_paper_style_integer_layer_ticks_distinct_series_and_outside_legends():
    fig = PaperFigure(figsize=(5, 3), layout="constrained")
    ax = fig.subplots()
    lines = [ax.plot([0, 1, 2, 3], [i, i + 1, i, i + 2], label=f"method {i}")[0] for i in range(20)]
    ax.set(xlabel="layer", ylabel="value")
    ax.legend(fontsize=6)
    fig.savefig(io.BytesIO(), format="png")
    assert all(float(t).is_integer() for t in ax.get_xticks())
    assert len({(line.get_color(), line.get_linestyle()) for line in lines}) == 20
    assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1 - 1
    assert len(ax.get_legend().get_texts()) == 20
    fig.savefig(io.BytesIO(), format="pdf")  # tidy is idempotent: the legend stays one legend
    assert len(ax.get_legend().get_texts()) == 20


def test_paper_style_turns_x_tick_labels_that_would_overlap():
    fig = PaperFigure(figsize=(3, 2), layout="constrained")
    crowded, roomy = fig.subplots(1, 2)
    names = ["adamerging_tas", "task_arithmetic", "tsv+iso_c", "dare_ties"]
    crowded.bar(names, [1, 2, 3, 4])
    roomy.bar(["a", "b"], [1, 2])
    fig.savefig(io.BytesIO(), format="png")
    assert {t.get_rotation() for t in crowded.get_xticklabels()} == {40.0}
    assert {t.get_rotation() for t in roomy.get_xticklabels()} == {0.0}


def test_paper_style_wraps_a_title_wider_than_its_figure():
    fig = PaperFigure(figsize=(3, 2), layout="constrained")
    fig.subplots().plot([0, 1])
    fig.suptitle("Average rank of merged updates (003 App. C.2)\ncomputed on: a benchmark whose name is far too long for this figure")
    fig.savefig(io.BytesIO(), format="png")
    assert fig.get_suptitle().count("\n") >= 2 and fig._suptitle.get_window_extent().width <= fig.bbox.width


FIGURES = REPO / "analysis" / "mergelab_figures"
FIGURE_MODULES = sorted(FIGURES.glob("*_figures.py")) + [FIGURES / "overview.py"]


@pytest.mark.parametrize("path", FIGURE_MODULES, ids=lambda p: p.stem)
def test_a_figure_module_imports_only_public_helpers_of_the_style_module(path):
    """docs/architecture.md, "Figures by Dataset family": no figure module reaches into another (nor
    for a private name); what they share is public in ``style`` (``overview`` also reads ``tables``)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mergelab_figures"):
            assert node.module in ("mergelab_figures.style", "mergelab_figures.tables"), f"{path.name} imports {node.module}"
            assert not [a.name for a in node.names if a.name.startswith("_")], f"{path.name} imports a private name of {node.module}"
        assert not (isinstance(node, ast.Import) and any(a.name.startswith("mergelab_figures") for a in node.names)), path.name
    assert len(path.read_text().splitlines()) <= 400, f"{path.name}: split it by Dataset family"


def test_the_family_table_names_every_figure_module_and_every_analysis():
    section = (REPO / "docs" / "architecture.md").read_text().partition("## Figures by Dataset family")[2]
    assert all(f"`{p.stem}`" in section for p in FIGURE_MODULES)
    assert [name for name in ANALYSES if f"`{name}`" not in section] == []


def test_coverage_figures(taskset):
    ds = _labelled(coverage.subspace_coverage(taskset))
    fig = coverage_figures.coverage_erank(ds)
    _check(fig)
    assert [ax.get_title() for ax in fig.axes[:5]] == ["q", "k", "v", "out", "mlp_in"]
    assert len(fig.axes[0].lines) == 3 and len(fig.axes[0].lines[0].get_xdata()) == 3  # three curves over three layers
    _check(coverage_figures.coverage_erank(ds, kinds=["q"]))
    fig = coverage_figures.energy_rank_per_task(ds)
    _check(fig)
    assert [ax.get_title() for ax in fig.axes[:2]] == ["layer 0 mlp_in", "layer 2 mlp_in"]  # first and last MLP


def test_geometry_figures(taskset):
    _check(geometry_figures.task_vector_norms(_labelled(geometry.norms(taskset))))
    fig = geometry_figures.task_vector_norms_per_layer(_labelled(geometry.norms(taskset)))
    _check(fig)
    assert len(fig.axes[0].lines) >= 4  # one line per task
    fig = geometry_figures.cosine_heatmap(_labelled(geometry.cosine_similarity(taskset)))
    _check(fig)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()][-1] == "Σ"
    _check(geometry_figures.similarity_across_lambda(_labelled(geometry.lambda_similarity(taskset))))


def test_merged_model_figures(taskset):
    single = _labelled(geometry.merged_similarity(taskset, _merged(taskset, "tsv", 0)))
    fig = geometry_figures.merged_cosines(single)
    _check(fig)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["tsv"]
    stacked = xr.concat([geometry.merged_similarity(taskset, _merged(taskset, m, i)) for i, m in enumerate(["average", "metagpt", "normavg"])],
                        dim=xr.DataArray(["average", "metagpt", "normavg"], dims="merge_method"))
    fig = geometry_figures.merged_cosines(_labelled(stacked))
    _check(fig)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["average", "metagpt", "normavg"]
    # a study stacks merge_method and space; a method missing from a space is no row
    by_space = xr.concat([stacked, stacked.isel(merge_method=[0])], dim=xr.DataArray(["full", "core"], dims="space"), join="outer")
    fig = geometry_figures.merged_cosines(_labelled(by_space))
    _check(fig)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["average/full", "average/core", "metagpt/full", "normavg/full"]

    _check(spectra_figures.merged_rank_summary(spectra.merged_rank(_merged(taskset, "ties", 1))), label="synthetic-seed11")
    ranks = xr.concat([xr.concat([spectra.merged_rank(_merged(taskset, m, i + j)) for j, _ in enumerate(("full", "core"))],
                                 dim=xr.DataArray(["full", "core"], dims="space")) for i, m in enumerate(("task_arithmetic", "ties"))],
                      dim=xr.DataArray(["task_arithmetic", "ties"], dims="merge_method"))
    _check(spectra_figures.merged_rank_summary(_labelled(ranks)))


def test_spectra_and_sar_figures(taskset):
    fig = spectra_figures.singular_spectra(_labelled(spectra.task_spectra(taskset)), module="visual.transformer.resblocks.1.attn.v_proj.weight")
    _check(fig)
    assert "layer 1 v" in fig.get_suptitle() and len(fig.axes[0].lines) == 4
    sar = _labelled(spectra.pairwise_sar(taskset))
    _check(spectra_figures.sar_heatmap(sar))
    _check(spectra_figures.sar_bars(sar))
    both = xr.concat([sar, spectra.pairwise_sar(taskset, retained=1.0)], dim=xr.DataArray(["full", "full r=1"], dims="space"))
    fig = spectra_figures.sar_bars(both)
    _check(fig)
    assert len(fig.axes[0].patches) == 2


def test_core_space_figures_and_tables(taskset):
    sub = taskset.restrict([r"visual\.transformer\.resblocks\.[01]\.attn\.(q|v)_proj\.weight"])
    truncation = _labelled(core_space.truncation_curves(sub))
    fig = core_space_figures.core_truncation_curves(truncation)
    _check(fig)
    assert len(fig.axes[0].lines) == 2 and [t.get_text() for t in fig.legends[0].get_texts()] == ["full space", "core space"]

    sar = _labelled(core_space.sar_by_space(sub))
    fig = spectra_figures.sar_heatmap(sar)
    _check(fig)
    assert [ax.get_title() for ax in fig.axes[:2]] == ["full space", "core space"]
    fig = spectra_figures.sar_bars(sar)
    _check(fig)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["full", "core"]

    bases = _labelled(basis_ablation.reference_basis_ablation(sub))
    table = core_space_figures.reference_basis_table(bases)
    assert list(table.index) == ["(1) first task", "(2) random orthonormal", "(3) concatenation (Eq. 3)"]
    assert table.attrs["dataset"] == LABEL
    assert table.loc["(3) concatenation (Eq. 3)", "Avg. ε_U"] < 1e-9 < table.loc["(1) first task", "Avg. ε_U"]
    assert table.loc["(1) first task", "Shape U"] == "m × 2"  # the first task has rank 2
    _check(core_space_figures.reference_basis_errors(bases))

    ranks = _labelled(core_space.merged_rank_grid(sub))
    fig = spectra_figures.merged_rank_summary(ranks)
    _check(fig)
    assert len(fig.axes[0].patches) >= 9  # three methods × three spaces
    table = spectra_figures.merged_rank_table(ranks)
    assert list(table.index) == ["full", "knots", "core"] and list(table.columns) == ["task_arithmetic", "tsv", "ties"]
    assert table.attrs["dataset"] == LABEL and table.attrs["total_lora_rank"] == 11.0
    assert table.loc["core", "task_arithmetic"] == float(ranks.merged_rank_mean.sel(space="core")[0])


def test_figures_draw_from_the_store_and_fall_back_to_the_base_name(taskset, tmp_path):
    store = Store(tmp_path / "store")
    key = store.key("coverage.subspace_coverage", "1", taskset=taskset)
    store.put_dataset(key, coverage.subspace_coverage(taskset))
    ds = store.get_dataset(key)
    _check(coverage_figures.coverage_erank(ds), label="synthetic-seed11")  # the producer's default label: the base name
    del ds.attrs["dataset"]
    assert style.UNLABELLED in coverage_figures.energy_rank_per_task(ds).get_suptitle()
    assert np.isfinite(ds.erank_aware.values).all()


def test_energy_rank_and_per_layer_norm_tables(taskset):
    coverage_ds = _labelled(coverage.subspace_coverage(taskset))
    table = coverage_figures.energy_rank_table(coverage_ds)
    assert table.shape == (15, 4) and list(table.columns) == ["digits", "textures", "signs", "landcover"]
    assert table.loc["layer 1 v", "landcover"] == int(coverage_ds.energy_rank.sel(task="landcover", module="visual.transformer.resblocks.1.attn.v_proj.weight"))
    assert (table.max() <= [2, 3, 2, 4]).all() and table.attrs["dataset"] == LABEL  # at most the LoRA rank

    norms = _labelled(geometry.norms(taskset))
    table = geometry_figures.task_vector_norms_per_layer_table(norms)
    assert list(table.columns) == ["Layer-1", "Layer-2", "Layer-3", "Avg."] and list(table.index) == ["digits", "textures", "signs", "landcover"]
    layer0 = [m for m in SHAPES if ".resblocks.0." in m]
    expected = float(np.sqrt((norms.norm.sel(task="signs", module=layer0) ** 2).sum()))
    assert table.loc["signs", "Layer-1"] == pytest.approx(expected)
    assert np.allclose((table.iloc[:, :3] ** 2).sum(axis=1), norms.total_norm.values ** 2)  # the layers partition the task vector
    assert table.loc["signs", "Avg."] == pytest.approx(table.loc["signs"].iloc[:3].mean())


# Model-dependent analyses (needs="bench") on Datasets of the real analysis functions ---------------------


def _bench(bench_datasets, name: str) -> xr.Dataset:
    """A labelled copy of a session-computed bench Dataset (the fixture's Datasets stay as computed)."""
    return bench_datasets[name].assign_attrs(dataset=LABEL)


def _panels(fig: Figure) -> list:
    """The visible panels that have a title (twin axes and hidden grid cells have none)."""
    return [ax for ax in fig.axes if ax.get_visible() and ax.axison and ax.get_title()]


@pytest.mark.parametrize(("name", "figure"), [("anisotropy", anisotropy_figures.jacobian_condition),
                                              ("components", components_figures.loss_change_per_component)], ids=["anisotropy", "components"])
def test_loss_based_analyses_use_the_papers_labelled_task_loss_and_say_so(bench_datasets, name, figure):
    ds = _bench(bench_datasets, name)
    assert ds.attrs["objective"] == "labels"  # 001 Eqs. 3-6 / 002 Eqs. 3-4: the task loss on val labels
    assert "loss: cross-entropy on val labels" in figure(ds).get_suptitle()
    entropy = ds.assign_attrs(objective="entropy")
    assert "prediction entropy (label-free)" in figure(entropy).get_suptitle()


def test_anisotropy_figures(bench_datasets):
    ds = _bench(bench_datasets, "anisotropy")
    T, modules = ds.sizes["task"], [str(m) for m in ds.module.values]
    q0 = next(m for m in modules if ds.sel(module=m).kind.item() == "q" and int(ds.sel(module=m).layer) == 0)

    fig = anisotropy_figures.jacobian_scree(ds)
    _check(fig)
    panels = _panels(fig)
    assert len(panels) == len(modules) and [ax.get_title() for ax in panels[:4]] == ["layer 0 q", "layer 0 k", "layer 0 v", "layer 0 out"]
    assert "001 App. E, Fig. 8" in fig.get_suptitle()
    raw, svd = panels[0].lines
    assert np.allclose(raw.get_ydata(), ds.energy_fraction.sel(basis="raw", module=q0).values)
    assert np.allclose(svd.get_ydata(), ds.energy_fraction.sel(basis="svd", module=q0).values)
    assert len(_panels(anisotropy_figures.jacobian_scree(ds, modules=[q0]))) == 1

    fig = anisotropy_figures.jacobian_condition(ds)
    _check(fig)
    assert [ax.get_title() for ax in fig.axes] == ["q", "k", "v", "out"] and fig.axes[0].get_yscale() == "log"
    q_modules = [m for m in modules if ds.sel(module=m).kind.item() == "q"]
    by_layer = ds.kappa_J.sel(basis="svd", module=q_modules).sortby("layer")
    assert np.allclose(fig.axes[0].lines[1].get_ydata(), by_layer.values)  # one module per layer: no averaging

    fig = anisotropy_figures.kappa_preferences(ds)
    _check(fig)
    assert len(fig.axes) == 8 and fig.axes[4].get_title() == "q, SVD basis"
    assert len(fig.axes[0].lines) == 1 + T  # ρ₁ uniform and one ρ₂ one-hot per task
    assert np.allclose(fig.axes[0].lines[0].get_ydata(), ds.kappa_uniform.sel(basis="raw", module=q_modules).sortby("layer").values)
    fig = anisotropy_figures.kappa_preferences(ds, bases=["raw"])
    assert len(fig.axes) == 4 and "Fig. 6 (RAW)" in fig.get_suptitle() and "Fig. 7" not in fig.get_suptitle()

    for basis, paper in (("raw", "Fig. 2"), ("svd", "Fig. 9")):
        fig = anisotropy_figures.xi_heatmap(ds, basis)
        _check(fig)
        assert paper in fig.get_suptitle()
        heat = [ax for ax in fig.axes if ax.get_title()]
        assert [ax.get_title() for ax in heat] == [f"ρ₂ one-hot: {t}" for t in ds.task.values]
        mesh = heat[1].collections[0].get_array().reshape(-1, 4)  # layers × (q, k, v, out)
        assert np.allclose(mesh[0, 0], float(ds.xi.sel(basis=basis, task=str(ds.task.values[1]), module=q0)))

    table = anisotropy_figures.anisotropy_table(ds)
    assert table.shape == (len(modules), 8) and table.attrs["dataset"] == f"{LABEL}; loss: cross-entropy on val labels"
    assert table.loc["layer 0 q", ("SVD", "κ(J)")] == float(ds.kappa_J.sel(basis="svd", module=q0))
    assert table.loc["layer 0 q", ("RAW", "mean ξ")] == pytest.approx(float(ds.xi.sel(basis="raw", module=q0).mean()))


def test_component_loss_figures(bench_datasets):
    ds = _bench(bench_datasets, "components")
    tasks = [str(t) for t in ds.task.values]
    module = [str(m) for m in ds.module.values if int(ds.sel(module=m).layer) == 3][0]

    fig = components_figures.loss_change_per_component(ds, module=module)
    _check(fig)
    assert "002 Sec. 4, Fig. 1" in fig.get_suptitle() and _module_label_in(fig, ds, module)
    panels = _panels(fig)
    ranks = [int(ds.energy_rank.sel(task=t, module=module)) for t in tasks]
    assert [ax.get_title() for ax in panels] == [f"source: {t} (energy rank {k})" for t, k in zip(tasks, ranks)]
    for ax, task in zip(panels, tasks):
        n = int(ds.n_components.sel(task=task, module=module))
        own, multi = ax.lines[:2]
        assert np.allclose(own.get_ydata(), ds.own_delta_loss.sel(task=task, module=module).values[:n])
        assert np.allclose(multi.get_ydata(), ds.multi_delta_loss.sel(task=task, module=module).values[:n])
    [legend] = fig.legends  # one for every panel: the series are the same
    assert [t.get_text() for t in legend.get_texts()][:2] == ["own task ΔL_i(r)", "multi-task ΔL(r)"]
    _check(components_figures.loss_change_per_component(ds))  # default module: the last analysed one
    inside = ds.assign(energy_rank=ds.energy_rank.clip(max=1))  # an energy rank among the components drawn: a vertical line
    ax = _panels(components_figures.loss_change_per_component(inside, module=module))[0]
    assert [list(line.get_xdata()) for line in ax.lines if line.get_linestyle() == "--"] == [[1, 1]]

    fig = components_figures.loss_change_per_task(ds, task="textures", module=module)
    _check(fig)
    lines = [line for line in fig.axes[0].lines if line.get_label().startswith("ΔL_")]
    assert [line.get_label() for line in lines] == [f"ΔL_{t}(r)" for t in ds.eval_task.values]
    dotted = [line for line in lines if line.get_linestyle() == ":"]
    assert len(dotted) == 1 and np.allclose(dotted[0].get_ydata(), ds.own_delta_loss.sel(task="textures", module=module).values)

    table = components_figures.component_loss_table(ds)
    assert len(table) == int(ds.n_components.sum()) and table.attrs["dataset"] == f"{LABEL}; loss: cross-entropy on val labels"
    row = table.loc[("digits", "layer 3 q", 2)]
    point = ds.sel(task="digits", module=[m for m in ds.module.values if str(m).endswith("3.attn.q_proj.weight")][0], component=2)
    assert row["ΔL(r)"] == float(point.multi_delta_loss) and row["energy rank"] == int(point.energy_rank)


def _module_label_in(fig: Figure, ds: xr.Dataset, module: str) -> bool:
    row = ds.sel(module=module)
    return f"layer {int(row.layer)} {row.kind.item()}" in fig.get_suptitle()


def test_tas_sweep_figures_and_tables(bench_datasets):
    ds = _bench(bench_datasets, "tas_sweep")
    tasks, lams = [str(t) for t in ds.task.values], ds.lam.values
    at = {"distance": "l2", "n_batches": 2}
    perf = 100 * ds.normalized_accuracy  # figures and tables give accuracies in %

    corr = proxies_figures.tas_correlation_table(ds)
    assert list(corr.index) == [*tasks, "mean"] and corr.attrs["distance"] == "l2" and corr.attrs["n_batches"] == 2
    assert corr.loc["mean", "Pearson r(TAS, perf)"] == pytest.approx(np.corrcoef(ds.tas_mean.sel(at), perf.mean("task"))[0, 1])
    interior = slice(1, -1)  # AdaMMS* has no score at the ends of the grid
    expected = np.corrcoef(ds.adamms.sel(**at, task="digits")[interior], perf.sel(task="digits")[interior])[0, 1]
    assert corr.loc["digits", "Pearson r(AdaMMS*, perf)"] == pytest.approx(expected)

    fig = proxies_figures.tas_vs_lambda(ds)
    _check(fig)
    panels = _panels(fig)
    assert [ax.get_title().split(" (")[0] for ax in panels] == [*tasks, "mean"]
    assert panels[-1].get_title() == f"mean (r = {corr.loc['mean', 'Pearson r(TAS, perf)']:+.2f})"
    assert np.allclose(panels[0].lines[0].get_ydata(), perf.sel(task=tasks[0]).values)
    selected = float(ds.selected_lam_tas.sel(at))
    assert [line.get_xdata()[0] for line in panels[0].lines[1:]] == [selected]  # the dashed line at argmin TAS
    twins = [ax for ax in fig.axes if ax not in panels and ax.lines]
    assert np.allclose(twins[-1].lines[0].get_ydata(), ds.tas_mean.sel(at).values)

    fig = proxies_figures.adamms_vs_tas(ds, distance="cos", n_batches=1)
    _check(fig)
    assert "004 App. D, Fig. 9" in fig.get_suptitle()
    twins = [ax for ax in fig.axes if ax not in _panels(fig) and ax.lines]
    scaled_adamms = twins[0].lines[1].get_ydata()
    assert np.isnan(scaled_adamms[[0, -1]]).all() and np.nanmin(scaled_adamms) == 0.0 and np.nanmax(scaled_adamms) == 1.0
    legend = [t.get_text() for t in _panels(fig)[-1].get_legend().get_texts()]
    assert {"λ (TAS)", "λ (AdaMMS*)", "best on eval", "TAS", "AdaMMS*"} <= set(legend)

    fig = proxies_figures.tas_robustness(ds)
    _check(fig)
    assert len(fig.axes[0].lines) == ds.sizes["n_batches"] and len(fig.axes[1].lines) == ds.sizes["distance"]
    assert np.allclose(fig.axes[1].lines[0].get_ydata(), perf.mean("task").values)

    table = proxies_figures.tas_selection_table(ds)
    assert table.shape[0] == ds.sizes["distance"] * ds.sizes["n_batches"] and table.attrs["dataset"] == LABEL
    assert table.loc[("cos", 1), "λ (AdaMMS*)"] == float(ds.selected_lam_adamms.sel(distance="cos", n_batches=1))
    best = float(lams[int(np.argmax(perf.mean("task").values))])
    assert table.loc[("l2", 2), "λ (best on eval)"] == best and table.loc[("l2", 2), "best perf"] == pytest.approx(float(perf.mean("task").max()))

    # without an evaluation axis (tas_sweep(accuracy=False)) the proxies are drawn alone
    blind = ds.assign(accuracy=ds.accuracy * np.nan, finetuned_accuracy=ds.finetuned_accuracy * np.nan,
                      normalized_accuracy=ds.normalized_accuracy * np.nan)
    for builder in (proxies_figures.tas_vs_lambda, proxies_figures.adamms_vs_tas, proxies_figures.tas_robustness):
        _check(builder(blind))
    assert proxies_figures.tas_correlation_table(blind).isna().all().all()
    assert np.isnan(proxies_figures.tas_selection_table(blind)["λ (best on eval)"]).all()


def test_embedding_interference_bars(bench_datasets, micro_pair, one_thread):
    ds = _bench(bench_datasets, "embedding_interference")  # the registry's: TSV + Iso-C in full and Core space
    T = ds.sizes["task"]
    fig = proxies_figures.embedding_interference_bars(ds)
    _check(fig)
    assert "003 App. C.1, Fig. 6" in fig.get_suptitle() and ds.attrs["method"] == "tsv+iso_c"
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [*map(str, ds.task.values), "mean"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["full", "core"]
    heights = [p.get_height() for p in ax.patches if p.get_height() > 0]
    expected = [v for space in ("full", "core") for v in (*ds.l1_distance.sel(space=space).values, float(ds.l1_distance_mean.sel(space=space)))]
    assert len(heights) == 2 * (T + 1) and np.allclose(heights, expected)

    one = model_analyses.merged_embedding_interference(micro_pair, method="ties", hp={"density": 0.5, "alpha": 1.0},
                                                       batch_size=8, batches=1).assign_attrs(dataset=LABEL)
    fig = proxies_figures.embedding_interference_bars(one)
    _check(fig)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["ties (full space)"]
    assert np.allclose([p.get_height() for p in fig.axes[0].patches if p.get_height() > 0],
                       [*one.l1_distance.values, float(one.l1_distance_mean)])


def test_model_figures_draw_from_the_store(bench_datasets, micro_pair, tmp_path):
    """Zarr round trip: string coords come back as StringDType, attrs as JSON."""
    store = Store(tmp_path / "store")
    back = {}
    for name, ds in bench_datasets.items():
        key = store.key(name, "test", n=1)
        store.put_dataset(key, ds)
        back[name] = store.get_dataset(key)
    for fig in (anisotropy_figures.jacobian_scree(back["anisotropy"]), anisotropy_figures.xi_heatmap(back["anisotropy"]),
                anisotropy_figures.kappa_preferences(back["anisotropy"]), components_figures.loss_change_per_task(back["components"]),
                proxies_figures.tas_vs_lambda(back["tas_sweep"]), proxies_figures.embedding_interference_bars(back["embedding_interference"]),
                core_space_figures.truncation_accuracy_curves(back["truncation_accuracy"])):
        _check(fig, label=bench_datasets["anisotropy"].attrs["dataset"])  # the producer's default label: the base name
    assert components_figures.component_loss_table(back["components"]).equals(components_figures.component_loss_table(bench_datasets["components"]))
    errors = basis_ablation.reference_basis_ablation(micro_pair.taskset)  # the same bases (seed 0) without the accuracy
    table = core_space_figures.reference_basis_accuracy_table(back["reference_basis_accuracy"], errors)
    assert list(table.columns[:3]) == ["Shape U", "Shape V", "Avg. norm. acc. (%)"] and list(table.columns[-2:]) == ["Avg. ε_U", "Avg. ε_V"]
    assert table.index[-1] == "(3) concatenation (Eq. 3)" and table.attrs["paper"] == "003 Sec. 5.2 (Tab. 5)"
    assert table.loc["(3) concatenation (Eq. 3)", "Avg. ε_U"] == pytest.approx(0.0, abs=1e-6)


def test_overview_heatmap_rows_line_up_when_methods_skip_spaces():
    from mergelab_figures import overview

    methods, spaces, tasks = ["task_arithmetic", "ties", "tsv"], ["full", "knots", "core"], ["a", "b"]
    score = np.full((3, 3, 1, 2, 1, 1), np.nan)
    score[0, 0], score[1, :], score[2, [0, 2]] = 0.5, 0.6, 0.7  # TA full only, TIES everywhere, TSV without KnOTS
    selected = ~np.isnan(score[:, :, :, 0, 0, :])
    ds = xr.Dataset({"score": (("merge_method", "space", "config", "task", "metric", "seed"), score),
                     "selected": (("merge_method", "space", "config", "seed"), selected)},
                    coords={"merge_method": methods, "space": spaces, "config": ["c"], "task": tasks, "metric": ["norm_acc"], "seed": [0]},
                    attrs={"tasks": tasks, "note": LABEL, "study": "s"})
    fig = overview.normalized_accuracy_by_task(ds)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["full space", "knots space", "core space"]
    for ax in panels:  # one shared row order; a method missing in a space is a blank row, not a shifted one
        assert [t.get_text() for t in ax.get_yticklabels()] in ([], methods)
    knots = panels[1]
    assert [round(float(t.get_text())) for t in knots.texts] == [60, 60]  # only TIES has values there
    assert "003 Tab. 3" in fig.get_suptitle()


def test_tas_against_performance_plots_every_configuration_and_the_tas_pick_against_the_best():
    from mergelab_figures import overview

    methods, spaces, configs, tasks = ["task_arithmetic", "ties"], ["full", "core"], ["c0", "c1", "c2"], ["a", "b"]
    norm = np.full((2, 2, 3, 2, 2, 1), np.nan)
    norm[0, 0, :, :, 0] = np.array([0.5, 0.7, 0.6])[:, None, None]  # TA in full space: three configurations
    norm[1, 1, :2, :, 0] = np.array([0.9, 0.8])[:, None, None]      # TIES in Core space: two
    norm[..., 1, :] = 1 - norm[..., 0, :] + 0.01 * np.arange(3)[None, None, :, None, None]  # TAS: lower with higher accuracy
    norm[1, 1, :, :, 1] = np.array([0.3, 0.1, np.nan])[:, None, None]  # ... except TIES', where TAS picks the worse one
    ds = xr.Dataset({"score": (("merge_method", "space", "config", "task", "metric", "seed"), norm)},
                    coords={"merge_method": methods, "space": spaces, "config": configs, "task": tasks,
                            "metric": ["norm_acc", "tas"], "seed": [0]}, attrs={"tasks": tasks, "note": LABEL, "study": "s"})
    assert overview.has_tas(ds) and not overview.has_tas(ds.assign(score=ds["score"].where(ds.metric != "tas")))
    fig = overview.tas_against_performance(ds)
    left, right = (ax for ax in fig.axes if ax.get_title())
    assert sum(len(c.get_offsets()) for c in left.collections) == 5  # every configuration with a score
    assert "Spearman" in left.get_title()
    picks = sorted(tuple(np.round(c.get_offsets()[0], 6)) for c in right.collections)
    assert picks == [(70.0, 70.0), (90.0, 80.0)]  # TA: TAS finds the best; TIES: TAS picks 80 % of the best 90 %
    assert "004 Fig. 4" in fig.get_suptitle() and LABEL in fig.get_suptitle()
    fig.savefig(io.BytesIO(), format="png")


def test_gains_with_intervals_place_each_gain_inside_its_error_bar_and_colour_the_significant_ones():
    from mergelab_figures import overview

    methods, spaces, tasks = ["task_arithmetic", "ties"], ["full", "core"], ["a", "b"]
    score = np.full((2, 2, 1, 2, 2, 1), np.nan)
    score[0, 0, 0, :, 0], score[1, 1, 0, :, 0] = 0.70, 0.75  # TA full 70 %, TIES core 75 % normalised
    ci = np.full((2, 2, 1, 2, 2), np.nan)
    ci[0, 0, 0, 0], ci[0, 0, 0, 1] = [0.0, 0.0], [0.05, 0.15]   # TA: vs itself 0, vs zero-shot significant
    ci[1, 1, 0, 0], ci[1, 1, 0, 1] = [0.01, 0.09], [0.10, 0.20]  # TIES: significant against both
    ds = xr.Dataset({"score": (("merge_method", "space", "config", "task", "metric", "seed"), score),
                     "selected": (("merge_method", "space", "config", "seed"), ~np.isnan(score[:, :, :, 0, 0, :])),
                     "gain_ci": (("merge_method", "space", "seed", "versus", "bound"), ci),
                     "reference_score": (("reference", "task", "metric"), np.array([[[0.6, 0.6]] * 2, [[1.0, 1.0]] * 2]))},
                    coords={"merge_method": methods, "space": spaces, "config": ["c"], "task": tasks, "metric": ["norm_acc", "acc"],
                            "seed": [0], "versus": ["task_arithmetic", "zeroshot"], "bound": ["low", "high"],
                            "reference": ["zeroshot", "finetuned"]}, attrs={"tasks": tasks, "note": LABEL, "study": "s"})
    assert overview.has_intervals(ds) and not overview.has_intervals(ds.drop_vars("gain_ci"))
    fig = overview.gains_with_intervals(ds)
    versus_ta, versus_zero = (ax for ax in fig.axes if ax.get_title())
    assert [t.get_text() for t in versus_ta.get_yticklabels()] == ["task_arithmetic (full)", "ties (core)"]
    points = versus_ta.collections[-1]
    assert np.allclose(points.get_offsets()[:, 0], [0.0, 5.0])  # gains in points over TA
    colours = points.get_facecolors()
    assert not np.allclose(colours[0], colours[1])  # TA vs itself [0, 0] is not significant, TIES' [+1, +9] is
    assert np.allclose(versus_zero.collections[-1].get_offsets()[:, 0], [10.0, 15.0])
    assert np.allclose(versus_zero.collections[-1].get_facecolors()[0], versus_zero.collections[-1].get_facecolors()[1])
    fig.savefig(io.BytesIO(), format="png")
