"""The papers' result tables from a study's results Dataset (``studies/<name>/results``).

Each table has one row per method × space (a ``(method, space)`` MultiIndex: methods in
registry order, :func:`method_order`; spaces in :data:`mergelab.spaces.SPACES` order), values
in % at one decimal, for the configuration the study selected (``selected``; the mean over
seeds). Reference rows (the fine-tuned models, zero-shot) come first and are named in
``frame.attrs["references"]``; the best merged value of each ranked column
(``frame.attrs["ranked"]``) is set in bold by :func:`bold_best`.

* ``*_frame(ds)`` returns the plain :class:`pandas.DataFrame` (``attrs``: ``paper``, ``dataset``
  (whose numbers these are), ``study``, ``references``, ``ranked``);
* ``*_table(ds)`` returns it as a :class:`pandas.io.formats.style.Styler` with the bold, one
  decimal and a caption, which notebooks display and ``to_html()`` / ``to_latex(convert_css=True)``
  write; ``styler.data`` is the plain frame.

* :func:`paper_table` (003 Tab. 3, 001 Tab. 1): method × space by the tasks, ``Avg.`` and
  ``Δ Avg.`` (against the method's full-space merge), normalised or absolute accuracy;
* :func:`unseen_table` (001 Tab. 4): method × space by the merged tasks, the unseen ones and their averages;
* :func:`joint_table` (001 Tab. 3): method × space by ``Hits@1``, ``Hits@3``, ``Hits@5``;
* :func:`joint_by_task_table` (001 Tab. 10): method × space × Hits@k by the tasks and ``Avg.``;
* :func:`joint_grid` (003 Tab. 4): space × method, joint-task Hits@k;
* :func:`rank_table` (000 Tab. 13): method × space by adapter rank, mean absolute and normalised
  accuracy, from several studies of the same tasks.

Nothing here computes a metric: the numbers are the Dataset's (schema: docs/store.md, "Study
results").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import xarray as xr
from pandas.io.formats.style import Styler

from mergelab_figures.style import strings

from mergelab.adaptation import ADAPTERS
from mergelab.merging import METHODS
from mergelab.spaces import SPACES
from mergelab.study import JOINT, JOINT_KS

__all__ = ["AVG", "DELTA", "FINETUNED", "bold_best", "has_joint", "has_unseen", "joint_by_task_frame", "joint_by_task_table",
           "joint_frame", "joint_grid", "joint_grid_frame", "joint_table", "method_order", "per_task_frame", "paper_table",
           "rank_frame", "rank_table", "selected_scores", "unseen_frame", "unseen_table"]

AVG = "Avg."
DELTA = "Δ Avg."
#: The reference row of the per-task table: each task's fine-tuned model, absolute accuracy.
FINETUNED = ("finetuned (absolute)", "-")
BOLD = "font-weight: bold"
_WHAT = {"norm_acc": "normalised accuracy", "acc": "accuracy"}


def method_order(names: Iterable[str]) -> list[str]:
    """``names`` in registry order: static merges as :data:`mergelab.merging.METHODS` lists them (a
    composition ``a+b`` right after ``a``), then adaptive methods as
    :data:`mergelab.adaptation.ADAPTERS` lists them, then any other name (an adaptive run the study
    labelled, e.g. ``adarank_cart``) in the order given."""
    static, adaptive = list(METHODS), list(ADAPTERS)
    names = list(dict.fromkeys(names))

    def key(name: str) -> tuple[int, int, int]:
        first, *rest = name.split("+")
        if first in static and all(part in static for part in rest):
            return 0, static.index(first), len(rest)
        if name in adaptive:
            return 1, adaptive.index(name), 0
        return 2, names.index(name), 0

    return sorted(names, key=key)


def _space_order(names: Iterable[str]) -> list[str]:
    known = list(SPACES)
    names = list(dict.fromkeys(names))
    return sorted(names, key=lambda s: (known.index(s) if s in known else len(known), names.index(s)))


def selected_scores(ds: xr.Dataset, task, metric) -> xr.DataArray:
    """``score`` at ``task`` and ``metric`` (labels or lists) for the configuration the study selected,
    the mean over seeds: dims ``merge_method``, ``space`` and any list-valued selection; NaN where a
    method did not run in a space."""
    return ds["score"].sel(task=task, metric=metric).where(ds["selected"]).max("config").mean("seed")


def _rows(picked: xr.DataArray, column_dim: str) -> pd.DataFrame:
    """A (method, space) × ``column_dim`` frame in % of ``picked``, rows in registry order, runs
    that did not happen left out."""
    picked = picked.transpose("merge_method", "space", column_dim)
    methods, spaces, columns = (strings(picked[d].values) for d in ("merge_method", "space", column_dim))
    values = 100 * picked.values
    rows = {(m, s): values[i, j] for i, m in enumerate(methods) for j, s in enumerate(spaces) if not np.isnan(values[i, j]).all()}
    order = [(m, s) for m in method_order(methods) for s in _space_order(spaces) if (m, s) in rows]
    index = pd.MultiIndex.from_tuples(order, names=["method", "space"])
    return pd.DataFrame([rows[r] for r in order], index=index, columns=pd.Index(columns, dtype=object))


def _with_references(frame: pd.DataFrame, references: dict[tuple[str, str], Sequence[float]]) -> pd.DataFrame:
    if not references:
        return frame
    top = pd.DataFrame(list(references.values()), columns=frame.columns,
                       index=pd.MultiIndex.from_tuples(list(references), names=frame.index.names))
    return pd.concat([top, frame])


def _attrs(frame: pd.DataFrame, ds: xr.Dataset, paper: str, references, ranked, **more) -> pd.DataFrame:
    frame.attrs = {"paper": paper, "dataset": str(ds.attrs.get("note", "")), "study": str(ds.attrs.get("study", "?")),
                   "references": list(references), "ranked": list(ranked), **more}
    return frame


def per_task_frame(ds: xr.Dataset, metric: str = "norm_acc", *, finetuned: bool = True, delta: str | None = "full") -> pd.DataFrame:
    """Per-task test ``metric`` (``norm_acc``: normalised, ``acc``: absolute accuracy) in %, one row
    per method × space, columns the study's tasks, ``Avg.`` (their mean) and, with ``delta``, ``Δ Avg.``:
    the row's ``Avg.`` minus that of the same method in the ``delta`` space (003 Tab. 3's "Δ Acc";
    NaN for a method that did not run there). With ``finetuned``, the first row
    (:data:`FINETUNED`) is each task's fine-tuned model, absolute accuracy (the papers' "Abs.
    accuracies" row). Means and differences are taken before rounding to one decimal.
    """
    if metric not in _WHAT:
        raise ValueError(f"metric {metric!r}: the per-task tables show {' or '.join(_WHAT)}")
    tasks = list(ds.attrs["tasks"])
    frame = _rows(selected_scores(ds, tasks, metric), "task")
    frame[AVG] = frame[tasks].mean(axis=1, skipna=False)
    references = {}
    if finetuned:
        acc = 100 * ds["reference_score"].sel(reference="finetuned", task=tasks, metric="acc").values
        references[FINETUNED] = [*acc, acc.mean()]
    frame = _with_references(frame, references)
    if delta is not None:
        base = {m: frame.loc[(m, s), AVG] for m, s in frame.index if s == delta and (m, s) not in references}
        frame[DELTA] = [frame.loc[(m, s), AVG] - base[m] if m in base and (m, s) not in references else np.nan for m, s in frame.index]
    paper = "003 Tab. 3, 001 Tab. 1 layout" if metric == "norm_acc" else "003 Tab. 3, 001 Tab. 1 layout, absolute accuracy"
    return _attrs(frame.round(1), ds, paper, references, [*tasks, AVG], metric=metric, delta=delta)


def has_unseen(ds: xr.Dataset) -> bool:
    """Whether the study evaluated tasks it did not merge (study setting ``unseen:``)."""
    return bool(ds.attrs.get("unseen"))


def unseen_frame(ds: xr.Dataset) -> pd.DataFrame:
    """Normalised test accuracy (%) on the merged (seen) tasks and on the unseen ones, one row per
    method × space (001 Tab. 4's layout): the seen tasks and their ``Avg. seen``, the unseen tasks
    and their ``Avg. unseen``, then ``Avg.`` over all of them. Unseen tasks are normalised by their
    own fine-tuned models, as the seen ones; nothing was selected on them."""
    seen, unseen = list(ds.attrs["tasks"]), list(ds.attrs.get("unseen", []))
    if not unseen:
        raise ValueError("the study evaluated no unseen tasks; list them under unseen: in the study")
    frame = _rows(selected_scores(ds, [*seen, *unseen], "norm_acc"), "task")
    frame.insert(len(seen), "Avg. seen", frame[seen].mean(axis=1, skipna=False))
    frame["Avg. unseen"] = frame[unseen].mean(axis=1, skipna=False)
    frame[AVG] = frame[[*seen, *unseen]].mean(axis=1, skipna=False)
    return _attrs(frame.round(1), ds, "001 Tab. 4 layout", [], list(frame.columns), unseen=unseen)


def has_joint(ds: xr.Dataset) -> bool:
    """Whether the study measured the joint-task Hits@k (study setting ``joint: true``)."""
    return JOINT in strings(ds.task.values) and all(f"hits@{k}" in strings(ds.metric.values) for k in JOINT_KS)


def joint_frame(ds: xr.Dataset) -> pd.DataFrame:
    """Joint-task Hits@1/3/5 on the test split in % (every image against the union of labels), one
    row per method × space; the first rows are the zero-shot model and the fine-tuned experts (each
    on its own task's images against every task's labels; 001 Tab. 3 has an ensemble instead)."""
    metrics = [f"hits@{k}" for k in JOINT_KS]
    frame = _rows(selected_scores(ds, JOINT, metrics), "metric")
    reference = 100 * ds["reference_score"].sel(task=JOINT, metric=metrics)
    references = {(name, "-"): reference.sel(reference=name).values for name in ("zeroshot", "finetuned")}
    frame = _with_references(frame, references)
    frame.columns = pd.Index([f"Hits@{k}" for k in JOINT_KS], dtype=object)
    return _attrs(frame.round(1), ds, "001 Tab. 3 layout", references, frame.columns)


def joint_by_task_frame(ds: xr.Dataset) -> pd.DataFrame:
    """Joint-task Hits@1/3/5 per task in % (each task's test images against the union of every task's
    labels), one row per method × space × Hits@k, columns the tasks and ``Avg.`` (the micro average
    over every image, :func:`joint_frame`'s value; 001 Tab. 10). First rows: the zero-shot model and
    the fine-tuned experts (each on its own task's images); the best merged value per task and
    Hits@k in bold."""
    tasks, columns = list(ds.attrs["tasks"]), [*ds.attrs["tasks"], JOINT]
    metrics = {f"hits@{k}": f"Hits@{k}" for k in JOINT_KS}
    rows = {(name, "-", label): 100 * ds["reference_score"].sel(reference=name, task=columns, metric=m).values
            for name in ("zeroshot", "finetuned") for m, label in metrics.items()}
    references = list(rows)
    picked = selected_scores(ds, columns, list(metrics))
    for method in method_order(strings(picked.merge_method.values)):
        for space in _space_order(strings(picked.space.values)):
            for m, label in metrics.items():
                values = 100 * picked.sel(merge_method=method, space=space, metric=m).values
                if not np.isnan(values).all():
                    rows[(method, space, label)] = values
    index = pd.MultiIndex.from_tuples(list(rows), names=["method", "space", "metric"])
    frame = pd.DataFrame(list(rows.values()), index=index, columns=pd.Index([*tasks, AVG], dtype=object))
    return _attrs(frame.round(1), ds, "001 Tab. 10 layout", references, [*tasks, AVG], within="metric")


def rank_frame(results: Mapping[str, xr.Dataset]) -> pd.DataFrame:
    """Mean absolute and normalised test accuracy (%) over the tasks, per method × space, of studies
    that merge the same tasks with adapters of different LoRA ranks (000 Tab. 13's layout:
    ``results`` maps a column label such as ``"r = 4"`` to that study's results). Columns
    ``(label, "Abs.")`` and ``(label, "Norm.")``; rows: the method × space runs every study has."""
    parts = {}
    for label, ds in results.items():
        frame = _rows(selected_scores(ds, list(ds.attrs["tasks"]), ["acc", "norm_acc"]).mean("task"), "metric")
        frame.columns = pd.Index(["Abs.", "Norm."], dtype=object)
        parts[label] = frame
    frame = pd.concat(parts, axis=1, join="inner")
    order = [(m, s) for m in method_order(dict.fromkeys(frame.index.get_level_values("method")))
             for s in _space_order(dict.fromkeys(frame.index.get_level_values("space"))) if (m, s) in frame.index]
    studies = ", ".join(str(ds.attrs.get("study", "?")) for ds in results.values())
    return _attrs(frame.loc[order].round(1), next(iter(results.values())), "000 Tab. 13 layout", [], list(frame.columns),
                  study=studies)


def joint_grid_frame(ds: xr.Dataset, k: int = 1) -> pd.DataFrame:
    """Joint-task Hits@``k`` in %, one row per space and one column per method (003 Tab. 4's
    layout); NaN where a method did not run in a space. Each method's best space is ranked."""
    joint = joint_frame(ds)
    merged = joint.drop(index=joint.attrs["references"])
    methods = list(dict.fromkeys(merged.index.get_level_values("method")))  # already in registry order
    frame = merged[f"Hits@{k}"].unstack("method").reindex(index=_space_order(merged.index.get_level_values("space")), columns=methods)
    frame.columns.name, frame.index.name = "method", "space"
    return _attrs(frame, ds, "003 Tab. 4 layout", [], methods, k=k)


def bold_best(frame: pd.DataFrame, *, columns: Sequence[str] | None = None, references: Sequence | None = None,
              caption: str | None = None) -> Styler:
    """``frame`` as a Styler: numbers at one decimal (``Δ Avg.`` signed, NaN as "–"), the largest
    value of each of ``columns`` in bold (every row that reaches it; the rows ``references`` left
    out of the comparison), ``caption`` above. ``columns`` and ``references`` default to
    ``frame.attrs["ranked"]`` / ``frame.attrs["references"]``, else every numeric column / none.
    With ``frame.attrs["within"]`` (an index level, e.g. ``metric``), rows compete only with the
    rows of their own value of that level."""
    columns = list(columns if columns is not None else frame.attrs.get("ranked", frame.select_dtypes("number").columns))
    references = list(references if references is not None else frame.attrs.get("references", []))
    within = frame.attrs.get("within")
    group = (lambda r: r[frame.index.names.index(within)]) if within else (lambda r: None)
    ranked = [r for r in frame.index if r not in references]

    def best(column: pd.Series) -> list[str]:
        tops = {g: column.loc[[r for r in ranked if group(r) == g]].max() for g in {group(r) for r in ranked}}
        return [BOLD if r in ranked and not np.isnan(tops[group(r)]) and v == tops[group(r)] else "" for r, v in column.items()]

    styler = frame.style.format(precision=1, na_rep="–")
    if DELTA in frame.columns:
        styler = styler.format("{:+.1f}", subset=[DELTA], na_rep="–")
    styler = styler.apply(best, axis=0, subset=[c for c in columns if c in frame.columns])
    return styler.set_caption(caption) if caption else styler


def _caption(frame: pd.DataFrame, what: str, best: str = "best merged value per column") -> str:
    return (f"{what}; {best} in bold ({frame.attrs['paper']}). "
            f"{frame.attrs['dataset']}; study {frame.attrs['study']}")


def paper_table(ds: xr.Dataset, metric: str = "norm_acc", *, finetuned: bool = True, delta: str | None = "full") -> Styler:
    """:func:`per_task_frame` in the layout of 003 Tab. 3 / 001 Tab. 1: one decimal, the best
    merged value of each task and of ``Avg.`` in bold, a caption saying whose numbers these are."""
    frame = per_task_frame(ds, metric, finetuned=finetuned, delta=delta)
    what = f"{_WHAT[metric]} per task (%, test) of the selected configuration of each method × space"
    if finetuned:
        what += "; first row: each task's fine-tuned model, absolute accuracy"
    if delta is not None:
        what += f"; {DELTA}: the row's {AVG} minus the method's in {delta} space"
    return bold_best(frame, caption=_caption(frame, what))


def unseen_table(ds: xr.Dataset) -> Styler:
    """:func:`unseen_frame` in the layout of 001 Tab. 4, the best merged value per column in bold."""
    frame = unseen_frame(ds)
    what = (f"normalised accuracy (%, test) of the selected configuration of each method × space on the merged tasks and "
            f"on the unseen ones ({', '.join(frame.attrs['unseen'])}: evaluated only, never merged or selected on)")
    return bold_best(frame, caption=_caption(frame, what))


def joint_table(ds: xr.Dataset) -> Styler:
    """:func:`joint_frame` in the layout of 001 Tab. 3, the best merged Hits@k in bold."""
    frame = joint_frame(ds)
    what = ("joint-task Hits@k (%, test; every image against the union of all tasks' labels) of the selected "
            "configuration of each method × space; first rows: the zero-shot model, the fine-tuned experts")
    return bold_best(frame, caption=_caption(frame, what))


def joint_by_task_table(ds: xr.Dataset) -> Styler:
    """:func:`joint_by_task_frame` in the layout of 001 Tab. 10."""
    frame = joint_by_task_frame(ds)
    what = ("joint-task Hits@k per task (%, test; each task's images against the union of all tasks' labels; "
            f"{AVG}: over every image) of the selected configuration of each method × space; first rows: the "
            "zero-shot model, the fine-tuned experts")
    return bold_best(frame, caption=_caption(frame, what, best="best merged value per column and Hits@k"))


def rank_table(results: Mapping[str, xr.Dataset]) -> Styler:
    """:func:`rank_frame` in the layout of 000 Tab. 13, the best value of each column in bold."""
    frame = rank_frame(results)
    what = ("mean absolute (Abs.) and normalised (Norm.) accuracy (%, test) of the selected configuration of each "
            f"method × space, one column pair per adapter rank ({', '.join(results)})")
    return bold_best(frame, caption=_caption(frame, what))


def joint_grid(ds: xr.Dataset, k: int = 1) -> Styler:
    """:func:`joint_grid_frame` in the layout of 003 Tab. 4, each method's best space in bold."""
    frame = joint_grid_frame(ds, k)
    what = f"joint-task Hits@{k} (%, test) of the selected configuration, space × method"
    return bold_best(frame, caption=_caption(frame, what, best="each method's best space"))
