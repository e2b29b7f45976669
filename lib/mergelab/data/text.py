"""Text-classification tasks from CSV / JSON-lines files (the ``hf_seq_cls`` bench's data).

Layout: ``ROOT/<split>.csv`` or ``ROOT/<split>.jsonl`` for ``split`` in train / val / test, each
row a ``text`` and a ``label``. ``test`` is required; a missing ``val`` is carved from ``train``
with a seeded permutation (as :mod:`mergelab.data.folder` does for image folders). A label is the
class index the task's classifier head was trained with, or a class name; class names come from
``classnames`` (in head order) or, when not given, are the sorted distinct string labels (integer
labels: ``"0" … "C-1"``). Texts are tokenized once per split into right-padded ids ``(N, L)``,
which the sequence-classification backbone reads as its "images".
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

from mergelab.data.tasks import ClassificationTask, Split
from mergelab.errors import InputError

__all__ = ["text_task"]

SPLIT_NAMES = ("train", "val", "test")


def _rows(path: Path) -> list[tuple[str, str]]:
    """``(text, label)`` of every row of a ``.csv`` (with a header) or ``.jsonl`` file."""
    try:
        if path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                records = list(csv.DictReader(f))
        else:
            records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as err:
        raise InputError(f"{path}: cannot read it as {path.suffix[1:]} ({err}); give one row per example with text and label") from None
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict) or "text" not in r or "label" not in r), None)
    if bad is not None:
        raise InputError(f"{path}: row {bad + 1} lacks a text or label field; every row needs both")
    return [(str(r["text"]), str(r["label"]).strip()) for r in records]


def _split_files(root: Path) -> dict[str, Path]:
    found = {}
    for split in SPLIT_NAMES:
        files = [root / f"{split}{ext}" for ext in (".csv", ".jsonl") if (root / f"{split}{ext}").is_file()]
        if len(files) > 1:
            raise InputError(f"{root} has both {files[0].name} and {files[1].name}; keep one file per split")
        if files:
            found[split] = files[0]
    if "test" not in found or not ({"val", "train"} & set(found)):
        raise InputError(f"{root} needs test.csv|jsonl and val.csv|jsonl (or train.csv|jsonl to carve val from); "
                         f"found {sorted(p.name for p in found.values()) or 'none'}")
    return found


def _class_names(labels: Sequence[str], classnames: Sequence[str] | None) -> tuple[str, ...]:
    if classnames is not None:
        return tuple(classnames)
    if all(label.lstrip("-").isdigit() for label in labels):
        return tuple(str(i) for i in range(max(int(label) for label in labels) + 1))
    return tuple(sorted(set(labels)))


def _label_ids(labels: Sequence[str], names: tuple[str, ...], where: Path) -> np.ndarray:
    index = {name: i for i, name in enumerate(names)}
    ids = []
    for label in labels:
        i = index.get(label, int(label) if label.lstrip("-").isdigit() else None)
        if i is None or not 0 <= i < len(names):
            raise InputError(f"{where}: label {label!r} is neither a class index below {len(names)} nor one of the class names "
                             f"{list(names)[:5]}; fix the label or give the task's classnames in head order")
        ids.append(i)
    return np.array(ids, dtype=np.int64)


def text_task(root: str | Path, *, tokenize: Callable[[Sequence[str]], Tensor], name: str | None = None,
              classnames: Sequence[str] | None = None, val_fraction: float = 0.2, seed: int = 0) -> ClassificationTask:
    """A classification task from ``ROOT/{train,val,test}.{csv,jsonl}`` (module docstring);
    ``tokenize``: texts -> right-padded ids ``(N, L)``."""
    root = Path(root)
    files = _split_files(root)
    rows = {split: _rows(path) for split, path in files.items()}
    names = _class_names([label for r in rows.values() for _, label in r], classnames)

    def encode(split_rows: list[tuple[str, str]], where: Path) -> Split:
        if not split_rows:
            raise InputError(f"{where} has no rows; every split needs examples")
        ids = tokenize([text for text, _ in split_rows]).numpy().astype(np.int64)
        return Split(ids, _label_ids([label for _, label in split_rows], names, where))

    def make(split: str) -> Split:
        if split not in SPLIT_NAMES:
            raise InputError(f"unknown split {split!r}; choose train, val or test")
        if split in files and (split != "train" or "val" in files):
            return encode(rows[split], files[split])
        if split == "train" and "train" not in files:
            raise InputError(f"{root} has no train split")
        order = np.random.default_rng(seed).permutation(len(rows["train"]))  # no val file: carve val out of train
        cut = int(round(val_fraction * len(order)))
        take = np.sort(order[:cut] if split == "val" else order[cut:])
        return encode([rows["train"][i] for i in take], files["train"])

    return ClassificationTask(name or root.name, names, ("{}",), make, source=str(root), analogue="text classification")
