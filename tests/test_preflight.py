"""mergelab check: a preflight from metadata only (adapter configs, safetensors headers, file hashes)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from mergelab_app.cli import app
from mergelab.preflight import check, tensor_shapes
from mergelab.synthetic import tiny_vision_transformer, write_peft_adapters


def _base(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_a_clean_set_is_described_without_loading_a_tensor(vit_adapters, tiny_vit, tmp_path, monkeypatch):
    base = _base(tiny_vit, tmp_path / "base.safetensors")
    import safetensors.torch

    def refuse(*args, **kwargs):
        raise AssertionError("check loaded tensors")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    found = check(vit_adapters, base=base)
    assert found.problems == [] and [t.task for t in found.tasks] == ["digits", "textures", "signs"]
    first = found.tasks[0]
    assert (first.rank, first.alpha, first.scaling, first.rslora, first.dtypes) == (4, 8.0, 2.0, False, ["f32"])
    assert set(first.modules) == {n for n in tiny_vit.state_dict() if n.endswith(("in_proj_weight", "out_proj.weight"))}
    assert all(m["rank"] == 4 for m in first.modules.values())
    assert tensor_shapes(base)["conv1.weight"][1] == tuple(tiny_vit.state_dict()["conv1.weight"].shape)


def test_packed_attention_adapters_check_against_a_split_attention_base(vit_adapters, tiny_vit, tmp_path):
    from mergelab.model import split_attention

    split = _base(split_attention(tiny_vision_transformer(seed=0)), tmp_path / "split.safetensors")
    assert check(vit_adapters, base=split).problems == []
    wider = _base(split_attention(tiny_vision_transformer(seed=0, width=48)), tmp_path / "wider.safetensors")
    assert any("attn.in_proj_weight has shape (144, 48) in the base, the LoRA gives (96, 32)" in p
               for p in check(vit_adapters, base=wider).problems)


def test_what_would_stop_or_skew_a_merge_is_a_problem(vit_adapters, tiny_vit, tmp_path):
    [mlp] = write_peft_adapters(tiny_vit, tmp_path / "mlp", ["mlp"], target_modules=["c_fc"])
    wider = _base(tiny_vision_transformer(seed=0, width=48), tmp_path / "wider.safetensors")
    data = {}
    for task, image in (("digits", b"same"), ("signs", b"same")):
        for split, payload in (("val", image), ("test", b"own-" + task.encode())):
            folder = tmp_path / task / split / "a"
            folder.mkdir(parents=True)
            (folder / "0.png").write_bytes(payload)
        data[task] = tmp_path / task
    (tmp_path / "digits" / "test" / "a" / "1.png").write_bytes(b"same")
    found = check([*vit_adapters, mlp], base=wider, data=data)
    text = "\n".join(found.problems)
    assert "module(s) are targeted by some tasks only" in text
    assert "has shape" in text and "in the base, the LoRA gives" in text
    assert "1 image(s) are in both digits/test and digits/val and signs/val" in text


def test_the_cli_exits_1_on_a_problem_and_prints_json(vit_adapters, tiny_vit, tmp_path):
    runner = CliRunner()
    base = _base(tiny_vit, tmp_path / "base.safetensors")
    ok = runner.invoke(app, ["check", *map(str, vit_adapters), "--base", str(base)], env={"COLUMNS": "120"})
    assert ok.exit_code == 0 and "ready to merge" in ok.stdout, ok.output
    [mlp] = write_peft_adapters(tiny_vit, tmp_path / "mlp", ["mlp"], target_modules=["c_fc"])
    bad = runner.invoke(app, ["check", str(vit_adapters[0]), str(mlp), "--json"])
    assert bad.exit_code == 1
    report = json.loads(bad.stdout)
    assert len(report["tasks"]) == 2 and any("some tasks only" in p for p in report["problems"])
    missing = runner.invoke(app, ["check", str(vit_adapters[0]), "--data", f"digits={tmp_path / 'nowhere'}"])
    assert missing.exit_code == 2 and "no such folder" in missing.stderr


@pytest.mark.parametrize("payload", [b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"])
def test_a_broken_header_is_one_line(tmp_path, payload):
    from mergelab.errors import InputError

    path = tmp_path / "w.safetensors"
    path.write_bytes(payload)
    with pytest.raises(InputError, match="corrupt or truncated safetensors header"):
        tensor_shapes(path)


def _edited(src, dst, **config):
    shutil.copytree(src, dst)
    data = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**data, **config}))
    return dst


def _empty_splits(tmp):
    for split in ("val", "test"):
        (tmp / "data" / split).mkdir(parents=True)
    return {"digits": tmp / "data"}


#: (what, config changes of the first adapter, data folders, the problem reported): ``check`` reports what
#: ``merge`` refuses (tests/test_silent_merges.py), with exit 1.
PROBLEMS = [
    ("layers_to_transform beyond the model", {"layers_to_transform": [99]}, None,
     "digits: layers_to_transform names layer(s) [99] that hold no LoRA factors (the weights' layers: [0, 1])"),
    ("tensors of a module the config does not target", {"target_modules": r"transformer\.resblocks\.0\.attn"}, None,
     "digits: the weights hold LoRA factors for 1 module(s) the config does not target"),
    ("target_modules matching no tensor", {"target_modules": ["nope"]}, None, "digits: target_modules ['nope'] matches none"),
    ("modules_to_save without saved tensors", {"modules_to_save": ["classifier"]}, None,
     "digits: modules_to_save names 'classifier', but the weights save no tensor of it"),
    ("bias trained beside the factors", {"bias": "lora_only"}, None, "digits: trained with PEFT's bias option (bias='lora_only')"),
    ("val and test splits without images", {}, _empty_splits, "--data digits: its val split holds no images"),
]


@pytest.mark.parametrize("changes, data, problem", [p[1:] for p in PROBLEMS], ids=[p[0] for p in PROBLEMS])
def test_what_merge_refuses_check_reports_as_a_problem(vit_adapters, tmp_path, changes, data, problem):
    adapter = _edited(vit_adapters[0], tmp_path / "digits", **changes)
    args = ["check", str(adapter), str(vit_adapters[1])]
    for task, root in (data(tmp_path) if data else {}).items():
        args += ["--data", f"{task}={root}"]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 1, result.output
    assert any(problem in p for p in json.loads(result.stdout)["problems"]), result.stdout


@pytest.mark.parametrize("where", ["base", "adapter"])
def test_nan_or_inf_values_a_merge_refuses_are_a_problem(vit_adapters, tiny_vit, tmp_path, where):
    """``check`` said "ready to merge" for a base holding NaN, which merge refuses (issue 30 probe case 150):
    the values of the base and the adapters are scanned from their raw bits (float32 and bfloat16 here)."""
    from safetensors.torch import load_file

    base = _base(tiny_vit, tmp_path / "base.safetensors")
    adapter = _edited(vit_adapters[0], tmp_path / "digits")
    if where == "base":
        state = load_file(str(base))
        state["conv1.weight"] = state["conv1.weight"].clone()
        state["conv1.weight"].view(-1)[3] = float("nan")
        save_file(state, str(base))
    else:
        weights = adapter / "adapter_model.safetensors"
        state = {k: v.to(torch.bfloat16) for k, v in load_file(str(weights)).items()}
        key = sorted(state)[0]
        state[key].view(-1)[:2] = float("inf")
        save_file(state, str(weights))
    result = CliRunner().invoke(app, ["check", str(adapter), str(vit_adapters[1]), "--base", str(base), "--json"])
    assert result.exit_code == 1, result.output
    problem = {"base": "base: base.safetensors: parameter 'conv1.weight' contains 1 NaN/Inf values",
               "adapter": f"digits: adapter_model.safetensors: parameter {key!r} contains 2 NaN/Inf values" if where == "adapter" else ""}[where]
    assert any(problem in p for p in json.loads(result.stdout)["problems"]), result.stdout
