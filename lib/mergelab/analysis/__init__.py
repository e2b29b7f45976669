"""Per-layer, per-module statistics of task sets as xarray Datasets (DESIGN §5).

Weight-only analyses, each a pure function of a TaskSet (or a merged update) returning a Dataset
with named dims (``task``, ``module`` with ``layer`` / ``kind`` coordinates, ``component``, …);
their schemas are in ``docs/store.md``:

- :mod:`~mergelab.analysis.geometry`: norms, cosine similarities, merge-vs-task similarity;
- :mod:`~mergelab.analysis.coverage`: effective ranks of the three stacks, 95 %-energy ranks;
- :mod:`~mergelab.analysis.spectra`: per-task spectra, merged rank, subspace alignment ratio;
- :mod:`~mergelab.analysis.factored`: the Frobenius inner products they share.
"""

__all__ = ["VERSIONS"]

#: Code version of each Dataset producer, for store keys (DESIGN §7). Bump an entry whenever the
#: function's output changes for the same inputs.
VERSIONS: dict[str, str] = {
    "geometry.norms": "2",  # 2: packed q/k/v projections split into views
    "geometry.cosine_similarity": "1",
    "geometry.merged_similarity": "1",
    "geometry.lambda_similarity": "1",
    "coverage.subspace_coverage": "1",
    "spectra.task_spectra": "1",
    "spectra.pairwise_sar": "1",
    "spectra.merged_rank": "1",
}
