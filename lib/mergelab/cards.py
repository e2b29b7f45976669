"""The model card of a merge or adaptation output (``README.md`` beside ``merge.json``).

:func:`model_card` is a pure function of the record ``save_merged`` writes as ``merge.json``, so the
card never says what the record does not: YAML front matter as the Hugging Face hub reads it
(``base_model``, ``library_name``, ``tags``), then the base and every input with its content hash,
the method, space and hyper-parameters, the selection rule and every candidate's val criterion,
the scores per task when the merge was evaluated (with the study's intervals), the rank a
``--max-rank`` chose and each truncated module's error, the command that reproduces it and the
versions that computed it. The record's fields:

| field | from | card section |
|---|---|---|
| ``base`` (name, path, content_hash), ``base_model`` | the base | front matter, Inputs |
| ``tasks`` (name, source, content_hash per input) | :func:`inputs_of` | Inputs |
| ``method``, ``space``, ``space_options``, ``hyper_parameters``, ``adaptive`` | the merge | Method |
| ``selection`` (rule, chosen, criterion per candidate) | ``merge --select`` | Selection |
| ``scores`` (task -> metric -> value), ``intervals`` | the evaluation | Scores |
| ``max_rank``, ``max_rank_rule``, ``serving``, ``rank_cap_error`` | ``--max-rank`` | Rank |
| ``command``, ``cwd`` | the CLI | Reproduce |
| ``format``, ``content_hash``, ``reproducibility`` | ``save_merged`` | Result |
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from mergelab.taskset import TaskSet

__all__ = ["CARD", "SCORE_METRICS", "inputs_of", "model_card"]

#: The card's file name in an output directory (what the hub shows).
CARD = "README.md"

#: Column headers of the score metrics a card shows, in order (fractions, shown as percentages).
SCORE_METRICS = {"val_acc": "val acc %", "val_norm_acc": "val norm acc %", "acc": "test acc %", "norm_acc": "test norm acc %"}


def inputs_of(taskset: TaskSet) -> list[dict[str, str]]:
    """Every input of ``taskset`` as a record holds it: its task name, source and content hash."""
    return [{"name": t.name, "source": t.source, "content_hash": t.content_hash} for t in taskset]


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(map(_cell, row)) + " |" for row in rows]


def _settings(values: Mapping[str, Any] | None) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in (values or {}).items()) or "none"


def _front_matter(record: Mapping[str, Any]) -> str:
    tags = ["mergelab", "model-merging", *(["lora"] if record.get("format") == "peft" else []),
            str(record.get("method")), f"{record.get('space')}-space"]
    front: dict[str, Any] = {"base_model": record.get("base_model") or record["base"].get("name")}
    if record.get("format") == "peft":
        front["library_name"] = "peft"
    front["tags"] = tags
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---"


def _inputs(record: Mapping[str, Any]) -> list[str]:
    base = record["base"]
    rows = [("base", base.get("name"), base.get("path") or "(in memory)", f"`{base.get('content_hash')}`")]
    tasks = [t if isinstance(t, Mapping) else {"name": t} for t in record.get("tasks") or []]  # names only: a library save
    rows += [("task", t["name"], t.get("source", "—"), f"`{t['content_hash']}`" if "content_hash" in t else "—") for t in tasks]
    return ["## Inputs", "", *_table(("role", "name", "source", "content hash"), rows)]


def _method(record: Mapping[str, Any]) -> list[str]:
    kind = "adaptive method" if record.get("adaptive") else "method"
    lines = ["## Method", "", f"- {kind}: `{record.get('method')}` in the `{record.get('space')}` space "
             f"(space options: {_settings(record.get('space_options'))})",
             f"- hyper-parameters: {_settings(record.get('hyper_parameters'))}"]
    return lines + [f"- settings: {_settings(record['adaptive'])}"] if isinstance(record.get("adaptive"), Mapping) else lines


def _selection(selection: Mapping[str, Any]) -> list[str]:
    rows = [(config, f"{value:.4f}", "selected" if config == selection["chosen"] else "")
            for config, value in selection["criterion"].items()]
    return ["## Selection", "", f"Rule `{selection['rule']}` chose `{selection['chosen']}` on the val split (the test split "
            f"never selects); every candidate's criterion ({selection.get('ref', 'the selection study')}):", "",
            *_table(("configuration", "val criterion", ""), rows)]


def _scores(scores: Mapping[str, Mapping[str, float]], intervals: Mapping[str, Sequence[float]] | None) -> list[str]:
    metrics = [m for m in SCORE_METRICS if any(m in s for s in scores.values())]
    rows = [(task, *(f"{100 * s[m]:.1f}" if m in s else "—" for m in metrics)) for task, s in scores.items()]
    lines = ["## Scores", "", *_table(("task", *(SCORE_METRICS[m] for m in metrics)), rows)]
    for versus, (low, high) in (intervals or {}).items():
        lines.append(f"\nGain in mean normalised test accuracy over {versus}: 95 % paired bootstrap interval "
                     f"[{100 * low:+.1f}, {100 * high:+.1f}] points.")
    return lines


def _rank(record: Mapping[str, Any]) -> list[str]:
    errors: Mapping[str, float] = record.get("rank_cap_error") or {}
    rank, serving = record["max_rank"], record.get("serving")
    serve = (f"{serving['engine']} serves it with `--max-lora-rank {serving['max_lora_rank']}`" if serving
             else f"serve it with a `max_lora_rank` of at least {rank}")
    lines = ["## Rank", "", f"Capped at rank {rank} (`--max-rank {record.get('max_rank_rule', rank)}`; {serve}): {len(errors)} "
             f"module(s) truncated to their best rank-{rank} approximation, the others exact."]
    if errors:
        lines += ["", *_table(("module", "relative error ‖ΔW − ΔW_R‖_F / ‖ΔW‖_F"), [(m, f"{e:.3g}") for m, e in errors.items()])]
    return lines


def _result(record: Mapping[str, Any]) -> list[str]:
    repro = record.get("reproducibility") or {}
    versions = ", ".join(f"{k} {v}" for k, v in (repro.get("versions") or {}).items() if v)
    kind = {"peft": "a PEFT LoRA adapter (`PeftModel.from_pretrained(base, this folder)`)",
            "weights": "merged full weights (safetensors)"}.get(str(record.get("format")), "a merge")
    return ["## Result", "", f"- {kind}, content hash `{record.get('content_hash')}`",
            f"- computed on {repro.get('device', '?')} in {repro.get('dtype', '?')} with {versions or 'unknown versions'}; "
            f"seeds {repro.get('seeds') or 'none'}"]


def model_card(record: Mapping[str, Any]) -> str:
    """The markdown card (YAML front matter + sections) of ``record``, an output's ``merge.json``."""
    version = ((record.get("reproducibility") or {}).get("versions") or {}).get("mergelab", "unknown")
    title = f"{record.get('method')} merge of {len(record.get('tasks') or [])} inputs in the {record.get('space')} space"
    parts = [[_front_matter(record), "", f"# {title}", "",
              f"Written by mergelab {version} from this folder's `merge.json` (`mergelab.cards.model_card`); "
              "regenerate it from there rather than editing it."],
             _inputs(record), _method(record)]
    if record.get("selection"):
        parts.append(_selection(record["selection"]))
    if record.get("scores"):
        parts.append(_scores(record["scores"], record.get("intervals")))
    if record.get("max_rank") is not None:
        parts.append(_rank(record))
    if record.get("command"):
        where = f" (from `{record['cwd']}`)" if record.get("cwd") else ""
        parts.append(["## Reproduce", "", f"```bash\n{record['command']}\n```", "", f"Run{where} with the inputs above; their "
                      "content hashes tell whether they are still the same."])
    parts.append(_result(record))
    return "\n\n".join("\n".join(part) for part in parts) + "\n"
