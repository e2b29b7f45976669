"""Where a checkout's packages are, for the benchmarks that time its commands in child processes.

mergelab is four wings, each a folder of the checkout holding one package (docs/architecture.md):
``lib/mergelab``, ``flows/mergelab_flows``, ``analysis/mergelab_figures`` and ``app/mergelab_app``.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ROOT", "WINGS", "pythonpath"]

ROOT = Path(__file__).resolve().parents[1]
#: The folders of a checkout that hold mergelab's packages.
WINGS = ("lib", "flows", "analysis", "app")


def pythonpath(tree: Path = ROOT, env: dict[str, str] | None = None) -> str:
    """A ``PYTHONPATH`` that imports every mergelab package (and the ``benchmarks`` scripts) from
    checkout ``tree`` before anything installed, then ``env``'s own ``PYTHONPATH``."""
    rest = (env or {}).get("PYTHONPATH", "")
    return os.pathsep.join([*(str(tree / w) for w in WINGS), str(tree), *filter(None, [rest])])
