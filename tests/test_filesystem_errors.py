"""Filesystem and decoding errors below the validated paths (issue 30, item 3): unreadable and
non-UTF-8 configs and studies, input nested deeper than Python reads, a full disk, names too long,
``/proc`` targets, and integers out of range are one ``error:`` line naming the path or field and
the fix, exit 2, no traceback, nothing written."""

from __future__ import annotations

import errno
import json
import pathlib
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from mergelab_app.cli import app

runner = CliRunner()
DEEP = 100_000


def _refuse_reading(monkeypatch, victim: Path, code: int = errno.EACCES) -> None:
    """``victim`` cannot be read (as ``chmod 000`` would do; the tests may run as root, whom permissions do not stop)."""
    real = pathlib.Path.read_text

    def read_text(self, *args, **kwargs):
        if Path(self) == victim:
            raise OSError(code, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", read_text)


def _adapter(src: Path, dst: Path, config: bytes | None = None) -> Path:
    shutil.copytree(src, dst)
    if config is not None:
        (dst / "adapter_config.json").write_bytes(config)
    return dst


def _merge(tmp, base, adapters, *extra):
    return ["merge", "--base", base, "--adapters", *adapters, "--method", "task_arithmetic", "--space", "core",
            "--out", tmp / "merged", "--store", tmp / "s", *extra]


def _study(tmp, text: str | None = None, **changes):
    if text is None:
        text = yaml.safe_dump({"name": "s", "methods": [{"method": "ties", "grid": {"alpha": [1.0]}}], **changes})
    (tmp / "study.yaml").write_bytes(text.encode("utf-8", "surrogateescape"))
    return ["run", tmp / "study.yaml", "--store", tmp / "s"]


def _case_unreadable_adapter_config(tmp, adapters, base, monkeypatch):
    bad = _adapter(adapters[0], tmp / "a")
    _refuse_reading(monkeypatch, bad / "adapter_config.json")
    return ["inspect", bad], f"cannot read adapter config {bad / 'adapter_config.json'}: Permission denied"


def _case_adapter_config_not_utf8(tmp, adapters, base, monkeypatch):
    bad = _adapter(adapters[0], tmp / "a", b'{"r": 4, "lora_alpha": 8, "x": "\xff\xfe"}')
    return _merge(tmp, base, [bad, adapters[1]]), "adapter_config.json is not UTF-8 text (byte 32: invalid start byte); save it as UTF-8"


def _case_adapter_config_nested_too_deep(tmp, adapters, base, monkeypatch):
    bad = _adapter(adapters[0], tmp / "a", b"[" * DEEP + b"]" * DEEP)
    return ["inspect", bad], "adapter_config.json nests deeper than Python can read"


def _case_unreadable_study(tmp, adapters, base, monkeypatch):
    args = _study(tmp)
    _refuse_reading(monkeypatch, tmp / "study.yaml")
    return args, f"cannot read study file {tmp / 'study.yaml'}: Permission denied"


def _case_study_not_utf8(tmp, adapters, base, monkeypatch):
    return _study(tmp, "name: s\xff\nmethods: []\n".encode("latin-1").decode("utf-8", "surrogateescape")), "is not UTF-8 text"


def _case_study_nested_too_deep(tmp, adapters, base, monkeypatch):
    return _study(tmp, "name: s\nmethods: " + "[" * DEEP + "]" * DEEP + "\n"), "study.yaml nests deeper than Python can read"


def _case_keep_file_not_utf8(tmp, adapters, base, monkeypatch):
    (tmp / "keep.txt").write_bytes(b"\xff\xfe")
    return ["store", "gc", "--store", tmp / "s", "--keep", tmp / "keep.txt", "--dry-run"], "--keep file"


def _case_no_space_left_while_writing_the_merge(tmp, adapters, base, monkeypatch):
    import mergelab.checkpoints.writing as writing

    def full(tensors, filename, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(writing, "save_file", full)
    return _merge(tmp, base, adapters[:2]), "adapter_model.safetensors: No space left on device; free some space or choose another location"


def _case_out_name_too_long(tmp, adapters, base, monkeypatch):
    args = _merge(tmp, base, adapters[:2])
    args[args.index("--out") + 1] = tmp / ("m" * 300)  # refused when it is first used
    return args, f"{'m' * 300}: File name too long; choose shorter names"


def _case_out_under_proc(tmp, adapters, base, monkeypatch):
    args = _merge(tmp, base, adapters[:2])
    args[args.index("--out") + 1] = "/proc/mergelab-merged"
    return args, "--out /proc/mergelab-merged: cannot write in /proc"


def _case_store_under_proc(tmp, adapters, base, monkeypatch):
    args = _merge(tmp, base, adapters[:2])
    args[args.index("--store") + 1] = "/proc/mergelab-store"
    return args, "store /proc/mergelab-store: cannot write in /proc"


def _case_store_is_a_symlink_loop(tmp, adapters, base, monkeypatch):
    (tmp / "loop").symlink_to(tmp / "loop")
    args = _merge(tmp, base, adapters[:2])
    args[args.index("--store") + 1] = tmp / "loop"
    return args, f"store {tmp / 'loop'}: {tmp / 'loop'} is a symbolic link that leads nowhere (its target is missing or it loops)"


def _case_out_is_a_symlink_loop(tmp, adapters, base, monkeypatch):
    (tmp / "loop").symlink_to(tmp / "loop")
    args = _merge(tmp, base, adapters[:2])
    args[args.index("--out") + 1] = tmp / "loop" / "merged"
    return args, f"--out {tmp / 'loop' / 'merged'}: {tmp / 'loop'} is a symbolic link that leads nowhere"


def _case_study_name_too_long(tmp, adapters, base, monkeypatch):
    return _study(tmp, name="s" * 300), "study name 'ssssssssssssssssssss'… has 300 characters; use at most 100"


def _case_adaptive_label_too_long(tmp, adapters, base, monkeypatch):
    return _study(tmp, adaptive=[{"method": "adamerging", "label": "a" * 150}]), "adaptive label 'aaaaaaaaaaaaaaaaaaaa'… has 150 characters"


def _case_seed_beyond_int64(tmp, adapters, base, monkeypatch):
    return _study(tmp, seeds=[2**64]), "seeds[0]: Input should be less than or equal to 9223372036854775807"


def _case_negative_seed(tmp, adapters, base, monkeypatch):
    return _study(tmp, seeds=[-1]), "seeds[0]: Input should be greater than or equal to 0"


def _case_iters_unbounded(tmp, adapters, base, monkeypatch):
    return _study(tmp, adaptive=[{"method": "adamerging", "iters": 10**9}]), "iters=1000000000 must be at least 1 and at most 100000"


def _case_adapt_iters_unbounded(tmp, adapters, base, monkeypatch):
    return (["adapt", "--base", base, "--adapters", *adapters[:2], "--method", "adamerging", "--iters", "1000000000",
             "--out", tmp / "adapted", "--store", tmp / "s"], "iters=1000000000 must be at least 1 and at most 100000")


def _case_disk_full_as_safetensors_reports_it(tmp, adapters, base, monkeypatch):
    """safetensors' Rust writer reports ENOSPC as a SafetensorError "(os error 28)", not an OSError
    (issue 30 probe case 332: a real full tmpfs gave a traceback)."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(tensors, filename, *args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)  # what huggingface_hub's sharded writer calls
    return (_merge(tmp, base, adapters[:2], "--format", "weights"),
            "merged: No space left on device; free some space or choose another location")


CASES = [v for k, v in sorted(globals().items()) if k.startswith("_case_")]


@pytest.mark.parametrize("case", CASES, ids=lambda f: f.__name__.removeprefix("_case_"))
def test_a_filesystem_error_is_one_line_naming_the_path(case, tmp_path, vit_adapters, tiny_vit, monkeypatch):
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vit.state_dict().items()}, str(base))
    args, *messages = case(tmp_path, vit_adapters, base, monkeypatch)
    before = {p for p in tmp_path.rglob("*") if p.parent != tmp_path / "s" or p.name != "staging"}
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and all(m in lines[0] for m in messages), result.stderr
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), repr(result.exception)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "adapted").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".merged", ".adapted"))], "a temporary output was left"
