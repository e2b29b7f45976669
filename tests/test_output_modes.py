"""Outputs others can read: ``merge --out`` folders, their weights files and the store's tensors get
the modes the umask gives any file the user writes (not tempfile's ``drwx------`` / ``-rw-------``)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from mergelab import outputs
from mergelab_app.cli import app


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    """Run the test under this umask (restored after; the cached reading is reset both times)."""
    outputs._umask.cache_clear()
    before = os.umask(request.param)
    yield request.param
    os.umask(before)
    outputs._umask.cache_clear()


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root.parent)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("fmt", ["peft", "weights"])
def test_merge_output_follows_the_umask(umask, fmt, vit_adapters, tiny_vit, tmp_path):
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vit.state_dict().items()}, str(base))
    out = tmp_path / "merged"
    done = CliRunner().invoke(app, ["merge", "--base", str(base), "--adapters", *map(str, vit_adapters[:2]), "--method",
                                    "task_arithmetic", "--space", "core", "--format", fmt, "--store", str(tmp_path / "store"), "--out", str(out)])
    assert done.exit_code == 0, done.output
    modes = _modes(out)
    assert any(name.endswith(".safetensors") for name in modes) and len(modes) >= 3
    assert modes == {name: (0o777 if (tmp_path / name).is_dir() else 0o666) & ~umask for name in modes}


def test_store_tensors_follow_the_umask(umask, tmp_path):
    from mergelab.store import Store

    store = Store(tmp_path / "store")
    key = store.put_tensors(store.key("probe", "1", n=1), {"w": torch.ones(2)})
    payload = next((tmp_path / "store" / "objects" / key).rglob("tensors.safetensors"))
    assert stat.S_IMODE(payload.stat().st_mode) == 0o666 & ~umask
