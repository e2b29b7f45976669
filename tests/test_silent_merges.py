"""Inputs that used to merge into a silently wrong result (issue 30, item 2) are refused with one
``error:`` line, exit 2 and nothing written: adapter-config fields not of PEFT's types, configs that
disagree with their tensors where PEFT would load another adapter, factors whose product overflows,
options that would be ignored, outputs that fail only after the merge. A ``fan_in_fan_out`` flag that
disagrees with the base is reset as PEFT resets it, with one ``warning:`` line."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergelab.checkpoints import load_taskset
from mergelab_app.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
MICRO = REPO / "data" / "micro"


def run(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def _adapter(src: Path, dst: Path, **config_changes) -> Path:
    """A copy of the adapter ``src`` at ``dst`` with ``config_changes`` in its adapter_config.json."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**config, **config_changes}))
    return dst


def _without(src: Path, dst: Path, *fields: str) -> Path:
    """A copy of the adapter ``src`` at ``dst`` whose adapter_config.json lacks ``fields``."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in fields}))
    return dst


def _weights(src: Path, dst: Path, edit) -> Path:
    """A copy of the adapter ``src`` at ``dst`` with ``edit(tensors)`` as its weights."""
    shutil.copytree(src, dst)
    weights = dst / "adapter_model.safetensors"
    save_file({k: v.contiguous() for k, v in edit(load_file(str(weights))).items()}, str(weights))
    return dst


def _base_with(base: Path, dst: Path, value: float) -> Path:
    """A copy of the base weights ``base`` with one entry of its first weight set to ``value``."""
    state = load_file(str(base))
    key = next(k for k in sorted(state) if k.endswith(".weight"))
    state[key] = state[key].clone()
    state[key].view(-1)[0] = value
    save_file(state, str(dst))
    return dst


def _merge(tmp, base, *adapters):
    return ["merge", "--base", base, "--adapters", *adapters, "--method", "task_arithmetic", "--space", "core",
            "--out", tmp / "merged", "--store", tmp / "s"]


def _study(tmp, **changes):
    study = {"name": "s", "tasks": ["digits", "textures"], "methods": [{"method": "ties", "grid": {"alpha": [1.0]}}], **changes}
    (tmp / "study.yaml").write_text(yaml.safe_dump(study))
    return ["run", tmp / "study.yaml", "--store", tmp / "s"]


def _case_rank_true(tmp, adapters, base):
    return _merge(tmp, base, _adapter(adapters[0], tmp / "a", r=True), adapters[1]), "r = True; LoRA rank must be a positive integer"


def _case_rank_pattern_true(tmp, adapters, base):
    bad = _adapter(adapters[0], tmp / "a", rank_pattern={"attn": True})
    return _merge(tmp, base, bad, adapters[1]), "rank_pattern['attn'] = True is not a valid rank"


def _case_absurd_alpha(tmp, adapters, base):
    bad = _adapter(adapters[0], tmp / "a", lora_alpha=1e38)
    return _merge(tmp, base, bad, adapters[1]), "lora_alpha 1e+38 at rank 4 gives scaling 2.5e+37"


def _case_absurd_alpha_pattern(tmp, adapters, base):
    bad = _adapter(adapters[0], tmp / "a", alpha_pattern={"attn": -1e9})
    return _merge(tmp, base, bad, adapters[1]), "lora_alpha -1e+09 at rank 4 gives scaling -2.5e+08"


def _case_absurd_alpha_in_check(tmp, adapters, base):
    return ["check", _adapter(adapters[0], tmp / "a", lora_alpha=1e38)], "gives scaling 2.5e+37"


def _case_config_rank_disagrees_with_tensors(tmp, adapters, base):
    bad = _adapter(adapters[0], tmp / "a", r=8)
    return _merge(tmp, base, bad, adapters[1]), "the tensors have rank 4, the adapter config declares 8 (r), so PEFT would refuse"


def _case_rank_pattern_disagrees_with_tensors(tmp, adapters, base):
    bad = _adapter(adapters[0], tmp / "a", rank_pattern={"attn": 2})
    return _merge(tmp, base, bad, adapters[1]), "the adapter config declares 2 (its rank_pattern)"


def _case_nan_in_the_base(tmp, adapters, base):
    return _merge(tmp, _base_with(base, tmp / "nan.safetensors", float("nan")), *adapters[:2]), "contains 1 NaN/Inf values"


def _case_inf_in_the_base(tmp, adapters, base):
    return _merge(tmp, _base_with(base, tmp / "inf.safetensors", float("inf")), *adapters[:2]), "contains 1 NaN/Inf values"


def _case_check_adapter_truncated_after_its_header(tmp, adapters, base):
    bad = _adapter(adapters[0], tmp / "a")
    weights = bad / "adapter_model.safetensors"
    header = 8 + int.from_bytes(weights.read_bytes()[:8], "little")
    weights.write_bytes(weights.read_bytes()[:header + 10])
    return ["check", bad], "adapter_model.safetensors is truncated: its header places tensor data up to byte"


def _case_check_base_truncated_after_its_header(tmp, adapters, base):
    cut = tmp / "cut.safetensors"
    cut.write_bytes(base.read_bytes()[:-1])
    return ["check", *adapters[:2], "--base", cut], "cut.safetensors is truncated"


def _case_check_data_without_a_val_split(tmp, adapters, base):
    (tmp / "data" / "test" / "a").mkdir(parents=True)
    (tmp / "data" / "test" / "a" / "0.png").write_bytes(b"image")
    return ["check", *adapters[:2], "--data", f"digits={tmp / 'data'}"], "has no val split, so its overlap cannot be checked"


def _case_use_rslora_a_string(tmp, adapters, base):
    bad = _adapter(adapters[0], tmp / "a", use_rslora="yes")
    return _merge(tmp, base, bad, adapters[1]), "has use_rslora = 'yes'; it must be true or false (a JSON boolean"


def _case_fan_in_fan_out_a_string(tmp, adapters, base):
    return ["inspect", _adapter(adapters[0], tmp / "a", fan_in_fan_out="false")], "has fan_in_fan_out = 'false'; it must be true or false"


def _case_target_modules_not_a_regex(tmp, adapters, base):
    bad = _adapter(adapters[0], tmp / "a", target_modules="(")
    return _merge(tmp, base, bad, adapters[1]), "target_modules '(' is not a regular expression"


def _case_target_modules_a_number(tmp, adapters, base):
    return ["check", _adapter(adapters[0], tmp / "a", target_modules=5)], "has target_modules = 5; it must be a list of module names"


def _case_config_without_peft_type(tmp, adapters, base):
    return ["inspect", _without(adapters[0], tmp / "a", "peft_type")], "lacks 'peft_type'; PEFT cannot load a LoRA config without it"


def _case_config_without_target_modules(tmp, adapters, base):
    bad = _without(adapters[0], tmp / "a", "target_modules")
    return _merge(tmp, base, bad, adapters[1]), "lacks 'target_modules'; PEFT cannot load a LoRA config without it"


def _case_target_modules_matching_no_tensor(tmp, adapters, base):
    bad = _adapter(adapters[0], tmp / "a", target_modules=["nope.module"])
    return _merge(tmp, base, bad, adapters[1]), "target_modules ['nope.module'] matches none of the 2 modules the weights hold"


def _case_tensors_of_a_module_the_config_does_not_target(tmp, adapters, base):
    bad = _adapter(adapters[0], tmp / "a", target_modules=r"transformer\.resblocks\.0\.attn")
    return _merge(tmp, base, bad, adapters[1]), "LoRA factors for 1 module(s) the config does not target (e.g. 'transformer.resblocks.1.attn')"


def _case_layers_to_transform_beyond_the_model(tmp, adapters, base):
    bad = _adapter(adapters[0], tmp / "a", layers_to_transform=[99])
    return _merge(tmp, base, bad, adapters[1]), "layers_to_transform names layer(s) [99] that hold no LoRA factors (the weights' layers: [0, 1])"


def _case_bias_trained_beside_the_factors(tmp, adapters, base):
    bad = _adapter(adapters[0], tmp / "a", bias="all")
    return _merge(tmp, base, bad, adapters[1]), "trained with PEFT's bias option (bias='all'), which mergelab cannot merge"


def _case_modules_to_save_without_saved_tensors(tmp, adapters, base):
    bad = _adapter(adapters[0], tmp / "a", modules_to_save=["classifier"])
    return _merge(tmp, base, bad, adapters[1]), "modules_to_save names 'classifier', but the weights save no tensor of it"


def _case_finite_factors_whose_product_overflows(tmp, adapters, base):
    def huge(tensors):
        return {k: torch.full_like(v, 1e30) if ".0.attn.lora_" in k else v for k, v in tensors.items()}

    return _merge(tmp, base, _weights(adapters[0], tmp / "a", huge), adapters[1]), "can reach entries of 8e+60, beyond 1.84e+19"


def _case_dense_method_written_as_an_adapter(tmp, adapters, base):
    args = ["merge", "--base", base, "--adapters", *adapters[:2], "--method", "ties", "--out", tmp / "merged", "--store", tmp / "s"]
    return args, "ties in the full space gives a dense update of every module, not a LoRA adapter"


def _case_check_data_of_a_task_no_adapter_has(tmp, adapters, base):
    for split in ("val", "test"):
        (tmp / "data" / split / "a").mkdir(parents=True)
    return ["check", *adapters[:2], "--data", f"bogus={tmp / 'data'}"], "--data bogus: no adapter is named 'bogus'; name one of the tasks digits, textures"


def _case_verify_rtol_without_recompute(tmp, adapters, base):
    return ["store", "verify", "--store", tmp / "s", "--rtol", "0.5"], "--rtol tunes --recompute, which is not given"


def _case_study_with_no_task(tmp, adapters, base):
    return _study(tmp, tasks=[]), "tasks is empty; list the tasks to merge"


def _case_study_iters_true(tmp, adapters, base):
    return _study(tmp, adaptive=[{"method": "adamerging", "iters": True}]), "adaptive[0].iters: Input should be a valid integer"


def _case_study_batch_size_false(tmp, adapters, base):
    return _study(tmp, adaptive=[{"method": "adamerging", "batch_size": False}]), "adaptive[0].batch_size: Input should be a valid integer"


def _case_study_preference_of_booleans(tmp, adapters, base):
    return (_study(tmp, adaptive=[{"method": "tara_a", "preference": [True, False]}]),
            "adaptive[0].preference[0]: Input should be a valid number")


def _case_study_seed_true(tmp, adapters, base):
    return _study(tmp, seeds=[True]), "seeds[0]: Input should be a valid integer"


def _case_study_image_size_true(tmp, adapters, base):
    return _study(tmp, bench={"kind": "open_clip", "image_size": True}), "bench.image_size: Input should be a valid integer"


def _weights_merge(tmp, base, adapters, *extra):
    return ["merge", "--base", base, "--adapters", *adapters[:2], "--format", "weights", "--out", tmp / "merged", "--store", tmp / "s",
            *extra]


def _case_method_composed_with_itself(tmp, adapters, base):  # issue 30 probe case 158
    return _weights_merge(tmp, base, adapters, "--method", "ties+ties"), "method 'ties+ties' names 'ties' twice"


def _case_dare_drop_rate_that_keeps_nothing(tmp, adapters, base):  # probe case 187: 1/(1 - p) = 1e11
    return (_weights_merge(tmp, base, adapters, "--method", "dare_ties", "--set", "p=0.99999999999"),
            "dare_ties: p=0.99999999999 keeps a fraction 1 - p = 1e-11 of each update, less than one entry of the largest module")


def _case_ties_density_that_keeps_nothing(tmp, adapters, base):
    return (_weights_merge(tmp, base, adapters, "--method", "ties", "--set", "density=1e-9"),
            "ties: density=1e-09 keeps less than one entry of the largest module")


def _case_svd_rank_above_every_module(tmp, adapters, base):  # probe case 213
    return (_weights_merge(tmp, base, adapters, "--method", "svd", "--set", "rank=1000000"),
            "svd: rank=1000000 is above every module's min(out, in)")


def _case_max_rank_above_every_module(tmp, adapters, base):  # probe case 250: --max-rank 10^30
    args = _merge(tmp, base, *adapters[:2]) + ["--max-rank", str(10**30)]
    return args, f"--max-rank {10**30} is above every module's min(out, in)"


def _case_shard_size_of_a_peft_adapter(tmp, adapters, base):  # probe case 268
    return _merge(tmp, base, *adapters[:2]) + ["--shard-size", "1MB"], "--shard-size (1000000 bytes) bounds a weights file"


def _case_bench_without_select(tmp, adapters, base):  # probe case 294
    (tmp / "study.yaml").write_text("name: s\n")
    return _merge(tmp, base, *adapters[:2]) + ["--bench", tmp / "study.yaml"], "names the benchmark --select evaluates on"


def _case_grid_and_set_of_one_key(tmp, adapters, base):  # probe case 289
    return (_weights_merge(tmp, base, adapters, "--method", "ties", "--select", "val", "--set", "alpha=1", "--grid", "alpha=0.5,1"),
            "--set alpha=1 fixes 'alpha' and --grid sweeps it")


def _case_integer_base_weight(tmp, adapters, base):  # probe case 305: a float update added to an int64 weight
    state = load_file(str(base))
    key = next(k for k in sorted(state) if k.endswith("attn.in_proj_weight"))
    save_file({**state, key: (state[key] * 100).long()}, str(tmp / "int.safetensors"))
    return _merge(tmp, tmp / "int.safetensors", *adapters[:2]), f"base parameter {key!r} is int64, but task 'digits' updates it"


def _case_adapt_stch_alpha_zero(tmp, adapters, base):  # probe cases 363/364: Ψ = α log Σ exp(ρ f / α)
    return (["adapt", "--base", base, "--adapters", *adapters[:2], "--method", "tara_b", "--alpha", "0", "--out", tmp / "merged",
             "--store", tmp / "s"], "alpha=0.0 (the STCH smoothing")


def _case_adapt_batch_beyond_any_split(tmp, adapters, base):  # probe case 362
    return (["adapt", "--base", base, "--adapters", *adapters[:2], "--method", "adamerging", "--batch-size", str(10**12),
             "--out", tmp / "merged", "--store", tmp / "s"], "batch_size=1000000000000 must be at least 1 and at most 65536")


def _case_study_stch_alpha_negative(tmp, adapters, base):
    return _study(tmp, adaptive=[{"method": "tara_a", "alpha": -1.0}]), "alpha=-1.0 (the STCH smoothing"


CASES = [v for k, v in sorted(globals().items()) if k.startswith("_case_")]


@pytest.fixture
def base(tmp_path, tiny_vit) -> Path:
    """The tiny ViT's weights as a safetensors file: the base of ``vit_adapters``."""
    path = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vit.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("case", CASES, ids=lambda f: f.__name__.removeprefix("_case_"))
def test_a_silently_wrong_merge_is_refused_in_one_line(case, tmp_path, vit_adapters, base):
    args, message = case(tmp_path, vit_adapters, base)
    before = set(tmp_path.rglob("*"))
    result = run(*args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), repr(result.exception)
    assert set(tmp_path.rglob("*")) == before, "bad input left an artifact behind"


def _warns_untrained_adapter(tmp, adapters, base):  # issue 30 probe case 103
    zero = _weights(adapters[0], tmp / "a", lambda d: {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in d.items()})
    return ["inspect", zero, "--base", base], "adapter 'a' holds a zero update B A in every one of its"


def _warns_two_adapter_weight_files(tmp, adapters, base):  # probe case 116: PEFT reads the safetensors file
    both = _adapter(adapters[0], tmp / "a")
    torch.save({k: 2 * v for k, v in load_file(str(both / "adapter_model.safetensors")).items()}, both / "adapter_model.bin")
    return ["inspect", both], "holds adapter_model.safetensors and adapter_model.bin; reading adapter_model.safetensors only"


def _warns_base_folder_with_two_weight_files(tmp, adapters, base):  # probe case 307
    (tmp / "base").mkdir()
    shutil.copyfile(base, tmp / "base" / "model.safetensors")
    shutil.copyfile(base, tmp / "base" / "other.safetensors")
    return ["inspect", adapters[0], "--base", tmp / "base"], "holds model.safetensors and other.safetensors; reading model.safetensors only"


def _warns_shard_size_below_every_tensor(tmp, adapters, base):  # probe case 267: every tensor alone in a shard
    return (["merge", "--base", base, "--adapters", *adapters[:2], "--method", "task_arithmetic", "--format", "weights",
             "--shard-size", "1B", "--out", tmp / "merged", "--store", tmp / "s"], "--shard-size 1 bytes is below every tensor's size")


WARNED = [v for k, v in sorted(globals().items()) if k.startswith("_warns_")]


@pytest.mark.parametrize("case", WARNED, ids=lambda f: f.__name__.removeprefix("_warns_"))
def test_a_legal_but_suspicious_input_is_one_warning_line(case, tmp_path, vit_adapters, base):
    """Inputs PEFT or transformers read without a word but that are likely mistakes: exit 0 and one ``warning:`` line."""
    args, message = case(tmp_path, vit_adapters, base)
    result = run(*args)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and message in lines[0], result.stderr


def test_fan_in_fan_out_on_linear_modules_is_reset_with_one_warning_line(tmp_path):
    """The micro adapters target square nn.Linear projections: ``fan_in_fan_out: true`` would
    transpose every update. It is read as PEFT reads it (the flag reset), with one warning line."""
    base, digits = MICRO / "base" / "model.safetensors", MICRO / "adapters" / "r4" / "digits"
    flagged = _adapter(digits, tmp_path / "digits", fan_in_fan_out=True)
    expected = load_taskset(base, [digits]).tasks[0]
    with pytest.warns(UserWarning, match=r"sets fan_in_fan_out: true, but the base holds 16 of its modules .* as nn.Linear"):
        task = load_taskset(base, [flagged]).tasks[0]
    for name, update in expected.modules.items():
        torch.testing.assert_close(task.modules[name].dense(), update.dense(), atol=0, rtol=0, msg=name)
    result = run("inspect", flagged, "--base", base)
    assert result.exit_code == 0, result.output
    assert [line for line in result.stderr.splitlines() if line.strip()] == [result.stderr.strip()]
    assert result.stderr.startswith("warning: adapter 'digits' sets fan_in_fan_out: true"), result.stderr


def test_conv1d_modules_without_fan_in_fan_out_are_read_as_peft_reads_them(tmp_path):
    """GPT-2's Conv1D weights are stored (in, out): an adapter whose config says ``fan_in_fan_out:
    false`` is read transposed, as PEFT does, from a state dict (square ``attn.c_proj`` included)."""
    import transformers
    from peft import PeftModel

    from mergelab.synthetic import write_peft_adapters

    torch.manual_seed(0)
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16,
                                                          bos_token_id=0, eos_token_id=0))
    [path] = write_peft_adapters(gpt2, tmp_path, ["g"], target_modules=["c_attn", "c_proj"], rank=4, alpha=8, fan_in_fan_out=True)
    _adapter(path, tmp_path / "unflagged", fan_in_fan_out=False)
    expected = PeftModel.from_pretrained(copy.deepcopy(gpt2), str(path)).merge_and_unload().state_dict()
    with pytest.warns(UserWarning, match=r"sets fan_in_fan_out: false, but the base holds 3 of its modules .* as Conv1D"):
        taskset = load_taskset(dict(gpt2.state_dict()), [tmp_path / "unflagged"])
    for name, update in taskset.tasks[0].modules.items():
        torch.testing.assert_close(gpt2.state_dict()[name] + update.dense(), expected[name], atol=1e-6, rtol=1e-5, msg=name)


KEYS = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.12.mlp.down_proj", "lm_head",
        "transformer.resblocks.0.attn", "model.h.3.attn.c_attn", "score", "model.layers.0.score.dense", "model.layers.2.experts.0.w1"]
TARGETINGS = [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": ["q_proj", "down_proj", "lm_head"], "layers_to_transform": [0, 12]},
    {"target_modules": ["q_proj", "v_proj", "w1"], "layers_to_transform": 1},
    {"target_modules": ["c_attn", "w1"], "layers_to_transform": [3, 2], "layers_pattern": ["h", "layers"]},
    {"target_modules": ["attn", "c_attn"], "layers_to_transform": [0], "layers_pattern": "resblocks"},
    {"target_modules": r".*\.(q_proj|down_proj)"},
    {"target_modules": ["q_proj", "v_proj", "down_proj"], "exclude_modules": ["down_proj"]},
    {"target_modules": r"model\..*", "exclude_modules": r".*\.1\..*"},
    {"target_modules": ["dense", "score", "q_proj"], "modules_to_save": ["score"]},
    {"target_modules": ["model.layers.0.self_attn.q_proj", "down_proj"], "layers_to_transform": [5]},
]


@pytest.mark.parametrize("config", TARGETINGS)
def test_the_modules_a_config_targets_are_those_peft_wraps(config):
    """:func:`~mergelab.checkpoints.adapter_configs.targets` (which LoRA tensors a config keeps, what a config
    disagreeing with its tensors is judged by) against PEFT's own matching on load."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from mergelab.checkpoints.adapter_configs import targets

    peft_config = LoraConfig(**config)
    for key in KEYS:
        assert targets(config, key) == bool(check_target_module_exists(peft_config, key)), key  # PEFT's exclusion is falsy
