"""mergelab_figures.tables: the papers' result tables (003 Tab. 3 / 001 Tab. 1, 001 Tab. 3 and 10, 003 Tab. 4) from a hand-made results Dataset."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from helpers import synthetic_results

from mergelab_figures import tables

#: The study's order is not the registry's: the tables reorder methods and spaces.
RUNS = {("adarank_cart", "full"): [0.70, 0.10], ("tara_a", "full"): [0.30, 0.30], ("tsv+iso_c", "core"): [0.40, 0.30],
        ("tsv", "full"): [0.60, 0.70], ("ties", "core"): [0.66, 0.70], ("ties", "full"): [0.50, 0.72],
        ("task_arithmetic", "full"): [0.50, 0.50], ("ties", "knots"): [0.20, 0.20]}
ORDER = [("task_arithmetic", "full"), ("ties", "full"), ("ties", "knots"), ("ties", "core"), ("tsv", "full"),
         ("tsv+iso_c", "core"), ("tara_a", "full"), ("adarank_cart", "full")]


def _bold_cells(html: str) -> set[tuple[int, int]]:
    """(row, column) positions of the data cells a Styler's HTML sets in bold."""
    rules = re.findall(r"([^{}]+)\{\s*font-weight: bold;\s*\}", html)
    return {(int(r), int(c)) for rule in rules for r, c in re.findall(r"_row(\d+)_col(\d+)", rule)}


def test_methods_follow_the_registries_and_compositions_follow_their_first_part():
    assert tables.method_order(["iso_c", "tsv+iso_c", "adarank_cart", "adamerging_tas", "tsv", "adamerging", "ties"]) == [
        "ties", "tsv", "tsv+iso_c", "iso_c", "adamerging", "adamerging_tas", "adarank_cart"]


def test_the_per_task_table_has_the_papers_rows_columns_and_one_decimal():
    ds = synthetic_results(RUNS, finetuned=[0.8, 0.5], seeds=2)
    frame = tables.per_task_frame(ds)
    assert frame.index.names == ["method", "space"]
    assert list(frame.index) == [tables.FINETUNED, *ORDER]  # the fine-tuned row first, then registry order, spaces full/knots/core
    assert list(frame.columns) == ["a", "b", tables.AVG, tables.DELTA]
    assert list(frame.loc[tables.FINETUNED, ["a", "b", tables.AVG]]) == [80.0, 50.0, 65.0]  # absolute accuracies
    ties = frame.loc["ties"]
    assert list(ties["a"]) == [62.5, 25.0, 82.5] and list(ties["b"]) == [144.0, 40.0, 140.0]  # normalised by each task's expert, %
    assert list(ties[tables.AVG]) == [103.2, 32.5, 111.2]  # the mean of the unrounded values, then one decimal
    assert list(ties[tables.DELTA]) == [0.0, -70.8, 8.0]  # against TIES in full space
    assert np.isnan(frame.loc[("tsv+iso_c", "core"), tables.DELTA])  # no full-space run to compare with
    pd.testing.assert_frame_equal(frame.round(1), frame)  # one decimal
    absolute = tables.per_task_frame(ds, "acc", finetuned=False, delta=None)
    assert list(absolute.index) == ORDER and list(absolute.columns) == ["a", "b", tables.AVG]
    assert absolute.loc[("ties", "core"), "a"] == 66.0
    with pytest.raises(ValueError, match="metric 'hits@1'"):
        tables.per_task_frame(ds, "hits@1")


def test_the_styled_table_bolds_each_columns_best_merged_value_and_keeps_the_frame():
    ds = synthetic_results({**RUNS, ("tsv", "core"): [0.70, 0.30]}, finetuned=[0.8, 0.5])
    styler = tables.paper_table(ds)
    frame = styler.data
    pd.testing.assert_frame_equal(frame, tables.per_task_frame(ds))
    html = styler.to_html()
    rows, columns = list(frame.index), list(frame.columns)
    bold = _bold_cells(html)
    # a: TSV in Core space and AdaRank (CART) tie at 87.5 (both bold); b and Avg.: TIES in full / Core space; never the fine-tuned row
    assert bold == {(rows.index(("tsv", "core")), 0), (rows.index(("adarank_cart", "full")), 0), (rows.index(("ties", "full")), 1),
                    (rows.index(("ties", "core")), columns.index(tables.AVG))}
    assert "font-weight: bold" in html and ">87.5<" in html and ">+8.0<" in html and ">–<" in html  # one decimal, signed Δ, NaN
    assert "hand-made test numbers" in html and "003 Tab. 3" in html  # the caption says whose numbers these are


def test_the_joint_tables_show_hits_at_k_per_method_and_space_and_as_a_space_by_method_grid():
    ds = synthetic_results(RUNS)
    assert tables.has_joint(ds) and not tables.has_joint(synthetic_results(RUNS, joint=False))
    frame = tables.joint_frame(ds)
    assert list(frame.columns) == ["Hits@1", "Hits@3", "Hits@5"]
    assert list(frame.index) == [("zeroshot", "-"), ("finetuned", "-"), *ORDER]
    assert list(frame.loc[("ties", "core")]) == [58.0, 63.0, 68.0]
    bold = _bold_cells(tables.joint_table(ds).to_html())
    assert bold == {(list(frame.index).index(("ties", "core")), c) for c in range(3)}  # the experts' 70 % is not a merge
    grid = tables.joint_grid(ds)
    assert list(grid.data.index) == ["full", "knots", "core"]
    assert list(grid.data.columns) == ["task_arithmetic", "ties", "tsv", "tsv+iso_c", "tara_a", "adarank_cart"]
    assert grid.data.loc["core", "ties"] == 58.0 and np.isnan(grid.data.loc["knots", "tsv"])
    assert (2, 1) in _bold_cells(grid.to_html())  # TIES' best space: Core


def test_the_per_task_joint_table_has_a_row_per_method_space_and_hits_at_k_and_bolds_within_each_k():
    ds = synthetic_results(RUNS)
    styler = tables.joint_by_task_table(ds)
    frame = styler.data
    assert frame.index.names == ["method", "space", "metric"]
    hits = ["Hits@1", "Hits@3", "Hits@5"]
    assert list(frame.index) == [(r, "-", k) for r in ("zeroshot", "finetuned") for k in hits] + [(*run, k) for run in ORDER for k in hits]
    assert list(frame.columns) == ["a", "b", tables.AVG]
    assert list(frame.loc[("ties", "core", "Hits@3")]) == [61.0, 65.0, 63.0]  # per task: acc - 5 points; Avg.: the joint row
    assert [frame.loc[("ties", "core", k), tables.AVG] for k in hits] == list(tables.joint_frame(ds).loc[("ties", "core")])
    rows = list(frame.index)
    bold = _bold_cells(styler.to_html())
    # each Hits@k competes only with its own k: a's best is AdaRank (CART), b's TIES in full space, Avg. TIES in Core space
    for k in hits:
        assert {(rows.index(("adarank_cart", "full", k)), 0), (rows.index(("ties", "full", k)), 1),
                (rows.index(("ties", "core", k)), 2)} <= bold
    assert len(bold) == 9 and "001 Tab. 10" in styler.to_html()


def test_the_rank_table_puts_each_studys_mean_accuracies_side_by_side():
    r4 = synthetic_results({("tara_b", "full"): [0.6, 0.5], ("task_arithmetic", "full"): [0.5, 0.7], ("ties", "core"): [0.55, 0.6]},
                           finetuned=[0.8, 0.8])
    r16 = synthetic_results({("tara_b", "full"): [0.9, 0.7], ("task_arithmetic", "full"): [0.4, 0.4]}, finetuned=[1.0, 0.8])
    styler = tables.rank_table({"r = 4": r4, "r = 16": r16})
    frame = styler.data
    assert list(frame.columns) == [("r = 4", "Abs."), ("r = 4", "Norm."), ("r = 16", "Abs."), ("r = 16", "Norm.")]
    assert list(frame.index) == [("task_arithmetic", "full"), ("tara_b", "full")]  # what both ran, in registry order
    assert list(frame.loc[("task_arithmetic", "full")]) == [60.0, 75.0, 40.0, 45.0]  # Norm.: (0.4 / 1.0 + 0.4 / 0.8) / 2
    assert frame.loc[("tara_b", "full"), ("r = 16", "Norm.")] == 88.8
    rows = list(frame.index)
    assert _bold_cells(styler.to_html()) == {(rows.index(("task_arithmetic", "full")), 0), (rows.index(("task_arithmetic", "full")), 1),
                                             (rows.index(("tara_b", "full")), 2), (rows.index(("tara_b", "full")), 3)}
    assert "000 Tab. 13" in styler.to_html()
