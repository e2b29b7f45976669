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
from mergelab_app.cli import app
try:
    app(sys.argv[1:], prog_name="mergelab")
    code = 0
except SystemExit as stop:
    code = stop.code
print(json.dumps({"code": code, "heavy": sorted({m.split('.')[0] for m in sys.modules} & set(%r))}), file=sys.stderr)
""" % (HEAVY,)


def fresh_run(*args: str) -> tuple[int, list[str], str]:
    """The exit code of ``mergelab ARGS`` run in a fresh interpreter, the heavy libraries it imported and what
    it wrote on stderr (less the probe's own line)."""
    done = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=300)
    *lines, last = done.stderr.strip().splitlines()
    found = json.loads(last)
    return found["code"], found["heavy"], "\n".join(lines)


def imported_heavy(*args: str) -> tuple[int, list[str]]:
    """The exit code of ``mergelab ARGS`` run in a fresh interpreter and the heavy libraries it imported."""
    code, heavy, _ = fresh_run(*args)
    return code, heavy


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


@pytest.mark.parametrize(("section", "message"), [
    ("analyses: [norms, norms]", "analyses lists 'norms' twice"),  # issue 30 probe 537
    ("analyses: [spectra]\nanalysis_settings: {spectra: {bogus: 1}}", "spectra has no setting 'bogus'"),  # 544
    ("adaptation_studies: {p2: {study: bogus}}", "study 'bogus' is not an adaptation study"),  # 566
    ("device: meta", "device 'meta': mergelab runs encoders on cpu or cuda"),  # 496
    ("device: cuda", "device 'cuda': torch sees no CUDA device on this machine"),  # 494 (CUDA hidden below)
], ids=["analysis-twice", "analysis-setting", "adaptation-study", "device-meta", "device-cuda"])
def test_analyses_adaptation_studies_and_the_device_are_checked_without_a_model_library(section, message, tmp_path, monkeypatch):
    """Their settings are checked against their functions' signatures (torch, xarray), the device by its
    name and torch's CUDA query, before Prefect starts: importing ``mergelab.model``'s protocol loads no
    backend (open_clip, transformers), which made each refusal take 20 s (issue 30 probe 494, 496, 537, 544)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # a machine without CUDA, wherever the suite runs
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"name: s\nbench: {{kind: micro, root: {REPO / 'data' / 'micro'}}}\nmethods:\n  - method: ties\n"
                   f"    grid: {{alpha: [1.0]}}\n{section}\n")
    code, heavy, stderr = fresh_run("run", str(bad), "--store", str(tmp_path / "store"))
    assert code == 2 and message in stderr and stderr.count("\n") == 0, stderr
    assert set(heavy) <= {"torch", "xarray"}, heavy
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("command", ["merge", "adapt"])
def test_a_bad_task_name_is_refused_before_any_heavy_library_loads(command, tmp_path):
    """``NAME=PATH`` names are checked first, so a bad one is one line at once, not after torch and the
    model libraries load (issue 30 probe 699: 45 s under load)."""
    digits = REPO / "data" / "micro" / "adapters" / "r4" / "digits"
    code, heavy, stderr = fresh_run(command, "--adapters", f"../x={digits}", "--base", str(REPO / "data" / "micro" / "base"),
                                    "--method", "task_arithmetic" if command == "merge" else "adamerging",
                                    "--out", str(tmp_path / "out"), "--store", str(tmp_path / "store"))
    assert code == 2 and heavy == [] and stderr.startswith("error: task name '../x' must start with a letter or digit"), stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "store").exists()
