"""``bench.kind: micro``: the shipped micro benchmark (``data/micro``, built by ``mergelab build-micro``).

``root``: the built benchmark; ``rank``: its adapter set (a rank, ``mixed``, or ``None`` for the
benchmark's default set); ``tasks`` optionally names a subset of its eight tasks. Its model is the
project's tiny open_clip CLIP (split q/k/v/out attention in the image tower).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from mergelab.bench.benches import Bench, BenchKind, BenchSpec, Tasks, directory_digest, task_id
from mergelab.bench.kinds.open_clip import OPEN_CLIP_LAYOUT
from mergelab.errors import InputError
from mergelab.strict import Int

__all__ = ["KIND", "MicroSpec"]


class MicroSpec(BenchSpec):
    """``root``: the built benchmark's folder; ``rank``: the adapter set (``None``: the default)."""

    kind: Literal["micro"] = "micro"
    root: Path = Path("data/micro")
    rank: Int | Literal["mixed"] | None = None
    embedded = "micro-benchmark"
    own_tasks = True

    def task_names(self) -> list[str] | None:
        """The tasks its manifest lists (``None`` when nothing is built there: loading names the problem)."""
        try:
            return list(json.loads((self.root / "manifest.json").read_text(encoding="utf-8"))["tasks"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def preflight(self) -> None:
        """A root without ``manifest.json`` holds no built benchmark (what :func:`load` would find after
        the model libraries loaded)."""
        if not (self.root / "manifest.json").is_file():
            raise InputError(f"bench.root {self.root} holds no micro benchmark (no manifest.json); run "
                             f"`mergelab build-micro --out {self.root}` or point root at a built one")


def load(spec: MicroSpec, tasks: Tasks) -> Bench:
    """The micro benchmark's backbone, the named tasks (all when ``None``) and their ``rank`` adapters."""
    from mergelab.micro.benchmark import load_micro

    micro = load_micro(spec.root)
    names = list(tasks) if tasks else list(micro.tasks)
    unknown = [t for t in names if t not in micro.tasks]
    if unknown:
        raise InputError(f"tasks: {unknown[0]!r} is not a micro task; allowed: {', '.join(micro.tasks)}")
    rank = micro.default_rank if spec.rank is None else spec.rank
    if rank not in micro.adapters:
        raise InputError(f"bench.rank: no {rank!r} adapter set in {spec.root}; built sets: {', '.join(map(str, micro.adapters))}")
    model_id = {"weights": directory_digest(micro.root / micro.manifest["base"]["dir"]),
                "seed": micro.manifest["seed"], "profile": micro.manifest["profile"]}
    return Bench(f"micro-r{rank}" if isinstance(rank, int) else f"micro-{rank}", micro.backbone, {t: micro.tasks[t] for t in names},
                 [(t, micro.adapters[rank][t]) for t in names], model_id, {t: task_id(micro.tasks[t]) for t in names})


def example(folder: Path) -> tuple[MicroSpec, Tasks]:
    """The shipped micro benchmark's rank-4 adapters of one task (``folder`` unused): the kind's example."""
    from mergelab.micro.benchmark import micro_root

    return MicroSpec(root=micro_root(), rank=4), ["digits"]


KIND = BenchKind(MicroSpec, load, OPEN_CLIP_LAYOUT, example=example)
