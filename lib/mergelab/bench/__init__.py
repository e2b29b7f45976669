"""Benchmarks a study runs on.

- :mod:`~mergelab.bench.benches`: the spec types of a study's ``bench:`` / ``tasks:`` sections and
  ``BENCHES[kind]``, which builds a :class:`Bench` (a backbone, its tasks, their adapters) from them;
- :mod:`~mergelab.bench.session`: :class:`BenchSession`, the one object that runs models on a
  bench (heads, ``W_0 + ΔW``, splits, seeded batches, accuracy, TAS).
"""

from mergelab.bench.benches import BENCHES, Bench, BenchSpec, TaskSource, load_bench
from mergelab.bench.session import BenchSession

__all__ = ["BENCHES", "Bench", "BenchSession", "BenchSpec", "TaskSource", "load_bench"]
