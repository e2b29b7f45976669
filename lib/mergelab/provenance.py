"""What makes a merge reproducible: the record every merge and adaptation keeps (issue 29 item 6).

:func:`reproducibility` is stored as the ``reproducibility`` attr of a study's ``merge`` and ``adapt``
artifacts (beside the store's own provenance: key, inputs, host, time), in the ``merge.config``
record of ``mergelab merge`` and in every ``merge.json``. Its fields:

| field | what |
|---|---|
| ``versions`` | python, mergelab, torch, numpy, peft, open_clip (installed distributions) |
| ``blas`` | torch's BLAS / LAPACK (``torch.__config__``), numpy's BLAS (``numpy.show_config``) |
| ``cpu_capability`` | the SIMD level torch's CPU kernels dispatch to (``AVX2``, ``AVX512``, …) |
| ``threads`` | ``torch.get_num_threads()`` when the record is made |
| ``device``, ``dtype`` | where and in which precision the result was computed |
| ``seeds`` | every seed the result depends on, by role (``{}``: none) |

The static part is read once per process (well under a millisecond afterwards).
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
from collections.abc import Mapping
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from mergelab.taskset import MergedUpdate

__all__ = ["merge_reproducibility", "reproducibility"]

#: Distributions a record names without importing them, by the name it gives them.
_DISTRIBUTIONS = {"peft": "peft", "open_clip": "open_clip_torch"}


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _torch_blas() -> str:
    """``BLAS_INFO`` and ``LAPACK_INFO`` of torch's build, e.g. ``mkl / lapack mkl``."""
    settings = dict(re.findall(r"(BLAS_INFO|LAPACK_INFO)=([^,\s]*)", torch.__config__.show()))
    return f"{settings.get('BLAS_INFO', 'unknown')} / lapack {settings.get('LAPACK_INFO', 'unknown')}"


def _numpy_blas() -> str:
    """numpy's BLAS and its version, e.g. ``scipy-openblas 0.3.31``."""
    blas = np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})
    return f"{blas.get('name', 'unknown')} {blas.get('version', '')}".strip()


@cache
def _environment() -> dict[str, Any]:
    from mergelab import __version__

    return {"versions": {"python": platform.python_version(), "mergelab": __version__, "torch": torch.__version__,
                         "numpy": np.__version__, **{name: _version(dist) for name, dist in _DISTRIBUTIONS.items()}},
            "blas": {"torch": _torch_blas(), "numpy": _numpy_blas()},
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def reproducibility(*, device: torch.device | str, dtype: torch.dtype | str,
                    seeds: Mapping[str, int | None] | None = None) -> dict[str, Any]:
    """The record of a result computed now on ``device`` in ``dtype`` from ``seeds`` (module docstring).

    A CUDA device adds its name (``device_name``)."""
    device = torch.device(device)
    record = {**_environment(), "threads": torch.get_num_threads(), "device": str(device),
              "dtype": str(dtype).removeprefix("torch."), "seeds": dict(seeds or {})}
    if device.type == "cuda":
        record["device_name"] = torch.cuda.get_device_name(device)
    return record


def merge_reproducibility(merged: MergedUpdate) -> dict[str, Any]:
    """:func:`reproducibility` of a merged update as ``mergelab merge`` / ``adapt`` write it (``merge.json``,
    the ``merge.config`` record): the device and dtype of its tensors, the seed of a seeded method
    (``hyper_parameters.seed``, as ``merge``) and of an adaptive run (``meta["seed"]``, as ``adapt``)."""
    sample = next(iter(merged.to_tensors().values()))
    seeds = {"merge": (merged.meta.get("hyper_parameters") or {}).get("seed"), "adapt": merged.meta.get("seed")}
    return reproducibility(device=sample.device, dtype=sample.dtype, seeds={k: v for k, v in seeds.items() if v is not None})
