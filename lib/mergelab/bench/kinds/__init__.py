"""Bench kinds: each is one module here (its settings, loader and module layout) and one line of
:data:`BENCHES`.

| kind | model | tasks | heads |
|---|---|---|---|
| ``micro`` | the shipped micro CLIP (``data/micro``) | its eight tasks | zero-shot (text tower) |
| ``open_clip`` | an open_clip architecture + weights file | ``ImageFolder`` roots | zero-shot (text tower) |
| ``hf_clip`` | a ``transformers`` ``CLIPModel`` directory | ``ImageFolder`` roots | zero-shot (text tower) |
| ``hf_seq_cls`` | an ``AutoModelForSequenceClassification`` directory | text rows | each task's own ``score`` head |
| ``sentence_encoder`` | a BERT-family / sentence-transformers directory | text rows | zero-shot (label prompts) or per-task linear |
| ``text`` | the shipped real-weights text benchmark (``data/text``, MiniLM) | its six tasks | as ``sentence_encoder`` |

Validating a study imports these modules, never a model library: every loader imports what it
needs when it runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from mergelab.bench.benches import Bench, BenchKind, BenchSpec, Tasks
from mergelab.bench.kinds import hf_clip, hf_seq_cls, micro, open_clip, sentence_encoder, text
from mergelab.errors import InputError
from mergelab.registry import Registry

__all__ = ["BENCHES", "DEFAULT_KIND", "bench_spec", "load_bench"]

#: ``bench.kind`` -> :class:`~mergelab.bench.benches.BenchKind`.
BENCHES: Registry[BenchKind] = Registry("bench kind", {
    "micro": micro.KIND,
    "open_clip": open_clip.KIND,
    "hf_clip": hf_clip.KIND,
    "hf_seq_cls": hf_seq_cls.KIND,
    "sentence_encoder": sentence_encoder.KIND,
    "text": text.KIND,
})
#: The kind of a ``bench:`` section that names none (and of a study without one).
DEFAULT_KIND = "micro"


def bench_spec(section: BenchSpec | Mapping[str, Any]) -> BenchSpec:
    """A ``bench:`` section validated against its kind's settings (a spec passes through)."""
    if isinstance(section, BenchSpec):
        return section
    if not isinstance(section, Mapping):
        raise InputError(f"bench must be a mapping with a kind ({', '.join(BENCHES)}), got {type(section).__name__}")
    kind = section.get("kind", DEFAULT_KIND)
    if not isinstance(kind, str):
        raise InputError(f"bench.kind must be a name ({', '.join(BENCHES)}), got {kind!r}")
    return BENCHES[kind].spec.model_validate(dict(section))


def load_bench(spec: BenchSpec, tasks: Tasks = None) -> Bench:
    """The :class:`~mergelab.bench.benches.Bench` of a study's ``bench:`` and ``tasks:`` sections,
    carrying its kind's module layout."""
    kind = BENCHES[spec.kind]
    return replace(kind.load(spec, tasks), layout=kind.layout)
