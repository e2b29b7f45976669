"""A task's rows: parsed from its package, filtered, de-duplicated, drawn per class and split.

Per class, texts are de-duplicated (first occurrence kept), texts of fewer than ``min_chars`` or
more than ``max_chars`` characters are dropped (``max_chars`` keeps a row within the encoder's
token window), a text filed under two labels is dropped from both, and a seeded permutation
draws ``train + val + test`` rows (a class with fewer keeps the same proportions). Rows are written
as ``<task>/{train,val,test}.jsonl`` with the class name as the label, which
:mod:`mergelab.data.text` reads back.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mergelab.errors import InputError

__all__ = ["SPLITS", "SplitSizes", "class_counts", "read_rows", "split_rows", "write_rows"]

SPLITS = ("train", "val", "test")
Rows = list[tuple[str, str]]


@dataclass(frozen=True)
class SplitSizes:
    """Rows per class in each split, and the text lengths kept."""

    train: int = 120
    val: int = 20
    test: int = 40
    min_chars: int = 10
    max_chars: int = 600


def split_rows(rows: Sequence[tuple[str, str]], classes: Mapping[str, str], sizes: SplitSizes, seed: int) -> dict[str, Rows]:
    """``{split: [(text, class name)]}`` from ``(text, raw label)`` rows, keeping the raw labels of
    ``classes`` (module docstring)."""
    labels_of: dict[str, set[str]] = defaultdict(set)
    for text, label in rows:
        labels_of[text].add(label)
    by_class: dict[str, list[str]] = {label: [] for label in classes}
    for text, label in rows:
        if label in by_class and len(labels_of[text]) == 1 and sizes.min_chars <= len(text) <= sizes.max_chars:
            by_class[label].append(text)
    out: dict[str, Rows] = {split: [] for split in SPLITS}
    total = sizes.train + sizes.val + sizes.test
    for index, (label, texts) in enumerate(by_class.items()):
        texts = list(dict.fromkeys(texts))
        if len(texts) < 10:
            raise InputError(f"class {label!r} has {len(texts)} usable rows; a class needs at least 10")
        order = np.random.default_rng([seed, index]).permutation(len(texts))[:total]
        n = len(order)
        n_val, n_test = max(1, round(n * sizes.val / total)), max(1, round(n * sizes.test / total))
        cuts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
        for split, take in cuts.items():
            out[split] += [(texts[i], classes[label]) for i in sorted(take)]
    return out


def write_rows(directory: Path, splits: Mapping[str, Rows]) -> None:
    """``directory/{train,val,test}.jsonl``, one ``{"text", "label"}`` object per line."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        lines = [json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n" for text, label in rows]
        (directory / f"{split}.jsonl").write_text("".join(lines), encoding="utf-8")


def read_rows(directory: Path) -> dict[str, Rows]:
    """The splits :func:`write_rows` wrote."""
    return {split: [(r["text"], r["label"]) for r in map(json.loads, (directory / f"{split}.jsonl").read_text(encoding="utf-8").splitlines())]
            for split in SPLITS}


def class_counts(splits: Mapping[str, Rows]) -> dict[str, dict[str, int]]:
    """``{split: {class name: rows}}``."""
    return {split: dict(Counter(label for _, label in rows)) for split, rows in splits.items()}
