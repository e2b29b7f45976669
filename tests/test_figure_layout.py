"""Every figure a tagged notebook cell draws passes the layout checks a reviewer applies
(:func:`mergelab_figures.layout.layout_problems`: no legend over labels or data, no text over
another panel's text, nothing clipped by the canvas, accuracies in %).

The figures are the notebooks' own: each ``paper:<item>`` cell's calls of a figure builder
(``<family>_figures.*``, ``af.*``, ``overview.*`` returning a Figure) are read from the
notebook and evaluated on the synthetic Datasets below, named as the notebook names them. The
Datasets have the demo's sizes where the layout depends on them (8 tasks with the micro
benchmark's names, 4 blocks × q/k/v/out, every method × space of studies/micro.yaml) and
hand-made numbers: nothing here runs an analysis that needs a model. A tagged cell that calls a
builder on a name this module does not define fails the test: give it a Dataset here.
"""

from __future__ import annotations

import ast
import typing

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
import xarray as xr
from helpers import synthetic_results
from matplotlib.figure import Figure

from mergelab_figures import adaptation_figures as af
from mergelab_figures import (anisotropy_figures, complexity_figures, components_figures, core_space_figures, coverage_figures,
                              geometry_figures, overview, proxies_figures, spectra_figures)
from mergelab_figures.layout import layout_problems
from mergelab_app.report import list_notebooks, read_notebook
from mergelab_app.report_export import REPO, paper_items
from mergelab.analysis import basis_ablation, complexity, core_space, coverage, geometry, spectra
from mergelab.synthetic import random_lowrank
from mergelab.taskset import BaseRef, LowRank, MergedUpdate, TaskSet, TaskUpdate

TASKS = ["aerial", "digits", "housenumbers", "landcover", "scenes", "signs", "textures", "vehicles"]
KINDS = {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "out": "attn.out_proj"}
MODULES = {f"transformer.resblocks.{layer}.{name}.weight": (layer, kind) for layer in range(4) for kind, name in KINDS.items()}
LABEL = "micro benchmark (synthetic layout-test numbers)"
#: The model-dependent analyses' tasks: five give a second row of panels (four a row) and a legend of six entries.
BENCH_TASKS = TASKS[:5]
#: The demo's method × space runs (studies/micro.yaml), adaptive ones last.
RUNS = [("task_arithmetic", "full"), *((m, s) for m in ("ties", "dare_ties", "tsv", "iso_c", "cart") for s in ("full", "core")),
        ("ties", "knots"), ("tsv+iso_c", "core"), ("linear", "full"), ("svd", "full"), ("average", "full"),
        *((m, "full") for m in ("adamerging", "adamerging_tas", "tara_a", "tara_b", "adarank", "adarank_cart"))]
MODULES_BUILDERS = {module.__name__.rpartition(".")[2]: module for module in (
    anisotropy_figures, complexity_figures, components_figures, core_space_figures, coverage_figures, geometry_figures, proxies_figures,
    spectra_figures, overview)} | {"af": af}


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _modules(ds: xr.Dataset, names=None) -> xr.Dataset:
    names = list(names or MODULES)
    return ds.assign_coords(module=names, layer=("module", [MODULES[m][0] for m in names]),
                            kind=("module", [MODULES[m][1] for m in names]))


# Weight-only analyses: the library's own on a tiny random task set with the micro module names ------


@pytest.fixture(scope="module")
def taskset() -> TaskSet:
    """Rank-4 updates of the micro modules whose norms differ by task, as the micro tasks' do."""
    g = torch.Generator().manual_seed(3)
    return TaskSet(tuple(TaskUpdate(task, {m: random_lowrank(12, 10, 4, g, scale=0.5 + 0.3 * i) for m in MODULES}, source="synthetic")
                         for i, task in enumerate(TASKS)), BaseRef("synthetic"))


def _merged(taskset) -> MergedUpdate:
    rng = _rng(1)
    modules = {m: LowRank(torch.tensor(rng.normal(size=(12, 4))), torch.tensor(rng.normal(size=(4, 10)))) for m in taskset.module_names}
    return MergedUpdate(modules, BaseRef("synthetic"), {"method": "task_arithmetic", "space": "full"})


def _weight_datasets(taskset) -> dict[str, xr.Dataset]:
    """Layers and kinds in full where panels or curves follow them; the analyses drawn per task, space or
    basis on two modules (half the tasks where the figure does not show tasks: they cost most of the time)."""
    two = taskset.restrict([r".*resblocks\.[03]\.attn\.q_proj.*"])
    sub = TaskSet(two.tasks[:4], two.base)
    merged = _merged(taskset)
    stacked = xr.concat([geometry.merged_similarity(taskset, merged)] * 3,
                        dim=xr.DataArray(["task_arithmetic", "ties", "tsv"], dims="merge_method"))
    return {"coverage": coverage.subspace_coverage(taskset), "norms": geometry.norms(taskset),
            "cosine": geometry.cosine_similarity(taskset), "lambda_similarity": geometry.lambda_similarity(taskset),
            "merged_similarity": stacked, "operation_counts": complexity.operation_counts(taskset),
            "truncation": core_space.truncation_curves(sub), "sar_spaces": core_space.sar_by_space(sub),
            "reference_bases": basis_ablation.reference_basis_ablation(sub), "merged_rank_spaces": core_space.merged_rank_grid(sub),
            "spectra": spectra.task_spectra(two), "merged_rank": spectra.merged_rank(merged), "sar": spectra.pairwise_sar(two)}


# Model-dependent analyses: their schemas (docs/store.md §7-8) with made-up numbers ----------------------


def anisotropy(tasks=BENCH_TASKS, components: int = 8, layers=(0, 3)) -> xr.Dataset:
    """On the first and last block: two rows of panels in 001 Fig. 8, two points per curve in Figs. 6-7."""
    names = [m for m in MODULES if MODULES[m][0] in layers]
    rng, m, t = _rng(2), len(names), len(tasks)
    energy = np.sort(rng.dirichlet(np.ones(components), size=(2, m)), axis=-1)[..., ::-1]
    ds = xr.Dataset({"energy_fraction": (("basis", "module", "component"), energy),
                     "kappa_J": (("basis", "module"), 10 ** rng.uniform(0, 2, (2, m))),
                     "kappa_uniform": (("basis", "module"), 10 ** rng.uniform(0, 3, (2, m))),
                     "kappa_onehot": (("basis", "task", "module"), 10 ** rng.uniform(0, 3, (2, t, m))),
                     "xi": (("basis", "task", "module"), rng.uniform(0, 1, (2, t, m)))},
                    coords={"basis": ["raw", "svd"], "task": list(tasks), "component": np.arange(1, components + 1)},
                    attrs={"objective": "labels"})
    return _modules(ds, names)


def components(tasks=BENCH_TASKS, n: int = 16, layers=(3,)) -> xr.Dataset:
    """The companion study's: every component of rank-``n`` updates of the last block (``n = 1``: the demo's)."""
    rng, names = _rng(3), [m for m in MODULES if MODULES[m][0] in layers]
    t, m = len(tasks), len(names)
    delta = rng.normal(0, 0.02, (t, m, n, t))
    return _modules(xr.Dataset({"delta_loss": (("task", "module", "component", "eval_task"), delta),
                                "own_delta_loss": (("task", "module", "component"), np.einsum("imri->imr", delta)),
                                "multi_delta_loss": (("task", "module", "component"), delta.sum(-1)),
                                "singular_value": (("task", "module", "component"), np.sort(rng.uniform(0.1, 2, (t, m, n)))[..., ::-1]),
                                "n_components": (("task", "module"), np.full((t, m), n)),
                                "energy_rank": (("task", "module"), rng.integers(max(1, n // 2), n + 1, (t, m)))},
                               coords={"task": list(tasks), "eval_task": list(tasks), "component": np.arange(1, n + 1)},
                               attrs={"objective": "labels", "energy": 0.95, "rank": n}), names)


def tas_sweep(tasks=BENCH_TASKS) -> xr.Dataset:
    rng, lams = _rng(4), np.array([0.1, 0.3, 0.5, 0.7, 1.0])
    t = len(tasks)
    accuracy = np.clip(0.5 + 0.4 * np.sin(np.pi * lams)[:, None] * rng.uniform(0.5, 1, t), 0, 1)
    finetuned = rng.uniform(0.7, 0.95, t)
    tas = rng.uniform(1, 50, (5, 3, 2, t))
    adamms = rng.uniform(0, 1, (5, 3, 2, t))
    adamms[[0, -1]] = np.nan
    return xr.Dataset({"tas": (("lam", "distance", "n_batches", "task"), tas), "tas_mean": (("lam", "distance", "n_batches"), tas.mean(-1)),
                       "adamms": (("lam", "distance", "n_batches", "task"), adamms),
                       "adamms_mean": (("lam", "distance", "n_batches"), adamms.mean(-1)),
                       "selected_lam_tas": (("distance", "n_batches"), np.full((3, 2), 0.5)),
                       "selected_lam_adamms": (("distance", "n_batches"), np.full((3, 2), 0.3)),
                       "accuracy": (("lam", "task"), accuracy), "finetuned_accuracy": ("task", finetuned),
                       "normalized_accuracy": (("lam", "task"), accuracy / finetuned)},
                      coords={"lam": lams, "distance": ["l1", "l2", "cos"], "n_batches": [1, 2], "task": list(tasks)},
                      attrs={"method": "task_arithmetic", "eval_split": "test"})


def embedding_interference(tasks=TASKS) -> xr.Dataset:
    l1 = _rng(5).uniform(10, 50, (2, len(tasks)))
    return xr.Dataset({"l1_distance": (("space", "task"), l1), "l1_distance_mean": ("space", l1.mean(1))},
                      coords={"space": ["full", "core"], "task": list(tasks)}, attrs={"method": "tsv+iso_c"})


def truncation_accuracy(tasks=TASKS) -> xr.Dataset:
    norm = np.clip(_rng(6).uniform(0.5, 1.0, (2, 5, len(tasks))), 0, 1)
    return xr.Dataset({"normalized_accuracy": (("space", "fraction", "task"), norm),
                       "normalized_accuracy_mean": (("space", "fraction"), norm.mean(-1))},
                      coords={"space": ["full", "core"], "fraction": [0.0, 0.25, 0.5, 0.75, 0.9], "task": list(tasks)},
                      attrs={"method": "task_arithmetic", "split": "test"})


# Adaptation studies (mergelab.experiments.preferences, adaptation_studies; AdaptResult.history) ----------


BASELINES = ["zeroshot", "task_arithmetic", "ties@knots", "lora_lego@full"]


def pareto(pair=("digits", "textures"), n: int = 7) -> xr.Dataset:
    rng = _rng(7)
    w = np.linspace(0, 1, n)
    accuracy = np.stack([np.stack([0.5 + 0.4 * w, 0.9 - 0.4 * w], -1) + rng.normal(0, 0.02, (n, 2)) for _ in range(2)])
    names = BASELINES + [f"finetuned_{t}" for t in pair]
    base = rng.uniform(0.4, 0.95, (len(names), 2))
    return xr.Dataset({"accuracy": (("merge_method", "preference", "task", "split"), np.repeat(accuracy[..., None], 2, -1)),
                       "baseline_accuracy": (("baseline", "task", "split"), np.repeat(base[..., None], 2, -1))},
                      coords={"merge_method": ["tara_b", "adamerging"], "preference": np.arange(n), "task": list(pair),
                              "split": ["val", "test"], "baseline": names})


def cloud(focal=("digits", "textures"), n: int = 6) -> xr.Dataset:
    rng = _rng(8)
    accuracy = rng.uniform(0.5, 0.9, (2, n, 2, 1))
    return xr.Dataset({"accuracy": (("merge_method", "preference", "focal", "split"), accuracy),
                       "mean": (("merge_method", "split", "focal"), accuracy.mean(1).transpose(0, 2, 1)),
                       "ellipse_width": (("merge_method", "split"), [[0.1], [0.05]]),
                       "ellipse_height": (("merge_method", "split"), [[0.04], [0.02]]),
                       "ellipse_angle": (("merge_method", "split"), [[30.0], [60.0]])},
                      coords={"merge_method": ["tara_b", "adamerging"], "preference": np.arange(n), "focal": list(focal), "split": ["test"]},
                      attrs={"focal_weight": 0.125, "n_std": 2.0})


def stch_alpha() -> xr.Dataset:
    values = _rng(9).uniform(0.7, 0.9, (2, 3, 1))
    return xr.Dataset({"average_normalized_accuracy": (("merge_method", "alpha", "split"), values)},
                      coords={"merge_method": ["tara_a", "tara_b"], "alpha": [0.1, 1.0, 5.0], "split": ["test"]})


def history(tasks=TASKS[:4], method: str = "adarank", iters: int = 30, components: int = 4) -> xr.Dataset:
    rng, m, t = _rng(10), len(MODULES), len(tasks)
    records = np.arange(0, iters + 1, 10)
    ds = xr.Dataset({"loss": (("iteration", "task"), 1 + rng.uniform(0, 0.2, (iters, t)) - np.linspace(0, 0.3, iters)[:, None]),
                     "objective": ("iteration", 2 - np.linspace(0, 0.5, iters)),
                     "coefficient_mean": (("record", "module", "task"), 0.3 + rng.normal(0, 0.05, (len(records), m, t)))},
                    coords={"iteration": np.arange(1, iters + 1), "record": records, "task": list(tasks)},
                    attrs={"method": method, "space": "full", "objective": "entropy", "scalarization": "sum"})
    if method.startswith("adarank"):
        mask = (rng.uniform(size=(len(records), m, t, components)) > 0.3).astype(float)
        ds = ds.assign({"mask": (("record", "module", "task", "component"), mask),
                        "mask_kept_fraction": (("record", "module", "task"), mask.mean(-1)),
                        "lambda": (("record", "module", "task"), 0.5 + rng.normal(0, 0.05, (len(records), m, t)))},
                       ).assign_coords(component=np.arange(1, components + 1))
    return _modules(ds)


# The study's results (docs/store.md "Study results") ------------------------------------------------------


def results() -> xr.Dataset:
    rng = _rng(11)
    ds = synthetic_results({run: rng.uniform(0.55, 0.9, len(TASKS)) for run in RUNS}, TASKS, finetuned=rng.uniform(0.8, 0.99, len(TASKS)))
    seconds = ds["merge_seconds"].copy()
    for i, (method, space) in enumerate(RUNS):  # static merges in milliseconds, adaptive runs in minutes
        seconds.loc[{"merge_method": method, "space": space}] = 60 + 10 * i if method.startswith(("ada", "tara")) else 0.01 * (i + 1)
    ds = ds.assign(merge_seconds=seconds)
    norm = ds["score"].sel(task=TASKS, metric="norm_acc", config=ds.config[0]).mean("task")  # (merge_method, space, seed)
    zero = float((ds["reference_score"].sel(reference="zeroshot", metric="acc", task=TASKS)
                  / ds["reference_score"].sel(reference="finetuned", metric="acc", task=TASKS)).mean())
    gain = np.stack([norm - norm.sel(merge_method="task_arithmetic", space="full"), norm - zero], axis=-1)[..., None]
    ci = np.concatenate([gain - 0.02, gain + 0.02], axis=-1)  # paired bootstrap intervals (gain_ci) around each gain
    return ds.assign(gain_ci=(("merge_method", "space", "seed", "versus", "bound"), ci)).assign_coords(
        versus=["task_arithmetic", "zeroshot"], bound=["low", "high"])


# The notebooks' tagged cells and their figure calls ------------------------------------------------------


def _returns_figure(module: str, name: str) -> bool:
    function = getattr(MODULES_BUILDERS[module], name, None)
    return function is not None and typing.get_type_hints(function).get("return") is Figure


def figure_calls() -> list[tuple[str, str, str]]:
    """``(items, notebook, call source)`` for every figure-builder call of every notebook cell;
    ``items`` is the cell's ``paper:`` items joined by commas, ``untagged`` for a cell without. A call
    that several notebooks make alike (the singular spectra of 10 and 20) is rendered once."""
    found = []
    for path in list_notebooks(REPO):
        for cell in read_notebook(path).cells:
            if cell.cell_type != "code":
                continue
            items = ",".join(paper_items(cell, path.name)) or "untagged"
            source = "\n".join(line for line in cell.source.splitlines() if not line.startswith(("%", "!")))  # IPython magics
            for node in ast.walk(ast.parse(source)):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
                        and node.func.value.id in MODULES_BUILDERS and _returns_figure(node.func.value.id, node.func.attr)):
                    call = ast.get_source_segment(source, node)
                    if all(call != seen for *_, seen in found):
                        found.append((items, path.stem, call))
    return found


CALLS = figure_calls()


@pytest.fixture(scope="module")
def names(taskset) -> dict[str, object]:
    """What the notebooks' cells call the Datasets they draw, each labelled as a study labels it."""
    adarank, cart = history(), history(method="adarank_cart")
    weights = _weight_datasets(taskset)
    datasets = {**weights, "ranked": weights["coverage"], "anisotropy": anisotropy(), "components": components(), "tas_sweep": tas_sweep(),
                "embedding_interference": embedding_interference(), "truncation_accuracy": truncation_accuracy(),
                "results": results(), "pareto": pareto(), "cloud": cloud(), "alpha": stch_alpha(), "history": adarank, "h": cart,
                "run": history(method="adamerging_tas")}
    datasets = {name: ds.assign_attrs(dataset=LABEL, note=LABEL, study="micro") for name, ds in datasets.items()}
    pairs = [pareto(pair).assign_attrs(dataset=LABEL) for pair in (("digits", "textures"), ("signs", "aerial"), ("scenes", "vehicles"),
                                                                      ("landcover", "housenumbers"))]
    clouds = [cloud(pair).assign_attrs(dataset=LABEL) for pair in (("digits", "textures"), ("signs", "aerial"))]
    with_masks = {"TA": adarank.assign_attrs(dataset=LABEL), "CART": cart.assign_attrs(dataset=LABEL)}
    return {**MODULES_BUILDERS, "str": str, **datasets, "pairs": pairs, "clouds": clouds, "with_masks": with_masks}


def test_the_calls_are_read_from_every_notebook():
    items = {item for item, _, _ in CALLS for item in item.split(",")}
    assert {"001-fig5", "001-fig6", "003-fig1", "003-fig3", "004-fig5-middle", "004-fig14", "002-fig3", "untagged"} <= items
    assert ("untagged", "00_overview", "overview.normalized_accuracy_by_task(results)") in CALLS  # the overview heatmap
    assert len(CALLS) >= 45


@pytest.mark.parametrize(("items", "notebook", "call"), CALLS, ids=[f"{items}:{call.split('(')[0]}" for items, _, call in CALLS])
def test_notebook_figures_pass_the_layout_checks(names, items, notebook, call):
    fig = eval(call, {"__builtins__": {}}, names)  # noqa: S307 (the repository's own notebook source)
    assert isinstance(fig, Figure)
    assert layout_problems(fig) == [], f"{notebook} {items}: {call}"


# The checks themselves: each problem they name is found on a figure that has it ---------------------------


def _paper_figure(**panels) -> tuple[Figure, object]:
    from mergelab_figures.style import PaperFigure

    fig = PaperFigure(figsize=(4, 3), layout="constrained")
    return fig, fig.subplots(**panels)


def test_a_clean_figure_has_no_problems():
    fig, ax = _paper_figure()
    ax.plot([0, 1, 2], [1, 3, 2], marker="o", label="a")
    ax.plot([0, 1, 2], [2, 1, 3], marker="s", label="b")
    ax.set(xlabel="λ", ylabel="accuracy (%)")
    ax.legend()  # tidy moves it beside the panel
    assert layout_problems(fig) == []


def test_a_legend_over_the_data_or_a_label_is_found():
    from matplotlib.figure import Figure as Plain

    fig = Plain(figsize=(4, 3), layout="constrained")  # a plain Figure: nothing moves its legend
    ax = fig.subplots()
    ax.plot(np.linspace(0, 1, 50), np.linspace(0, 1, 50), label="rising")
    ax.set(xlabel="λ", ylabel="value")
    ax.legend(loc="center", fontsize=20)
    assert any("covers data" in p and "'rising'" in p for p in layout_problems(fig))
    fig.legends.append(fig.legend(["x"], loc="lower center", bbox_to_anchor=(0.5, -0.02), bbox_transform=fig.transFigure, fontsize=20))
    assert any(p.startswith("figure legend 0 covers") and "x label 'λ'" in p for p in layout_problems(fig))


def test_clipped_crowded_and_fraction_labels_and_hidden_series_are_found():
    fig, ax = _paper_figure()
    ax.scatter([0.5, 0.6], [0.5, 0.6], s=20, label="below")
    ax.scatter([0.5, 0.6], [0.5, 0.6], s=80, label="above")  # filled and larger: the first is out of sight
    ax.set(xlabel="digits accuracy", ylabel="y")
    ax.set_xticks([0.5, 0.501], ["first", "second"], rotation=40)  # turned, yet a hair apart
    problems = layout_problems(fig)
    assert "panel 0 ('y'): series 'below' is hidden under 'above'" in problems
    assert "axis label 'digits accuracy' gives an accuracy without %" in problems
    assert "panel 0 ('y') tick labels 'first' and 'second' overlap" in problems

    from matplotlib.figure import Figure as Plain

    fig = Plain(figsize=(4, 3))  # no layout engine: a long tick label runs off the canvas
    ax = fig.subplots()
    ax.set_yticks([0.5], ["a label far too long for the left margin of this figure"])
    assert any("a label far too long" in p and "clipped by the figure's edge" in p for p in layout_problems(fig))

    fig, ax = _paper_figure()
    ax.scatter([0.5, 0.6], [0.5, 0.6], s=80, label="below")
    ax.scatter([0.5, 0.6], [0.5, 0.6], s=20, facecolors="none", edgecolors="k", label="ring")  # a ring inside a disc: both seen
    ax.plot([0, 1], [0, 1], label="line")
    ax.plot([0, 1], [0, 1], ls="--", label="dashed over it")  # a dashed line leaves the one below in sight
    assert not [p for p in layout_problems(fig) if "hidden" in p]


# Degenerate data: the caption says what the figure cannot show --------------------------------------------


def test_figures_of_degenerate_data_say_so_in_their_title(taskset):
    one = components(n=1).assign_attrs(dataset=LABEL)  # the demo's: the top component of each rank-4 update
    for fig in (components_figures.loss_change_per_component(one), components_figures.loss_change_per_task(one)):
        assert components_figures.ONE_COMPONENT in fig.get_suptitle()
        assert layout_problems(fig) == []
    assert components_figures.ONE_COMPONENT not in components_figures.loss_change_per_task(components(n=4)).get_suptitle()

    ranks = coverage.subspace_coverage(taskset).assign_attrs(dataset=LABEL)
    flat = ranks.assign(energy_rank=ranks.energy_rank * 0 + 4)  # every rank-4 update needs its four components
    assert coverage_figures.uniform_energy_rank(flat) == 4 and coverage_figures.uniform_energy_rank(ranks.assign(energy_rank=ranks.energy_rank.cumsum("task"))) is None
    fig = coverage_figures.energy_rank_per_task(flat)
    assert "every task's energy rank is 4 here" in fig.get_suptitle() and layout_problems(fig) == []


def test_real_demo_cases_coinciding_tas_curves_and_a_long_title_on_a_narrow_figure():
    """Two problems the v3 demo's own Datasets showed: TAS curves of 1 and 2 batches that coincide
    (004 Figs. 10-11: the robustness the paper reports) and a run name that widens 004 Fig. 14's
    title past a 5-inch figure after one proportional wrap."""
    ds = tas_sweep()
    same = ds.tas_mean.isel(n_batches=0).values
    ds["tas_mean"] = ds.tas_mean.copy(data=np.repeat(same[:, :, None], ds.sizes["n_batches"], axis=2))
    assert layout_problems(proxies_figures.tas_robustness(ds)) == []
    fig, ax = _paper_figure()
    fig.set_size_inches(5.0, 4.0)
    ax.plot([0, 1], [0, 1])
    fig.suptitle("Learned coefficient per task during adaptation (adamerging_tas) (004 Fig. 14 right)\n"
                 "computed on: micro-r4 benchmark (micro-benchmark numbers, not the papers')")
    assert layout_problems(fig) == []
