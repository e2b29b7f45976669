"""Figure builders for the adaptation studies: TARA's preference studies (001 Figs. 3, 4, 10, 11;
000 Fig. 10), AdaRank's masks and ablation (002 Fig. 5, Tab. 4), adaptation curves (004 Fig. 14).

Inputs are the Datasets of :mod:`mergelab.experiments.preferences`, :mod:`mergelab.experiments.adaptation_studies`
and an :class:`~mergelab.adaptation.loop.AdaptResult`'s ``history``; outputs are matplotlib Figures
(or a DataFrame for the table) labelled with what they were computed on (``ds.attrs["dataset"]``).
Nothing here computes a statistic: the numbers come from the Dataset.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import seaborn as sns
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.patches import Ellipse
from matplotlib.ticker import MaxNLocator

from mergelab_figures.style import dataset_label, paper_figure, strings, unique_legend

__all__ = [
    "adaptation_losses",
    "adarank_ablation_table",
    "adarank_mask_grid",
    "adarank_masks",
    "coefficient_trajectories",
    "pareto_front",
    "pareto_fronts",
    "preference_sensitivities",
    "preference_sensitivity",
    "stch_alpha_curve",
]

_BASELINE_MARKERS = {"zeroshot": ("s", "zero-shot"), "task_arithmetic": ("D", "task arithmetic")}


def _pick(da: xr.DataArray, **labels) -> xr.DataArray:
    """``da.sel`` by those labels whose dimension ``da`` has."""
    return da.sel({k: v for k, v in labels.items() if k in da.dims})


def _split(ds: xr.Dataset, split: str | None) -> str:
    splits = strings(ds.split.values)
    return split if split is not None else ("test" if "test" in splits else splits[0])


def _pareto_panel(ax, ds: xr.Dataset, split: str) -> None:
    tasks = strings(ds.task.values)
    for method in strings(ds.merge_method.values):
        acc = 100 * _pick(ds.accuracy, merge_method=method, split=split)  # (preference, task), in %
        ax.plot(acc.sel(task=tasks[0]), acc.sel(task=tasks[1]), marker="o", markersize=3, label=method)
    base = _pick(ds.baseline_accuracy, split=split)
    names = strings(ds.baseline.values)
    experts = [n for n in names if n.startswith("finetuned_")]
    others = iter("^vPX")  # the static mergers among the baselines (KnOTS-TIES, LoRA-LEGO, ...)
    for name in names:  # one legend entry for both fine-tuned models
        if name in experts:
            marker, label = "*", "fine-tuned models" if name == experts[0] else "_nolegend_"
        else:
            marker, label = _BASELINE_MARKERS.get(name) or (next(others, "p"), name.replace("@", " (") + ")")
        point = 100 * base.sel(baseline=name)
        ax.scatter(point.sel(task=tasks[0]), point.sel(task=tasks[1]), marker=marker, s=60, color="k",
                   facecolors="none" if marker != "*" else "k", label=label, zorder=3)
    ax.set(xlabel=f"{tasks[0]} accuracy (%)", ylabel=f"{tasks[1]} accuracy (%)")


def _cloud_panel(ax, ds: xr.Dataset, split: str) -> None:
    focal = strings(ds.focal.values)
    for i, method in enumerate(strings(ds.merge_method.values)):
        color = f"C{i}"
        acc = 100 * _pick(ds.accuracy, merge_method=method, split=split)  # (preference, focal), in %
        ax.scatter(acc.sel(focal=focal[0]), acc.sel(focal=focal[1]), s=14, alpha=0.6, color=color, label=method)
        mean = 100 * _pick(ds["mean"], merge_method=method, split=split).values
        ax.scatter(*mean, marker="x", s=80, color=color)
        ax.add_patch(Ellipse(tuple(mean), 100 * float(_pick(ds.ellipse_width, merge_method=method, split=split)),
                             100 * float(_pick(ds.ellipse_height, merge_method=method, split=split)),
                             angle=float(_pick(ds.ellipse_angle, merge_method=method, split=split)),
                             fill=False, color=color, lw=1.5))
    ax.set(xlabel=f"{focal[0]} accuracy (%)", ylabel=f"{focal[1]} accuracy (%)")
    ax.autoscale_view()


def pareto_front(ds: xr.Dataset, split: str | None = None) -> Figure:
    """Two-task trade-off (001 Fig. 3): per method the accuracy pairs over the preference sweep (a
    line ordered by ρ), and the baselines (zero-shot, task arithmetic, each fine-tuned model) as
    isolated operating points."""
    split = _split(ds, split)
    fig, (ax,) = paper_figure(ds, f"Two-task trade-off, {split} accuracy", "001 Fig. 3", panel=(4.8, 4.2))
    _pareto_panel(ax, ds, split)
    ax.legend(fontsize=7)
    return fig


def _pair_panels(datasets: Sequence[xr.Dataset], split: str | None, title: str, paper: str, draw, pair: str) -> Figure:
    """One panel per Dataset (a task pair each, named by its ``pair`` coordinate), ``draw(ax, ds, split)``
    in each, one legend for all."""
    split = _split(datasets[0], split)
    fig, axes = paper_figure(datasets[0], f"{title}, {split} accuracy", paper, ncols=len(datasets), panel=(3.6, 3.6))
    for ax, ds in zip(axes, datasets, strict=True):
        draw(ax, ds, split)
        ax.set_title(" / ".join(strings(ds[pair].values)), fontsize=9)
    unique_legend(fig, axes)
    return fig


def pareto_fronts(datasets: Sequence[xr.Dataset], split: str | None = None) -> Figure:
    """001 Fig. 10: :func:`pareto_front` for several task pairs (one Pareto sweep each), a panel per pair."""
    return _pair_panels(datasets, split, f"Two-task trade-offs of {len(datasets)} task pairs", "001 Fig. 10", _pareto_panel, "task")


def preference_sensitivity(ds: xr.Dataset, split: str | None = None) -> Figure:
    """Accuracy of the two focal tasks under random preferences (001 Fig. 4): one point per sampled
    preference, the covariance ellipse of each method's cloud and its mean (×)."""
    split = _split(ds, split)
    fig, (ax,) = paper_figure(ds, f"Preference sensitivity, {split} accuracy", "001 Fig. 4", panel=(4.8, 4.2))
    _cloud_panel(ax, ds, split)
    ax.set_title(f"focal weights {ds.attrs.get('focal_weight', '?')}; ellipses: {ds.attrs.get('n_std', 2.0):g} std", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def preference_sensitivities(datasets: Sequence[xr.Dataset], split: str | None = None) -> Figure:
    """001 Fig. 11: :func:`preference_sensitivity` for several focal pairs, a panel per pair."""
    n_std = datasets[0].attrs.get("n_std", 2.0)
    return _pair_panels(datasets, split, f"Preference sensitivity of {len(datasets)} focal pairs (ellipses: {n_std:g} std)",
                        "001 Fig. 11", _cloud_panel, "focal")


def stch_alpha_curve(ds: xr.Dataset, split: str | None = None) -> Figure:
    """Average normalised accuracy against the STCH smoothing α, one line per TARA variant (000 Fig. 10)."""
    split = _split(ds, split)
    fig, (ax,) = paper_figure(ds, f"STCH α ablation, {split} split", "000 Fig. 10")
    for method in strings(ds.merge_method.values):
        values = _pick(ds.average_normalized_accuracy, merge_method=method, split=split)
        ax.plot(ds.alpha.values, 100 * values.values, marker="o", label=method)
    ax.set(xscale="log", xlabel="α (001 Eq. 10)", ylabel="normalised accuracy (%)")
    ax.set_xticks(ds.alpha.values, [f"{a:g}" for a in ds.alpha.values])
    ax.legend(fontsize=8)
    return fig


def adarank_masks(history: xr.Dataset, record: int = -1) -> Figure:
    """Fraction of each task's singular components AdaRank keeps, per layer, one panel per module
    kind (002 Fig. 5 summarised per layer; the masks of ``history`` at ``record``, default the last)."""
    kept = history.mask_kept_fraction.isel(record=record)  # (module, task)
    kinds = list(dict.fromkeys(strings(history.kind.values)))
    at = int(history.record.values[record])
    fig, axes = paper_figure(history, f"AdaRank: share of singular components kept (iteration {at})", "002 Fig. 5",
                             ncols=len(kinds), panel=(max(3.0, 0.5 * history.sizes["task"] + 1.8), 3.2))
    for ax, kind in zip(axes, kinds):
        sub = kept.isel(module=np.flatnonzero(np.array(strings(history.kind.values)) == kind))
        frame = pd.DataFrame(sub.values, index=sub.layer.values, columns=strings(sub.task.values)).sort_index()
        sns.heatmap(frame, ax=ax, vmin=0, vmax=1, cmap="viridis", cbar=ax is axes[-1], annot=frame.size <= 64, fmt=".2f")
        ax.set(title=kind, xlabel="task", ylabel="layer")
        ax.tick_params(axis="x", rotation=0)  # level unless they crowd: then tidy turns them
    return fig


def adarank_mask_grid(histories: dict[str, xr.Dataset], kind: str | None = None, share: float = 0.5, record: int = -1) -> Figure:
    """002 Fig. 5: AdaRank's binary masks over singular components, one column per run (``histories``:
    label -> history, e.g. the TA and CART origins) and one row per layer (first, middle, last block)
    of one module ``kind`` (default: the first); each panel is task × component index (by decreasing
    σ, the top ``share`` of indices as the paper shows), kept in blue, pruned in yellow (the legend says so)."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    first = next(iter(histories.values()))
    kind = kind or strings(first.kind.values)[0]
    layers = sorted({int(v) for v in first.layer.values})
    rows = list(dict.fromkeys([layers[0], layers[len(layers) // 2], layers[-1]]))
    fig, axes = paper_figure(first, f"AdaRank: binary masks over the top {share:.0%} of singular components ({kind} modules, "
                                    f"iteration {int(first.record.values[record])})", "002 Fig. 5", ncols=len(histories), nrows=len(rows),
                             panel=(4.4, 1.2 + 0.22 * first.sizes["task"]))
    colours = {"pruned": "#e6c229", "kept": "#1f6fb4"}  # 002 Fig. 5's colours
    cmap = ListedColormap(list(colours.values()))
    for j, (label, history) in enumerate(histories.items()):
        mask = history["mask"].isel(record=record)
        shown = max(1, int(np.ceil(share * mask.sizes["component"])))
        for i, layer in enumerate(rows):
            ax = axes[i * len(histories) + j]
            module = [m for m, k, la in zip(strings(history.module.values), strings(history.kind.values), history.layer.values)
                      if k == kind and int(la) == layer][0]
            values = mask.sel(module=module).isel(component=slice(0, shown)).transpose("task", "component")
            ax.imshow(np.ma.masked_invalid(values.values), aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest",
                      extent=(0.5, shown + 0.5, values.sizes["task"] - 0.5, -0.5))  # x: the 1-based component index
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_yticks(range(values.sizes["task"]), strings(values.task.values), fontsize=6)
            ax.set(title=f"{label}: layer {layer}", xlabel="singular component index" if i == len(rows) - 1 else "")
            ax.title.set_fontsize(8)
    fig.legend([Patch(color=c) for c in colours.values()], list(colours), loc="outside lower center", ncols=2, fontsize=7,
               frameon=False)
    return fig


def adaptation_losses(history: xr.Dataset) -> Figure:
    """Per-task objective and the scalarised objective across adaptation iterations (004 Fig. 14 left)."""
    fig, axes = paper_figure(history, f"Adaptation losses ({history.attrs.get('method', '?')}, {history.attrs.get('space', 'full')} space)",
                             "004 Fig. 14 left", ncols=2)
    for task in strings(history.task.values):
        axes[0].plot(history.iteration, history.loss.sel(task=task), label=task)
    axes[0].set(xlabel="iteration", ylabel=f"{history.attrs.get('objective', 'loss')} per task")
    axes[0].legend(fontsize=7)
    axes[1].plot(history.iteration, history.objective, color="k")
    axes[1].set(xlabel="iteration", ylabel=f"{history.attrs.get('scalarization', '')} objective")
    return fig


_COEFFICIENTS = {"lambda": "λ", "coefficient_mean": "coefficient"}


def coefficient_trajectories(history: xr.Dataset, variable: str | None = None) -> Figure:
    """Learned coefficients per task across iterations, mean ± std over modules (004 Fig. 14 right).

    ``variable`` defaults to ``lambda`` when recorded (AdaRank) and ``coefficient_mean`` otherwise
    (AdaMerging's λ, TARA's mean φ per task).
    """
    variable = variable or ("lambda" if "lambda" in history else "coefficient_mean")
    values = history[variable]  # (record, module, task)
    name = _COEFFICIENTS.get(variable, variable)
    fig, (ax,) = paper_figure(history, f"Learned {name} per task during adaptation ({history.attrs.get('method', '?')})",
                              "004 Fig. 14 right", panel=(5.0, 3.4))
    for task in strings(history.task.values):
        per_task = values.sel(task=task)
        mean, std = per_task.mean("module"), per_task.std("module")
        ax.plot(history.record, mean, marker=".", label=task)
        ax.fill_between(history.record, mean - std, mean + std, alpha=0.15)
    ax.set(xlabel="iteration", ylabel=f"{name}\n(mean ± std over modules)")
    ax.legend(fontsize=7)
    return fig


def adarank_ablation_table(ds: xr.Dataset, split: str | None = None, origins: Sequence[str] | None = None) -> pd.DataFrame:
    """002 Tab. 4: average accuracy (%) when learning λ, the mask B, both or neither, per origin (TA, CART)."""
    split = _split(ds, split)
    origins = list(origins) if origins is not None else strings(ds.origin.values)
    mark = {True: "✓", False: "×"}
    rows = []
    for config in strings(ds.config.values):
        row = ds.sel(config=config)
        rows.append({"coefficient λ": mark[bool(row.learn_lambda)], "binary mask B": mark[bool(row.learn_mask)],
                     **{o.upper(): round(100 * float(_pick(row.average_accuracy, origin=o, split=split)), 1) for o in origins}})
    table = pd.DataFrame(rows)
    table.attrs["dataset"] = dataset_label(ds)
    table.attrs["split"] = split
    return table
