"""The regime of a study: does it reproduce the papers' orderings, and which diagnostic says why not?

Reads a study's results Dataset from a store (``studies/<name>/results``, written by ``mergelab
run`` / ``mergelab demo``) and prints

1. one table: zero-shot and fine-tuned references, task arithmetic, the best static method, TIES /
   TSV / Iso-C / CART per space, every adaptive run with its mean ``|Δcoefficient|``;
2. the adaptive runs' plateaus (the objective's change over the last quarter of the run);
3. the diagnostics of issue 27: (a) others-only retention — each task's update alone,
   ``W₀ + λΔW_t``, scored on the *other* tasks (mean normalised accuracy) at λ = 1 and at the TA
   optimum; (b) the TA curve over λ; (c) the rank correlation (Spearman) of mean prediction entropy
   and accuracy across the study's merges (AdaMerging's premise: lower entropy, higher accuracy,
   so the correlation should be strongly negative); (d) how much the summed update concentrates in
   shared directions: ``‖Σ_t ΔW_t‖²_F / Σ_t ‖ΔW_t‖²_F`` (1: orthogonal tasks, > 1: aligned) and the
   coverage ratio ``erank(ΔW stack) / Σ_t erank(X_t)`` (001 Sec. 2.2), medians over modules;
4. the regime targets with the papers' column beside each (cited by table).

Every number is on ``--split`` (``test`` by default; ``val`` for the build-variant search, which
never looks at test) of the configuration selected on val (the study's rule): nothing here looks
at test to choose.

    PYTHONPATH=lib:. python benchmarks/regime.py                      # the demo: data/store, study micro
    PYTHONPATH=lib:. python benchmarks/regime.py --study FILE [--store S] [--split val] [--json OUT]

A benchmark, not a test: it asserts nothing and exits 0 whether or not the targets hold.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from mergelab.config import load_study  # noqa: E402
from mergelab.errors import InputError  # noqa: E402
from mergelab.store import Store  # noqa: E402
from mergelab.study import results_table  # noqa: E402
from mergelab.docblocks import REGIME_BLOCK, replace_block  # noqa: E402
from mergelab.study.results import hyper_parameters, interval_label, paired_gain_interval  # noqa: E402

#: Static methods whose per-space rows the regime shows (003's Full vs KnOTS vs Core comparison).
PER_SPACE = ("ties", "tsv", "iso_c", "cart")
ADAPTIVE = ("adamerging", "adamerging_tas", "tara_a", "tara_b", "adarank")
#: Metrics of the results Dataset per split: (normalised accuracy, accuracy).
SPLIT_METRICS = {"test": ("norm_acc", "acc"), "val": ("val_norm_acc", "val_acc")}


# The table ------------------------------------------------------------------------------------------


def split_table(ds, split: str = "test"):
    """:func:`results_table` with ``norm_acc`` / ``acc`` read from ``split`` (the selection is the study's)."""
    if split not in SPLIT_METRICS:
        raise SystemExit(f"error: unknown split {split!r}; choose one of {sorted(SPLIT_METRICS)}")
    if split == "test":
        return results_table(ds)
    norm, acc = SPLIT_METRICS[split]
    swapped = ds.copy()
    for variable in ("score", "reference_score"):
        metric = swapped[variable].metric.values.copy()
        i, j, k, m = (list(metric).index(x) for x in ("norm_acc", norm, "acc", acc))
        metric[[i, j, k, m]] = metric[[j, i, m, k]]
        swapped[variable] = swapped[variable].assign_coords(metric=metric)
    return results_table(swapped)


def _score(table, method: str, space: str | None = None) -> float:
    rows = table[(table.method == method) & ((table.space == space) if space else True)]
    return float(rows.norm_acc.max()) if len(rows) else math.nan


def _split(table):
    """(static merges, adaptive runs): adaptive rows are those with a ``|Δcoef|``."""
    merged = table[~table.method.isin(["zeroshot", "finetuned"])]
    adaptive = merged["|Δcoef|"].notna() if "|Δcoef|" in merged else merged.method.isin(ADAPTIVE)
    return merged[~adaptive], merged[adaptive]


def regime_rows(table, ds=None) -> list[dict[str, Any]]:
    """Rows of the regime table: references, TA, best static, per-space, adaptive; each with its config,
    normalised accuracy %, ``|Δcoef|`` and, given the results ``ds`` (test split), the labels of its
    95 % paired bootstrap intervals against task arithmetic and zero-shot (``*``: significant)."""
    def row(name: str, r=None, method: str | None = None) -> dict[str, Any]:
        out = {"row": name, "config": "-" if r is None else r.config, "norm_acc": _score(table, method) if r is None else r.norm_acc,
               "delta_coef": math.nan if r is None else r.get("|Δcoef|", math.nan)}
        if ds is not None and r is not None and "gain_ci" in ds:
            ci = ds["gain_ci"].sel(merge_method=r.method, space=r.space).isel(seed=0)
            out |= {f"vs {v}": interval_label(*ci.sel(versus=v).values) for v in ("task_arithmetic", "zeroshot")}
        return out

    out = [row("zero-shot", method="zeroshot"), row("fine-tuned", method="finetuned")]
    static, adaptive = _split(table)
    for _, r in static[static.method == "task_arithmetic"].iterrows():
        out.append(row(f"task arithmetic ({r.space})", r))
    if len(static):
        best = static.loc[static.norm_acc.idxmax()]
        out.append(row(f"best static: {best.method} ({best.space})", best))
    for method in PER_SPACE:
        for _, r in static[static.method == method].iterrows():
            out.append(row(f"{method} ({r.space})", r))
    for _, r in adaptive.iterrows():
        out.append(row(f"{r.method} ({r.space})", r))
    return out


# Targets (issue 27: the papers' orderings at roughly half their gaps) -----------------------------------


@dataclass(frozen=True)
class Target:
    """One regime target: ``measured(table) ≥ low`` (and ``≤ high``); ``papers``: the same quantity in
    the papers (ViT-B/32, LoRA r16), with the table it comes from."""

    what: str
    low: float
    high: float
    papers: str
    pair: tuple[tuple[str, str], tuple[str, str] | None] | None = None

    def holds(self, value: float) -> bool:
        return bool(self.low <= value <= self.high)


def _best_static(table) -> float:
    static, _ = _split(table)
    return float(static.norm_acc.max()) if len(static) else math.nan


def _lowest_adaptive_over_zeroshot(table) -> float:
    _, adaptive = _split(table)
    return float(adaptive.norm_acc.min()) - _score(table, "zeroshot") if len(adaptive) else math.nan


TARGETS: dict[Target, Any] = {
    Target("fine-tuned mean absolute accuracy (%)", 80, math.inf, "74.0-99.3 per task (003 Tab. 3)"):
        lambda t: float(t[t.method == "finetuned"].acc.max()),
    Target("zero-shot normalised accuracy", -math.inf, 70, "≈ 60.5 (002 Pretrained / 001 fine-tuned)"):
        lambda t: _score(t, "zeroshot"),
    Target("TA − zero-shot", 1, 8, "+3.3 (001 Tab. 1)", (("task_arithmetic", "full"), None)): lambda t: _score(t, "task_arithmetic", "full") - _score(t, "zeroshot"),
    Target("Iso-C (full) − TA", 3, math.inf, "+9.8 (003 Tab. 3)", (("iso_c", "full"), ("task_arithmetic", "full"))):
        lambda t: _score(t, "iso_c", "full") - _score(t, "task_arithmetic", "full"),
    Target("best static − TA", 5, math.inf, "+12.6 (003 Tab. 3: TSV+Iso-C Core)"):
        lambda t: _best_static(t) - _score(t, "task_arithmetic", "full"),
    Target("TIES Core − TIES Full", 1.5, math.inf, "+4.9 (003 Tab. 3)", (("ties", "core"), ("ties", "full"))): lambda t: _score(t, "ties", "core") - _score(t, "ties", "full"),
    Target("TIES KnOTS − TIES Full", 1, math.inf, "+4.0 (003 Tab. 3)", (("ties", "knots"), ("ties", "full"))): lambda t: _score(t, "ties", "knots") - _score(t, "ties", "full"),
    Target("Iso-C Core − Iso-C Full", 0, math.inf, "+2.3 (003 Tab. 3)", (("iso_c", "core"), ("iso_c", "full"))): lambda t: _score(t, "iso_c", "core") - _score(t, "iso_c", "full"),
    Target("CART Core − CART Full", 0, math.inf, "+1.9 (003 Tab. 3)", (("cart", "core"), ("cart", "full"))): lambda t: _score(t, "cart", "core") - _score(t, "cart", "full"),
    Target("AdaMerging − TA", 3, math.inf, "+6.9 (001 Tab. 1)", (("adamerging", "full"), ("task_arithmetic", "full"))): lambda t: _score(t, "adamerging") - _score(t, "task_arithmetic", "full"),
    Target("TARA-A − AdaMerging", 0, math.inf, "+3.2 (001 Tab. 1, 250 iters)", (("tara_a", "full"), ("adamerging", "full"))): lambda t: _score(t, "tara_a") - _score(t, "adamerging"),
    Target("TARA-B − AdaMerging", 1, math.inf, "+5.6 (001 Tab. 1, 250 iters)", (("tara_b", "full"), ("adamerging", "full"))): lambda t: _score(t, "tara_b") - _score(t, "adamerging"),
    Target("AdaRank (TA origin) − TA", 2, math.inf, "a gain over its origin (002 Sec. 6, full fine-tuning)",
           (("adarank", "full"), ("task_arithmetic", "full"))):
        lambda t: _score(t, "adarank") - _score(t, "task_arithmetic", "full"),
    Target("lowest adaptive − zero-shot", 0, math.inf, "every adaptive method above zero-shot (001 Tab. 1)"):
        _lowest_adaptive_over_zeroshot,
}


def targets(table, ds=None) -> list[tuple[Target, float, bool, str]]:
    """``(target, measured value, holds, interval)`` for every :data:`TARGETS` entry (NaN: the study lacks
    a row); ``interval``: given the results ``ds`` (test split), the 95 % paired bootstrap interval of a
    target that is a gap between two models (``*``: significant), else ``""``."""
    out = []
    for target, measure in TARGETS.items():
        value = measure(table)
        interval = ""
        if ds is not None and target.pair is not None and "selected_hit" in ds:
            interval = interval_label(*paired_gain_interval(ds, *target.pair))
        out.append((target, value, target.holds(value) if not math.isnan(value) else False, interval))
    return out


# Adaptive runs ------------------------------------------------------------------------------------


def plateaus(store: Store, study: str) -> list[tuple[str, float, float, float]]:
    """Per adaptive run of the study: ``(label, objective at the first step, at the last step,
    change over the last quarter of the run relative to the whole change)``; a run has converged
    when the last number is small (its objective no longer moves)."""
    out = []
    for name, key in sorted(store.refs().items()):
        prefix = f"studies/{study}/adapt/"
        if not name.startswith(prefix):
            continue
        objective = store.get_dataset(key)["objective"].values
        quarter = max(1, len(objective) // 4)
        first, last = float(objective[:5].mean()), float(objective[-5:].mean())
        late = float(objective[-quarter - 5:-quarter].mean()) - last if len(objective) > quarter + 5 else math.nan
        out.append((name.removeprefix(prefix), first, last, late / (first - last) if first != last else math.nan))
    return out


# Diagnostics --------------------------------------------------------------------------------------


def ta_curve(ds, split: str = "test") -> dict[float, float]:
    """(b) Task arithmetic's mean normalised accuracy (%) on ``split`` at every ``alpha`` of the study's grid."""
    norm, _ = SPLIT_METRICS[split]
    tasks = list(ds.attrs["tasks"])
    score = ds["score"].sel(merge_method="task_arithmetic", space="full", metric=norm, task=tasks).mean(["task", "seed"])
    out = {}
    for config, value in zip(score.config.values, score.values, strict=True):
        configured = hyper_parameters(ds, str(config))
        if not np.isnan(value) and set(configured) == {"alpha"}:
            out[float(configured["alpha"])] = 100 * float(value)
    return dict(sorted(out.items()))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson's on average ranks; ties share their mean rank)."""
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic) if len(x) > 2 else math.nan


def entropy_accuracy(ds) -> tuple[float, int]:
    """(c) Spearman correlation of the mean val prediction entropy and the mean val accuracy across
    every merge of the study (each method × space × configuration × seed), and how many merges."""
    tasks = list(ds.attrs["tasks"])
    if "val_entropy" not in ds["score"].metric.values:
        return math.nan, 0
    h = ds["score"].sel(metric="val_entropy", task=tasks).mean("task").values.ravel()
    acc = ds["score"].sel(metric="val_acc", task=tasks).mean("task").values.ravel()
    keep = ~(np.isnan(h) | np.isnan(acc))
    return spearman(h[keep], acc[keep]), int(keep.sum())


def retention(micro, lambdas: Sequence[float], rank: int | str | None = None, split: str = "val") -> dict[str, Any]:
    """(a) Others-only retention on the loaded micro benchmark ``micro``: for each task t, the *other*
    tasks' mean normalised accuracy (%) on ``split`` under ``W₀ + λΔW_t``, for each λ, beside the
    reference a model whose tasks spare each other keeps there, the base model's mean normalised
    accuracy. A large pre-trained model stays near that reference; a model whose task updates damage
    the other tasks falls below it."""
    from mergelab.evaluation.metrics import evaluate_task

    base = micro.backbone.base_state()
    dense = {u.name: {m: d.dense() for m, d in u.modules.items()} for u in micro.taskset(rank)}

    def accuracy(task: str, update: Mapping[str, Any] | None = None, lam: float = 1.0) -> float:
        params = None if update is None else {**base, **{m: base[m] + lam * d for m, d in update.items()}}
        return evaluate_task(micro.backbone, micro.tasks[task], params, split)

    finetuned = {t: accuracy(t, dense[t]) for t in dense}
    per_task = {t: {float(lam): 100 * float(np.mean([accuracy(s, dense[t], lam) / finetuned[s] for s in dense if s != t]))
                    for lam in lambdas} for t in dense}
    return {"lambdas": [float(lam) for lam in lambdas], "per_task": per_task,
            "zero_shot": 100 * float(np.mean([accuracy(t) / finetuned[t] for t in dense])),
            "mean": {str(float(lam)): float(np.mean([v[float(lam)] for v in per_task.values()])) for lam in lambdas}}


def concentration(taskset) -> dict[str, float]:
    """(d) Medians over modules of ``‖Σ_t ΔW_t‖²_F / Σ_t ‖ΔW_t‖²_F`` (``alignment``: 1 when the tasks'
    updates are orthogonal, up to T when identical) and of ``erank(ΔW stack) / Σ_t erank(X_t)``
    (``coverage``: 001 Sec. 2.2's task-agnostic erank over the per-task sum; below 1 when the tasks
    share directions)."""
    from mergelab.analysis.coverage import subspace_coverage
    from mergelab.analysis.factored import matrix_modules

    ratios = []
    for updates in matrix_modules(taskset).values():
        dense = [u.dense().double() for u in updates]
        ratios.append(float(sum(dense).pow(2).sum() / sum(d.pow(2).sum() for d in dense)))
    cov = subspace_coverage(taskset)
    coverage = (cov["erank_agnostic"] / cov["erank_per_task_sum"]).values
    return {"alignment": float(np.median(ratios)), "coverage": float(np.nanmedian(coverage))}


# Measure and print ------------------------------------------------------------------------------------


def measure(study_file: str | Path, store_url: str | None = None, split: str = "test", diagnostics: bool = True) -> dict[str, Any]:
    """Everything :func:`main` prints, as plain data (``benchmarks/variants.py`` stores it per variant)."""
    spec = load_study(study_file)
    store = Store(spec.store_url(store_url))
    ds = store.get_dataset(store.ref(f"studies/{spec.name}/results"))
    table = split_table(ds, split)
    out: dict[str, Any] = {
        "study": spec.name, "split": split, "note": ds.attrs.get("note", ""), "selection": ds.attrs["selection"],
        "rows": regime_rows(table, ds if split == "test" else None),
        "plateaus": [{"run": n, "first": f, "last": la, "last_quarter_share": s} for n, f, la, s in plateaus(store, spec.name)],
        "targets": [{"what": t.what, "low": t.low, "high": t.high, "papers": t.papers, "value": v, "holds": h, "interval": i}
                    for t, v, h, i in targets(table, ds if split == "test" else None)],
        "ta_curve": ta_curve(ds, split),
    }
    rho, n = entropy_accuracy(ds)
    out["entropy_accuracy"] = {"spearman": rho, "merges": n}
    if diagnostics and spec.bench.kind == "micro":
        from mergelab.micro.benchmark import load_micro

        micro = load_micro(spec.bench.root)
        curve = ta_curve(ds, "val")  # the TA optimum is chosen on val, whatever split the table reads
        best = max(curve, key=curve.get) if curve else 1.0
        out["retention"] = retention(micro, sorted({1.0, best}), spec.bench.rank)
        out["concentration"] = concentration(micro.taskset(spec.bench.rank))
    return out


def _fmt(value: float, signed: bool = False) -> str:
    return "n/a" if value is None or math.isnan(value) else (f"{value:+.1f}" if signed else f"{value:.1f}")


def report(m: Mapping[str, Any]) -> str:
    """The printed regime of one :func:`measure` result."""
    lines = [f"study {m['study']} ({m['note']}); {m['split']} split, configurations selected on {m['selection']}"]
    width = max([len("config"), *(len(r["config"]) for r in m["rows"])])
    lines.append(f"{'row':<36} {'config':<{width}} {'norm_acc %':>10} {'|Δcoef|':>9}  {'vs TA, 95 % CI':<15} vs zero-shot")
    for r in m["rows"]:
        delta = "" if r["delta_coef"] is None or math.isnan(r["delta_coef"]) else f"{r['delta_coef']:.4f}"
        lines.append(f"{r['row']:<36} {r['config']:<{width}} {_fmt(r['norm_acc']):>10} {delta:>9}  "
                     f"{r.get('vs task_arithmetic', ''):<15} {r.get('vs zeroshot', '')}")
    if m["split"] == "test":
        lines.append("intervals: paired bootstrap over test images, points of normalised accuracy; *: the gap is significant")
    lines += ["", f"{'adaptive run':<20} {'objective first 5':>18} {'last 5':>10} {'last-quarter share of the change':>34}"]
    lines += [f"{p['run']:<20} {p['first']:>18.4f} {p['last']:>10.4f} {p['last_quarter_share']:>34.2f}" for p in m["plateaus"]]
    lines += ["", "diagnostics"]
    lines.append("(b) TA curve (λ: norm_acc %): " + ", ".join(f"{float(lam):g}: {v:.1f}" for lam, v in m["ta_curve"].items()))
    ea = m["entropy_accuracy"]
    lines.append(f"(c) Spearman(entropy, accuracy) over {ea['merges']} merges (val): {_fmt(ea['spearman'])} "
                 "(AdaMerging's premise: strongly negative)" if ea["merges"] else "(c) no val_entropy in this study's results (rerun it)")
    if "retention" in m:
        r = m["retention"]
        lines.append(f"(a) others-only retention (val, mean normalised % of the other tasks under W0 + λΔW_t; zero-shot "
                     f"{r['zero_shot']:.1f}): " + ", ".join(f"λ {lam}: {v:.1f}" for lam, v in r["mean"].items()))
        c = m["concentration"]
        lines.append(f"(d) shared directions (medians over modules): ‖ΣΔW‖²/Σ‖ΔW‖² {c['alignment']:.3f}, "
                     f"erank(ΔW stack)/Σ erank(X_t) {c['coverage']:.3f}")
    lines += ["", f"{'':6}  {'target':<44} {'measured':>9}  {'95 % CI':<15} papers"]
    for t in m["targets"]:
        bound = (f"≥ {t['low']:g}" if math.isinf(t["high"]) else f"≤ {t['high']:g}" if math.isinf(t["low"])
                 else f"in [{t['low']:g}, {t['high']:g}]")
        signed = "−" in t["what"]
        lines.append(f"{'holds ' if t['holds'] else 'MISSED'}  {t['what'] + ' ' + bound:<44} {_fmt(t['value'], signed):>9}  "
                     f"{t.get('interval', ''):<15} {t['papers']}")
    held = sum(t["holds"] for t in m["targets"])
    lines.append(f"{held} of {len(m['targets'])} targets hold")
    return "\n".join(lines)


def claims_markdown(m: Mapping[str, Any]) -> str:
    """The papers' findings against this study: one row per target, the papers' value, the measured one,
    its 95 % paired bootstrap interval where it is a gap between two models, and whether it holds."""
    lines = [f"| finding ({m['split']} split, selected on {m['selection']}) | papers | {m['study']} | 95 % CI | reproduced |",
             "|---|---|---:|---|---|"]
    for t in m["targets"]:
        bound = (f"≥ {t['low']:g}" if math.isinf(t["high"]) else f"≤ {t['high']:g}" if math.isinf(t["low"])
                 else f"in [{t['low']:g}, {t['high']:g}]")
        lines.append(f"| {t['what']} {bound} | {t['papers']} | {_fmt(t['value'], '−' in t['what'])} | {t.get('interval') or '—'} | "
                     f"{'yes' if t['holds'] else '**no**'} |")
    held = sum(t["holds"] for t in m["targets"])
    lines += ["", f"{held} of {len(m['targets'])} hold ({m['note']}). Diagnostics: TA curve "
              + ", ".join(f"λ {float(lam):g}: {v:.1f}" for lam, v in m["ta_curve"].items())
              + (f"; Spearman(entropy, accuracy) over {m['entropy_accuracy']['merges']} merges {_fmt(m['entropy_accuracy']['spearman'])}"
                 if m["entropy_accuracy"]["merges"] else "")
              + (f"; others-only retention at λ 1: {m['retention']['mean']['1.0']:.1f} (zero-shot {m['retention']['zero_shot']:.1f})"
                 if "retention" in m else "") + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default=None, help="the store (default: the study's, as `mergelab run` resolves it)")
    parser.add_argument("--study", default=str(ROOT / "studies/micro.yaml"), help="the study file (default: the demo's, studies/micro.yaml)")
    parser.add_argument("--split", default="test", choices=sorted(SPLIT_METRICS), help="the split the numbers are read on")
    parser.add_argument("--json", default=None, help="also write the measurements to this JSON file")
    parser.add_argument("--no-diagnostics", action="store_true", help="skip (a) and (d), which load the benchmark and evaluate")
    parser.add_argument("--readme", type=Path, default=None, help="also write the claims table into this file's regime block (docs/demo.md, data/text/README.md)")
    args = parser.parse_args(argv)
    try:
        readme = args.readme.read_text() if args.readme else None
        if readme is not None:
            replace_block(readme, REGIME_BLOCK, "")  # a file without the block fails before the measurement
    except (InputError, OSError) as err:
        print(f"error: --readme {args.readme}: {err}", file=sys.stderr)
        return 2
    try:
        m = measure(args.study, args.store, args.split, diagnostics=not args.no_diagnostics)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report(m))
    if args.json:
        Path(args.json).write_text(json.dumps(m, indent=1, default=float) + "\n")
    if readme is not None:
        args.readme.write_text(replace_block(readme, REGIME_BLOCK, claims_markdown(m)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
