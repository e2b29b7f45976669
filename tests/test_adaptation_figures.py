"""Adaptation figure functions draw from the study Datasets and label what they were computed on."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
from matplotlib.figure import Figure

from mergelab_figures import adaptation_figures as af


@pytest.mark.parametrize(("function", "name"), [
    (af.pareto_front, "preferences/pareto"),
    (af.preference_sensitivity, "preferences/cloud"),
    (af.stch_alpha_curve, "preferences/stch_alpha"),
    (af.adarank_masks, "adapt/adarank"),
    (af.adaptation_losses, "adapt/adarank"),
    (af.coefficient_trajectories, "adapt/adarank"),
])
def test_figures_draw_and_name_their_data(adaptation_studies, function, name):
    fig = function(adaptation_studies[name])
    assert isinstance(fig, Figure)
    assert "micro benchmark" in fig._suptitle.get_text()
    assert any(ax.has_data() for ax in fig.axes)


def test_pareto_front_draws_one_point_per_preference_and_every_baseline(adaptation_studies):
    ds = adaptation_studies["preferences/pareto"]
    ax = af.pareto_front(ds, split="val").axes[0]
    lines = [line for line in ax.get_lines()]
    assert len(lines) == ds.sizes["merge_method"] and all(len(line.get_xdata()) == ds.sizes["preference"] for line in lines)
    np.testing.assert_allclose(lines[0].get_xdata(), 100 * ds.accuracy.isel(merge_method=0).sel(split="val").isel(task=0).values)  # in %
    assert len(ax.collections) == ds.sizes["baseline"]


def test_several_pairs_draw_a_panel_each_with_one_legend(adaptation_studies):
    pareto, cloud = adaptation_studies["preferences/pareto"], adaptation_studies["preferences/cloud"]
    for fig, paper in ((af.pareto_fronts([pareto, pareto]), "001 Fig. 10"), (af.preference_sensitivities([cloud, cloud]), "001 Fig. 11")):
        panels = [ax for ax in fig.axes if ax.has_data()]
        assert len(panels) == 2 and all(ax.get_title() for ax in panels) and len(fig.legends) == 1
        labels = [t.get_text() for t in fig.legends[0].get_texts()]
        assert len(labels) == len(set(labels)) and paper in fig.get_suptitle()
    assert "fine-tuned models" in [t.get_text() for t in af.pareto_fronts([pareto]).legends[0].get_texts()]


def test_the_mask_grid_has_a_column_per_origin_and_a_row_per_block(adaptation_studies):
    histories = {"TA": adaptation_studies["adapt/adarank"], "CART": adaptation_studies["adapt/adarank_cart"]}
    fig = af.adarank_mask_grid(histories)
    panels = [ax for ax in fig.axes if ax.get_images()]
    layers = sorted({int(v) for v in histories["TA"].layer.values})
    assert len(panels) == 2 * len({layers[0], layers[len(layers) // 2], layers[-1]})
    assert panels[0].get_title() == f"TA: layer {layers[0]}" and panels[1].get_title() == f"CART: layer {layers[0]}"
    image = panels[1].get_images()[0].get_array()  # task × the top half of the component indices
    assert image.shape[0] == histories["CART"].sizes["task"] and "002 Fig. 5" in fig.get_suptitle()
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["pruned", "kept"]  # the colours are named


def test_adarank_ablation_table_matches_the_dataset(adaptation_studies):
    ds = adaptation_studies["ablations/adarank"]
    table = af.adarank_ablation_table(ds)
    assert list(table.columns) == ["coefficient λ", "binary mask B", "TA", "CART"]
    assert list(table["coefficient λ"]) == ["×", "✓", "×", "✓"] and list(table["binary mask B"]) == ["×", "×", "✓", "✓"]
    assert table.loc[3, "CART"] == round(100 * float(ds.average_accuracy.sel({"origin": "cart", "config": "both", "split": "test"})), 1)
    assert "micro benchmark" in table.attrs["dataset"]
