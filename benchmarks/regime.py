"""The regime of a study: does merging beat zero-shot, do the spaces differ, does adaptation move?

Reads a study's results Dataset from a store (``studies/<name>/results``, written by ``mergelab
run`` / ``mergelab demo``) and prints one table: zero-shot and fine-tuned references, task
arithmetic, the best static method, TIES / TSV / Iso-C / CART per space, every adaptive run with
its mean ``|Δcoefficient|``, then each target of issue 12 with the measured value and whether it
holds. Every number is the test split of the configuration selected on val (the study's rule):
nothing here looks at test to choose.

    PYTHONPATH=lib:. python benchmarks/regime.py                      # the demo: data/store, study micro
    PYTHONPATH=lib:. python benchmarks/regime.py --study FILE [--store S]

A benchmark, not a test: it asserts nothing and exits 0 whether or not the targets hold.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from mergelab.config import load_study  # noqa: E402
from mergelab.store import Store  # noqa: E402
from mergelab.study import results_table  # noqa: E402

#: Static methods whose per-space rows the regime shows (003's Full vs KnOTS vs Core comparison).
PER_SPACE = ("ties", "tsv", "iso_c", "cart")
ADAPTIVE = ("adamerging", "adamerging_tas", "tara_a", "tara_b", "adarank")


def _score(table, method: str, space: str | None = None) -> float:
    rows = table[(table.method == method) & ((table.space == space) if space else True)]
    return float(rows.norm_acc.max()) if len(rows) else math.nan


def _split(table):
    """(static merges, adaptive runs): adaptive rows are those with a ``|Δcoef|``."""
    merged = table[~table.method.isin(["zeroshot", "finetuned"])]
    adaptive = merged["|Δcoef|"].notna() if "|Δcoef|" in merged else merged.method.isin(ADAPTIVE)
    return merged[~adaptive], merged[adaptive]


def regime_rows(table) -> list[tuple[str, str, float, float]]:
    """``(row, config, normalised accuracy %, |Δcoef|)`` in the order of issue 12's table."""
    out = [("zero-shot", "-", _score(table, "zeroshot"), math.nan), ("fine-tuned", "-", _score(table, "finetuned"), math.nan)]
    static, adaptive = _split(table)
    for _, r in static[static.method == "task_arithmetic"].iterrows():
        out.append((f"task arithmetic ({r.space})", r.config, r.norm_acc, math.nan))
    if len(static):
        best = static.loc[static.norm_acc.idxmax()]
        out.append((f"best static: {best.method} ({best.space})", best.config, best.norm_acc, math.nan))
    for method in PER_SPACE:
        for _, r in static[static.method == method].iterrows():
            out.append((f"{method} ({r.space})", r.config, r.norm_acc, math.nan))
    for _, r in adaptive.iterrows():
        out.append((f"{r.method} ({r.space})", r.config, r.norm_acc, r.get("|Δcoef|", math.nan)))
    return out


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


def mask_kept(store: Store, study: str) -> dict[str, float]:
    """Per AdaRank run of the study: the share of singular components its final masks keep
    (``mask_kept_fraction`` averaged over modules and tasks; 002 Fig. 5)."""
    out = {}
    for name, key in sorted(store.refs().items()):
        prefix = f"studies/{study}/adapt/"
        if name.startswith(prefix):
            history = store.get_dataset(key)
            if "mask_kept_fraction" in history:
                out[name.removeprefix(prefix)] = float(history["mask_kept_fraction"].isel(record=-1).mean())
    return out


def targets(table, kept: dict[str, float] | None = None) -> list[tuple[str, float, bool]]:
    """Issue 12's targets: ``(what, measured margin or value, holds)``."""
    zs, ft_abs = _score(table, "zeroshot"), float(table[table.method == "finetuned"].acc.max())
    ta = _score(table, "task_arithmetic", "full")
    static, _ = _split(table)
    best = float(static.norm_acc.max()) if len(static) else math.nan
    ties_full = _score(table, "ties", "full")
    ties_best_space = max(_score(table, "ties", "knots"), _score(table, "ties", "core"))
    differs = [m for m in ("tsv", "iso_c", "cart") if abs(_score(table, m, "full") - _score(table, m, "core")) >= 0.05]
    ada = _score(table, "adamerging")
    tara = max(_score(table, "tara_a"), _score(table, "tara_b"))
    rows = [("zero-shot normalised accuracy <= 70", zs, zs <= 70), ("fine-tuned mean accuracy >= 85 %", ft_abs, ft_abs >= 85),
            ("TA - zero-shot >= 10 points", ta - zs, ta - zs >= 10), ("best static - TA >= 3 points", best - ta, best - ta >= 3),
            ("TIES knots/core - TIES full >= 0", ties_best_space - ties_full, ties_best_space >= ties_full),
            (f"TSV / Iso-C / CART differ full vs core ({', '.join(differs) or 'none'})", float(len(differs)), bool(differs)),
            ("AdaMerging - TA >= 2 points", ada - ta, ada - ta >= 2), ("TARA - AdaMerging >= -1 point", tara - ada, tara - ada >= -1)]
    if kept:
        least = min(kept.values())
        rows.append((f"AdaRank's masks drop components (kept: {', '.join(f'{k} {v:.0%}' for k, v in kept.items())})",
                     least, least < 1.0))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default=None, help="the store (default: the study's, as `mergelab run` resolves it)")
    parser.add_argument("--study", default=str(ROOT / "studies/micro.yaml"), help="the study file (default: the demo's, studies/micro.yaml)")
    args = parser.parse_args(argv)
    spec = load_study(args.study)
    store = Store(spec.store_url(args.store))
    ds = store.get_dataset(store.ref(f"studies/{spec.name}/results"))
    table = results_table(ds)
    print(f"study {spec.name} ({ds.attrs.get('note', '')}); test split, configurations selected on {ds.attrs['selection']}")
    rows = regime_rows(table)
    width = max([len("config"), *(len(config) for _, config, _, _ in rows)])
    print(f"{'row':<36} {'config':<{width}} {'norm_acc %':>10} {'|Δcoef|':>9}")
    for name, config, norm, delta in rows:
        print(f"{name:<36} {config:<{width}} {norm:>10.1f} {'' if math.isnan(delta) else f'{delta:.4f}':>9}")
    print()
    print(f"{'adaptive run':<20} {'objective first 5':>18} {'last 5':>10} {'last-quarter share of the change':>34}")
    for label, first, last, late in plateaus(store, spec.name):
        print(f"{label:<20} {first:>18.4f} {last:>10.4f} {late:>34.2f}")
    print()
    for what, value, holds in targets(table, mask_kept(store, spec.name)):
        shown = "" if "differ" in what or "masks" in what else f": {value:+.1f}"  # those two say it in words
        print(f"{'holds ' if holds else 'MISSED'}  {what}{shown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
