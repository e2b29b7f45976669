"""The instant commands import only what they use: no torch, Prefect or model library for ``--help``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

#: Libraries that cost seconds of CPU to import and that the instant commands never use.
HEAVY = ("torch", "prefect", "open_clip", "transformers", "peft", "xarray", "zarr", "mergelab_flows")

#: Runs the CLI in a fresh interpreter and prints, as JSON, its exit code and which HEAVY modules it imported.
_PROBE = """
import json, sys
from mergelab.cli import app
try:
    app(sys.argv[1:], prog_name="mergelab")
    code = 0
except SystemExit as stop:
    code = stop.code
print(json.dumps({"code": code, "heavy": sorted({m.split('.')[0] for m in sys.modules} & set(%r))}), file=sys.stderr)
""" % (HEAVY,)


def imported_heavy(*args: str) -> tuple[int, list[str]]:
    """The exit code of ``mergelab ARGS`` run in a fresh interpreter and the heavy libraries it imported."""
    done = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=300)
    found = json.loads(done.stderr.strip().splitlines()[-1])
    return found["code"], found["heavy"]


@pytest.mark.parametrize("args", [["--help"], ["store", "--help"], ["check", "--help"], ["inspect", "--help"]])
def test_help_imports_no_heavy_library(args):
    code, heavy = imported_heavy(*args)
    assert code == 0 and heavy == []


def test_store_ls_imports_no_heavy_library(tmp_path):
    from mergelab.store import Store

    store = Store(tmp_path / "store")
    store.put_json(store.key("probe", "1", n=1), {"n": 1})
    code, heavy = imported_heavy("store", "ls", "--store", store.url)
    assert code == 0 and heavy == []


def test_check_imports_no_heavy_library(vit_adapters, tiny_vit, tmp_path):
    """`mergelab check` reads adapter configs and safetensors headers: torch never loads."""
    from safetensors.torch import save_file

    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vit.state_dict().items()}, str(base))
    code, heavy = imported_heavy("check", *map(str, vit_adapters), "--base", str(base))
    assert code == 0 and heavy == []


def test_inspect_imports_torch_alone():
    """`mergelab inspect` of an adapter on split attention (the micro benchmark's) reads the tensors
    (torch) and nothing of Prefect, the model libraries or xarray. (An adapter on a packed
    ``nn.MultiheadAttention`` also imports PEFT, which measures how PEFT applies its out_proj.)"""
    code, heavy = imported_heavy("inspect", str(REPO / "data" / "micro" / "adapters" / "r4" / "digits"))
    assert code == 0 and heavy == ["torch"]


def test_a_bad_study_is_refused_before_prefect_xarray_or_a_model_library_loads(tmp_path):
    """`mergelab run` validates the study first (torch only: the merge methods' registry lives with
    their functions); a bench kind's model code is imported when a bench loads, never to validate."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: s\nmethods:\n  - method: tiez\n")
    code, heavy = imported_heavy("run", str(bad), "--store", str(tmp_path / "store"))
    assert code == 2 and heavy == ["torch"]
    # found by the model validators, after the fields (issue 30 probe 442: a bench root with nothing built)
    bad.write_text("name: s\nbench: {kind: micro, root: /nonexistent}\nmethods:\n  - method: ties\n")
    code, heavy = imported_heavy("run", str(bad), "--store", str(tmp_path / "store"))
    assert code == 2 and heavy == ["torch"]
