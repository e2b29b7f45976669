"""The measured search of micro-benchmark build variants (issue 27), one variant at a time, on val.

Each variant changes one lever of the build (the pre-trained model: longer pre-training, a deeper
image tower; then the LoRA fine-tuning's feature-consistency weight between 0 and 1, LoRA steps).
For each, in order:

1. build the r4 adapter set (no dense suite) through the store with ``build_micro`` — every step
   has a content key, so a killed run resumes where it stopped and variants that share a
   pre-trained base train it once;
2. run a reduced study on it (the demo's static methods and adaptive runs, selection on val, the
   coverage analysis) into the same store;
3. measure it with ``benchmarks/regime.py`` on the **val** split (never test), diagnostics
   included, and record it in ``data/micro/variants.json``, from which ``data/micro/README.md``'s
   variant table is drawn (the choice rule is declared there before any variant ran).

    PYTHONPATH=lib python benchmarks/variants.py                 # every variant not yet measured, in order
    PYTHONPATH=lib python benchmarks/variants.py c0-long c0.25   # just these
    PYTHONPATH=lib python benchmarks/variants.py --list
    PYTHONPATH=lib python benchmarks/variants.py --ship          # rebuild data/micro with the chosen variant

Work goes to ``build/variants/`` (ignored by git; ``--root``). A variant whose base is ``best``
uses the c0 base variant that meets the most targets on val, ties broken by the highest
others-only retention at λ = 1 (it must have been measured first).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import regime  # noqa: E402
from checkout import pythonpath  # noqa: E402
from mergelab.micro.build import CONFIGS, BuildConfig, build_micro  # noqa: E402
from mergelab.micro.export import VARIANTS_FILE, write_readme  # noqa: E402

RECORD = ROOT / "data" / "micro" / VARIANTS_FILE
#: The reduced study's analyses: (d)'s coverage statistics; the others do not bear on the regime.
ANALYSES = ["coverage"]
#: The reduced study's adaptive runs: the ones the regime targets name.
ADAPTIVE = ("adamerging", "tara_a", "tara_b", "adarank")


@dataclass(frozen=True)
class Variant:
    """One build variant: ``lever`` says what it changes; ``base`` names the variant whose pre-trained
    model it reuses (``best``: chosen by the rule in the module docstring; ``None``: its own)."""

    lever: str
    pretrain_steps: int = 1200
    vision_layers: int | None = None
    consistency: float = 0.0
    lora_steps: int = 600
    base: str | None = None
    shipped: bool = False

    @property
    def departures(self) -> int:
        """Departures from the papers' fine-tuning recipe (plain cross-entropy LoRA): the consistency term."""
        return int(self.consistency > 0)


#: The shipped benchmark (``data/micro``), measured by the same reduced study: the bar a variant must clear.
SHIPPED = "v2-shipped"


#: The search, in the order it runs (at most 8, issue 27). Pre-training levers first (c0: the papers'
#: plain cross-entropy fine-tuning), then the consistency weight in (0, 1) on the best c0 base.
VARIANTS: dict[str, Variant] = {
    SHIPPED: Variant("the v2 build data/micro held before v3: consistency 3, 1200 LoRA steps (measured there, not rebuilt)",
                     consistency=3.0, lora_steps=1200, shipped=True),
    "c0": Variant("v2 base (1200 pre-training steps), plain cross-entropy LoRA (the papers' recipe)"),
    "c0-long": Variant("3× longer pre-training (3600 steps)", pretrain_steps=3600),
    "c0-deep": Variant("a 6-block image tower, 3600 pre-training steps", pretrain_steps=3600, vision_layers=6),
    "c0.1": Variant("consistency weight 0.1", consistency=0.1, base="best"),
    "c0.25": Variant("consistency weight 0.25", consistency=0.25, base="best"),
    "c0.5": Variant("consistency weight 0.5", consistency=0.5, base="best"),
    "c0.25-1200": Variant("consistency weight 0.25, 1200 LoRA steps", consistency=0.25, lora_steps=1200, base="best"),
}


def load_record() -> dict[str, Any]:
    return json.loads(RECORD.read_text()) if RECORD.is_file() else {}


def best_base(record: dict[str, Any]) -> str:
    """The c0 variant meeting the most val targets, ties broken by others-only retention at λ = 1."""
    measured = [n for n, v in VARIANTS.items() if v.base is None and not v.shipped and n in record]
    if not measured:
        raise SystemExit("error: no c0 base variant measured yet; run `benchmarks/variants.py c0` first")

    def rank(name: str) -> tuple[int, float]:
        m = record[name]["regime"]
        return sum(t["holds"] for t in m["targets"]), m.get("retention", {}).get("mean", {}).get("1.0", -math.inf)

    return max(measured, key=rank)


def resolve(name: str, record: dict[str, Any]) -> Variant:
    """The variant with its ``base`` resolved to a c0 variant's pre-training settings."""
    variant = VARIANTS[name]
    if variant.base is None or variant.shipped:
        return variant
    name = best_base(record) if variant.base == "best" else variant.base
    base = VARIANTS[name]
    return dataclasses.replace(variant, pretrain_steps=base.pretrain_steps, vision_layers=base.vision_layers, base=name)


def ship_config(variant: Variant) -> BuildConfig:
    """The whole shipped ``full`` build (every adapter set, the dense suite) with the variant's levers."""
    full = CONFIGS["full"]
    return dataclasses.replace(full, pretrain=dataclasses.replace(full.pretrain, steps=variant.pretrain_steps),
                               lora_steps=variant.lora_steps, consistency=variant.consistency,
                               vision_layers=variant.vision_layers)


def build_config(variant: Variant) -> BuildConfig:
    """What a variant builds to be measured: :func:`ship_config`'s r4 adapters only, no dense suite (the
    same content keys, so shipping the chosen variant trains only what it adds)."""
    return dataclasses.replace(ship_config(variant), ranks=(4,), dense={})


def chosen(record: dict[str, Any]) -> str:
    """The declared choice rule (data/micro/README.md): the measured variant meeting the most val targets,
    ties broken by the fewest departures from the papers' recipe, then the highest others-only retention at λ = 1."""
    def rank(name: str) -> tuple[int, int, float]:
        m = record[name]["regime"]
        return (sum(t["holds"] for t in m["targets"]), -VARIANTS[name].departures,
                m.get("retention", {}).get("mean", {}).get("1.0", -math.inf))

    return max((n for n in VARIANTS if n in record), key=rank)


def ship(root: Path, threads: int) -> int:
    """Rebuild ``data/micro`` with the chosen variant (every adapter set, the dense suite) through the
    variants' store, unless the shipped build stays: it is chosen, or the choice meets no more
    targets than it does (the rule's last clause)."""
    record = load_record()
    name = chosen(record)
    holds = {n: sum(t["holds"] for t in record[n]["regime"]["targets"]) for n in (name, SHIPPED) if n in record}
    if VARIANTS[name].shipped or holds[name] <= holds.get(SHIPPED, -1):
        print(f"the shipped build stays: {name} is chosen with {holds[name]} targets on val "
              f"(the shipped build: {holds.get(SHIPPED, 'unmeasured')})")
        return 0
    print(f"== shipping {name} ({holds[name]} targets on val; the shipped build {holds.get(SHIPPED, 'unmeasured')})", flush=True)
    build_micro(ROOT / "data" / "micro", str(root / "store"), profile=ship_config(resolve(name, record)), threads=threads)
    rerender_readme()
    return 0


#: Scaling grids' hyper-parameters, extended below their smallest value (the demo's grids sit around the
#: v2 build's optima; a variant whose updates damage the other tasks selects smaller ones).
SCALES = ("alpha", "iso_c.alpha")


def widened(grid: dict[str, list[float]]) -> dict[str, list[float]]:
    """The grid with ``min / 4`` and ``min / 2`` added to each scaling hyper-parameter's values."""
    return {k: sorted({*v, min(v) / 4, min(v) / 2}) if k in SCALES else v for k, v in grid.items()}


def study_file(name: str, bench_root: Path, store: Path, out: Path) -> Path:
    """The demo study reduced to what the regime needs, on the variant's benchmark: its static methods on
    widened grids, the adaptive runs the targets name from each paper's own start (no ``adaptive_init``:
    AdaMerging 0.3, TARA 0.4), the coverage analysis; selection on val."""
    study = yaml.safe_load((ROOT / "studies" / "micro.yaml").read_text())
    study.update(name=f"variant-{name}", description=f"build variant {name} (benchmarks/variants.py)",
                 bench={"kind": "micro", "root": str(bench_root.resolve())}, store=str(store.resolve()), joint=False,
                 analyses=ANALYSES)
    study.pop("adaptive_init", None)
    study["methods"] = [{**m, "grid": widened(m["grid"])} if "grid" in m else m for m in study["methods"]]
    study["adaptive"] = [a for a in study["adaptive"] if a["method"] in ADAPTIVE and "label" not in a]
    study.pop("adaptation_studies", None)
    path = out / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def run_variant(name: str, root: Path, threads: int) -> dict[str, Any]:
    record = load_record()
    variant = resolve(name, record)
    out, store = root / name, root / "store"
    out.mkdir(parents=True, exist_ok=True)
    print(f"== {name}: {variant.lever}", flush=True)
    bench = ROOT / "data" / "micro" if variant.shipped else out / "micro"
    if variant.shipped and json.loads((bench / "manifest.json").read_text())["config"]["consistency"] != variant.consistency:
        raise SystemExit(f"error: data/micro no longer holds the {name} build; its measurement stays as recorded in {RECORD}")
    build_s = 0.0
    if not variant.shipped:
        manifest = build_micro(bench, str(store), profile=build_config(variant), threads=threads).manifest
        build_s = manifest["build_time_s"]  # each step's own wall time, recorded in the store when it ran
        metrics = manifest["metrics"]
        print(f"   built in {build_s / 60:.1f} min: zero-shot {100 * _mean(metrics['zero_shot']):.1f} %, "
              f"fine-tuned r4 {100 * _mean(metrics['finetuned']['4']):.1f} % (test, absolute)", flush=True)
    study = study_file(name, bench, store, out)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mergelab_app.cli", "run", str(study)], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": pythonpath(ROOT, os.environ)})
    study_s = time.perf_counter() - start
    measured = regime.measure(study, split="val")
    print(regime.report(measured), flush=True)
    entry = {"variant": dataclasses.asdict(variant), "departures": variant.departures, "build_s": round(build_s, 1),
             "study_s": round(study_s, 1), "regime": measured}
    record = load_record()
    record[name] = json.loads(json.dumps(entry, default=float))
    RECORD.write_text(json.dumps(record, indent=1) + "\n")
    rerender_readme()
    return entry


def _mean(d: dict[str, float]) -> float:
    return sum(d.values()) / len(d)


def rerender_readme() -> None:
    """Redraw data/micro/README.md from the shipped manifest (its variant table reads variants.json)."""
    micro = ROOT / "data" / "micro"
    write_readme(micro, json.loads((micro / "manifest.json").read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"variants to run (default: every one not yet measured): {', '.join(VARIANTS)}")
    parser.add_argument("--root", type=Path, default=ROOT / "build" / "variants", help="work folder (builds, store, studies)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while building")
    parser.add_argument("--list", action="store_true", help="list the variants and which are measured, then stop")
    parser.add_argument("--ship", action="store_true", help="rebuild data/micro with the variant the choice rule picks")
    args = parser.parse_args(argv)
    if args.ship:
        return ship(args.root, args.threads)
    record = load_record()
    if args.list:
        for name, v in VARIANTS.items():
            print(f"{name:<12} {'measured' if name in record else 'pending ':<9} {v.lever}")
        return 0
    unknown = [n for n in args.names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    for name in args.names or [n for n in VARIANTS if n not in record]:
        run_variant(name, args.root, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
