"""Benchmarks a study runs on.

- :mod:`~mergelab.bench.benches`: what every bench kind shares: :class:`BenchSpec` (a study's
  ``bench:`` section), :class:`Bench` (a backbone, its tasks, their adapters) and :class:`BenchKind`;
- :mod:`~mergelab.bench.kinds`: one module per kind and the registry ``BENCHES`` of them;
  :func:`bench_spec` validates a ``bench:`` section, :func:`load_bench` builds its :class:`Bench`;
- :mod:`~mergelab.bench.session`: :class:`BenchSession`, the one object that runs models on a
  bench (heads, ``W_0 + ΔW``, splits, seeded batches, accuracy, TAS).
"""

from typing import Any

from mergelab.bench.benches import Bench, BenchKind, BenchSpec, TaskSource
from mergelab.bench.kinds import BENCHES, bench_spec, load_bench
from mergelab.bench.kinds.micro import MicroSpec


def __getattr__(name: str) -> Any:
    """:class:`BenchSession` on first use: it runs models (torch), which validating a study never needs."""
    if name == "BenchSession":
        from mergelab.bench.session import BenchSession

        return BenchSession
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BENCHES", "Bench", "BenchKind", "BenchSession", "BenchSpec", "MicroSpec", "TaskSource", "bench_spec", "load_bench"]
