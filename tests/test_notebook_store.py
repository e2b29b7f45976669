"""A notebook opened in plain Jupyter from the checkout finds its store (issue 30, item 7): the kernel
starts in ``notebooks/``, and the default ``STORE`` is the checkout's ``data/store`` there too, not
``notebooks/data/store``; ``$MERGELAB_STORE`` still wins."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def _store_in_a_kernel_started_in_notebooks(notebook: Path, **env: str) -> str:
    """``STORE`` after the notebook's parameters cell runs in a Python started where Jupyter starts
    its kernel (the notebook's folder), with ``env`` added to an environment without MERGELAB_STORE."""
    cell = next(c for c in nbformat.read(notebook, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
    environ = {k: v for k, v in os.environ.items() if k != "MERGELAB_STORE"} | env
    done = subprocess.run([sys.executable, "-c", f"{cell.source}\nprint(STORE)"], cwd=notebook.parent, env=environ,
                          capture_output=True, text=True, timeout=120, check=True)
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_default_store_is_the_checkouts_wherever_the_kernel_starts(notebook):
    assert _store_in_a_kernel_started_in_notebooks(notebook) == str(REPO / "data" / "store")


def test_mergelab_store_still_names_the_store(tmp_path):
    assert _store_in_a_kernel_started_in_notebooks(NOTEBOOKS[0], MERGELAB_STORE=str(tmp_path)) == str(tmp_path)
