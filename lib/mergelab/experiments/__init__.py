"""Experiments: what runs a model on a benchmark.

The layer above the pure TaskSet / tensor libraries (:mod:`mergelab.analysis`,
:mod:`mergelab.adaptation`, :mod:`mergelab.merging`) and below the study nodes. Every
experiment runs its model through a :class:`mergelab.bench.BenchSession`, the one place that builds
zero-shot heads, forms ``W_0 + ΔW`` and draws validation batches:

- :mod:`~mergelab.experiments.model_analyses`: the analyses that run the backbone (001's restricted
  Jacobian, 002's ΔL(r), 004's TAS sweep, 003's embedding interference);
- :mod:`~mergelab.experiments.adaptation_studies` / :mod:`~mergelab.experiments.preferences`: the
  AdaRank ablation and TARA's preference studies;
- :mod:`~mergelab.experiments.registry`: ``ANALYSES`` and ``ADAPTATION_STUDIES``.
"""
