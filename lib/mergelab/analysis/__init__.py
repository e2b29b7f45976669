"""Per-layer, per-module statistics of task sets as xarray Datasets (DESIGN §5).

Weight-only analyses, each a pure function of a TaskSet (or a merged update) returning a Dataset
with named dims (``task``, ``module`` with ``layer`` / ``kind`` coordinates, ``component``, …);
their schemas are in ``docs/store.md``:

- :mod:`~mergelab.analysis.geometry`: norms, cosine similarities, merge-vs-task similarity;
- :mod:`~mergelab.analysis.coverage`: effective ranks of the three stacks, 95 %-energy ranks;
- :mod:`~mergelab.analysis.spectra`: per-task spectra, merged rank, subspace alignment ratio;
- :mod:`~mergelab.analysis.core_space`: 003's truncation curves, SAR per space, reference-basis
  ablation and merged rank per method × space;
- :mod:`~mergelab.analysis.factored`: the Frobenius inner products they share;

Model-dependent analyses (``needs="bench"``: they run the backbone on validation images):

- :mod:`~mergelab.analysis.anisotropy`: 001's restricted Jacobian ``J`` (RAW / SVD bases) from one
  backward pass per task, κ, scree, ξ;
- :mod:`~mergelab.analysis.components`: 002's per-component loss changes ΔL(r);
- :mod:`~mergelab.analysis.proxies`: 004's TAS (``tas``, ``task_alignment``), AdaMMS*, the λ sweep;
- :mod:`~mergelab.analysis.interference`: 003's final-embedding L1 interference;
- :mod:`~mergelab.analysis.batches`: the validation batches, losses and merged weights they share;
- :mod:`~mergelab.analysis.registry`: ``ANALYSES``, every analysis with its store producer name and version.
"""

__all__: list[str] = []  # the registry is mergelab.analysis.registry.ANALYSES
