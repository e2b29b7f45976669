"""Per-layer, per-module statistics of task sets as xarray Datasets.

Weight-only analyses, each a pure function of a TaskSet (or a merged update) returning a Dataset
with named dims (``task``, ``module`` with ``layer`` / ``kind`` coordinates, ``component``, …);
their schemas are in ``docs/store.md``:

- :mod:`~mergelab.analysis.geometry`: norms, cosine similarities, merge-vs-task similarity;
- :mod:`~mergelab.analysis.coverage`: effective ranks of the three stacks, 95 %-energy ranks;
- :mod:`~mergelab.analysis.spectra`: per-task spectra, merged rank, subspace alignment ratio;
- :mod:`~mergelab.analysis.core_space`: 003's truncation curves, SAR per space and merged rank per
  method × space;
- :mod:`~mergelab.analysis.basis_ablation`: 003's reference-basis ablation;
- :mod:`~mergelab.analysis.factored`: the Frobenius inner products they share;

Building blocks of the model-dependent analyses (pure functions of a backbone, heads and batches;
the experiments that run them on a bench are :mod:`mergelab.experiments.model_analyses`):

- :mod:`~mergelab.analysis.anisotropy`: 001's restricted Jacobian ``J`` (RAW / SVD bases) from one
  backward pass per task, κ, scree, ξ;
- :mod:`~mergelab.analysis.components`: 002's per-component loss changes ΔL(r);
- :mod:`~mergelab.analysis.proxies`: 004's TAS, AdaMMS* and the distances they use;
- :mod:`~mergelab.analysis.batches`: fixed validation batches and the task loss they share.

The registry of analyses is :data:`mergelab.experiments.registry.ANALYSES`.
"""

__all__: list[str] = []
