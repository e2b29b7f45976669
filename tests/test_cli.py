"""The CLI: inspect / store / version, and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergelab_app.cli import app
from mergelab.synthetic import tiny_vision_transformer, write_peft_adapters

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def test_version():
    result = run("--version")
    assert result.exit_code == 0 and result.stdout.startswith("mergelab ")


@pytest.mark.parametrize("command", [[], ["inspect"], ["run"], ["demo"], ["analyze"], ["serve"], ["report"], ["merge"], ["adapt"],
                                     ["build-micro"], ["store"], ["store", "ls"], ["store", "gc"], ["store", "verify"]])
def test_help_names_value_types_plainly(command):
    """A flag shows no placeholder and a repeatable option ``<str>...`` (not ``<bool>`` / ``<list[str]>``)."""
    result = run(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.stdout and "<list[" not in result.stdout and "--help" in result.stdout


def test_merge_help_lists_every_method_with_its_hyper_parameters():
    from mergelab.merging import METHODS

    text = " ".join(run("merge", "--help").stdout.split())
    for name, method in METHODS.items():
        described = ", ".join(f"{p.name}={p.default}" for p in method.params.values()) or "none"
        assert f"{name} ({described})" in text


def test_inspect_prints_a_table_and_json(vit_adapters, tiny_vit, tmp_path):
    save_file({k: v.contiguous() for k, v in tiny_vit.state_dict().items()}, str(tmp_path / "base.safetensors"))
    result = run("inspect", *vit_adapters, "--base", tmp_path / "base.safetensors")
    assert result.exit_code == 0, result.output
    for needle in ("digits", "textures", "signs", "in_proj_weight", "rank", "alpha", "scaling", "‖ΔW‖_F"):
        assert needle in result.stdout
    result = run("inspect", f"mine={vit_adapters[0]}", "--json")
    report = json.loads(result.stdout)
    assert report[0]["task"] == "mine" and len(report[0]["modules"]) == 4
    assert {m["rank"] for m in report[0]["modules"]} == {4} and {m["alpha"] for m in report[0]["modules"]} == {8.0}
    assert all(m["norm"] > 0 for m in report[0]["modules"])


def test_store_ls_and_gc(tmp_path):
    from mergelab.store import Store

    store = Store(tmp_path / "s")
    key = store.put_json(store.key("sel", "1", a=1), {"best": 0.3})
    leftover = f"{store.key('sel', '1', a=2)}.{'0' * 12}"  # a killed write: staging/<key>.<token>
    (tmp_path / "s" / "staging" / leftover).mkdir(parents=True)
    listed = json.loads(run("store", "ls", "--store", tmp_path / "s", "--json").stdout)
    assert [a["key"] for a in listed] == [key]
    assert "removed 0 entries" in run("store", "gc", "--store", tmp_path / "s").stdout  # younger than the lease
    result = run("store", "gc", "--store", tmp_path / "s", "--lease", "0")
    assert result.exit_code == 0 and "removed 1 entries" in result.stdout and f"staging/{leftover}" in result.stdout
    (tmp_path / "keep.txt").write_text("")
    assert "would remove 1" in run("store", "gc", "--store", tmp_path / "s", "--keep", tmp_path / "keep.txt", "--dry-run").stdout
    assert Store(tmp_path / "s").exists(key)
    assert run("store", "verify", "--store", tmp_path / "s").stdout.strip().endswith("0 corrupt artifacts")
    (tmp_path / "s" / "objects" / key / "_published.json").write_text("{")
    result = run("store", "verify", "--store", tmp_path / "s", "--quarantine")
    assert result.exit_code == 1 and f"{key}: marker is not readable JSON" in result.stdout and "quarantine" in result.stdout
    assert run("store", "verify", "--store", tmp_path / "s").exit_code == 0


def test_merge_writes_a_loadable_adapter_and_stores_the_configuration(vit_adapters, tiny_vit, tmp_path):
    import copy

    from peft import PeftModel

    from mergelab.store import Store

    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vit.state_dict().items()}, str(base))
    result = run("merge", "--base", base, "--adapters", *vit_adapters, "--method", "tsv+iso_c", "--space", "core",
                 "--set", "alpha=0.9", "--set", "iso_c.support=all", "--out", tmp_path / "out", "--store", tmp_path / "s")
    assert result.exit_code == 0, result.output
    assert "merged 3 tasks with tsv+iso_c in core space" in result.stdout
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == 12  # T·r = 3 · 4
    merged = PeftModel.from_pretrained(copy.deepcopy(tiny_vit), str(tmp_path / "out")).merge_and_unload().state_dict()
    assert any(not torch.equal(merged[k], v) for k, v in tiny_vit.state_dict().items())
    store = Store(tmp_path / "s")
    [artifact] = store.ls()
    record = store.get_json(artifact.key)
    assert record["method"] == "tsv+iso_c" and record["space"] == "core"
    assert record["hyper_parameters"]["iso_c.alpha"] == 0.9 and record["hyper_parameters"]["iso_c.support"] == "all"
    assert [t["name"] for t in record["tasks"]] == ["digits", "textures", "signs"]
    assert record["output"].endswith("out") and set(record["ranks"].values()) == {12}
    weights = run("merge", "--base", base, "--adapters", *vit_adapters[:2], "--method", "ties", "--format", "weights",
                  "--out", tmp_path / "w", "--store", tmp_path / "s")
    assert weights.exit_code == 0, weights.output
    assert set(load_file(str(tmp_path / "w" / "model.safetensors"))) == set(tiny_vit.state_dict())
    assert len(Store(tmp_path / "s").ls()) == 2
    capped = run("merge", "--base", base, "--adapters", *vit_adapters, "--method", "task_arithmetic", "--max-rank", "5",
                 "--out", tmp_path / "capped", "--store", tmp_path / "s")
    assert capped.exit_code == 0, capped.output
    assert "rank capped at 5:" in capped.stdout and "largest relative error" in capped.stdout
    assert json.loads((tmp_path / "capped" / "adapter_config.json").read_text())["r"] == 5
    assert max(json.loads((tmp_path / "capped" / "merge.json").read_text())["rank_cap_error"].values()) > 0
    assert any(r.get("max_rank") == 5 for r in map(Store(tmp_path / "s").get_json, (a.key for a in Store(tmp_path / "s").ls())))


def test_merge_regmean_reads_gram_matrices_from_a_file(vit_adapters, tiny_vit, tmp_path):
    from mergelab.checkpoints import load_taskset

    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vit.state_dict().items()}, str(base))
    taskset = load_taskset(tiny_vit, vit_adapters[:2])
    grams = {f"{t}::{m}": torch.eye(u.shape[1]) * (i + 1) for i, t in enumerate(taskset.names)
             for m, u in taskset.tasks[0].modules.items()}
    save_file(grams, str(tmp_path / "grams.safetensors"))
    result = run("merge", "--base", base, "--adapters", *vit_adapters[:2], "--method", "regmean", "--space", "core",
                 "--grams", tmp_path / "grams.safetensors", "--out", tmp_path / "out", "--store", tmp_path / "s")
    assert result.exit_code == 0, result.output
    save_file({"nobody::x": torch.eye(2)}, str(tmp_path / "bad.safetensors"))
    bad = run("merge", "--base", base, "--adapters", *vit_adapters[:2], "--method", "regmean", "--grams",
              tmp_path / "bad.safetensors", "--out", tmp_path / "out2", "--store", tmp_path / "s")
    assert bad.exit_code == 2 and "key 'nobody::x' is not '<task>::<module>'" in bad.stderr


# Bad input: one line on stderr, exit code 2, the message names the problem and the fix. ------------


def _adapter_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (path / "adapter_config.json").write_text(json.dumps(config))


def _edit_weights(path: Path, fn) -> None:
    tensors = load_file(str(path / "adapter_model.safetensors"))
    save_file({k: fn(k, v).contiguous() for k, v in tensors.items()}, str(path / "adapter_model.safetensors"))


def _case_missing_path(tmp, adapter, base):
    return ["inspect", tmp / "does-not-exist"], "does not exist"


def _case_not_an_adapter(tmp, adapter, base):
    (tmp / "empty").mkdir()
    return ["inspect", tmp / "empty"], "not a PEFT adapter directory"


def _case_not_an_adapter_nor_checkpoint(tmp, adapter, base):
    (tmp / "empty").mkdir()
    return ["inspect", tmp / "empty", "--base", base], "neither a PEFT adapter"


def _case_corrupt_safetensors(tmp, adapter, base):
    bad = _adapter_copy(adapter, tmp / "bad")
    (bad / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    return ["inspect", bad], "corrupt or truncated safetensors"


def _case_shapes_do_not_fit(tmp, adapter, base):
    wide = tiny_vision_transformer(width=64)
    [path] = write_peft_adapters(wide, tmp, ["wide"], target_modules=["attn"])
    return ["inspect", path, "--base", base], "does not fit base parameter shape"


def _case_modules_the_base_lacks(tmp, adapter, base):
    bad = _adapter_copy(adapter, tmp / "renamed")
    _edit_weights(bad, lambda k, v: v)
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    save_file({k.replace("resblocks", "blocks"): v for k, v in tensors.items()}, str(bad / "adapter_model.safetensors"))
    return ["inspect", bad, "--base", base], "the base lacks"


def _case_nan_weights(tmp, adapter, base):
    bad = _adapter_copy(adapter, tmp / "nan")
    _edit_weights(bad, lambda k, v: v.fill_(float("nan")) if "lora_B" in k else v)
    return ["inspect", bad], "NaN/Inf"


def _case_inf_weights(tmp, adapter, base):
    bad = _adapter_copy(adapter, tmp / "inf")
    _edit_weights(bad, lambda k, v: v.fill_(float("inf")) if "lora_A" in k else v)
    return ["inspect", bad], "NaN/Inf"


def _case_empty_source_list(tmp, adapter, base):
    return ["inspect"], "empty source list"


def _case_duplicate_names(tmp, adapter, base):
    return ["inspect", f"same={adapter}", f"same={adapter}", "--base", base], "duplicate task names"


def _case_unsupported_dtype(tmp, adapter, base):
    bad = _adapter_copy(adapter, tmp / "int")
    _edit_weights(bad, lambda k, v: v.to(torch.int8))
    return ["inspect", bad], "unsupported dtype torch.int8"


def _case_rank_zero(tmp, adapter, base):
    bad = _adapter_copy(adapter, tmp / "r0")
    _edit_config(bad, r=0)
    return ["inspect", bad], "r = 0"


def _case_invalid_json(tmp, adapter, base):
    bad = _adapter_copy(adapter, tmp / "json")
    (bad / "adapter_config.json").write_text("{not json")
    return ["inspect", bad], "not valid JSON"


def _case_config_lacks_r(tmp, adapter, base):
    bad = _adapter_copy(adapter, tmp / "nor")
    _edit_config(bad, r=None)
    return ["inspect", bad], "lacks 'r'"


def _case_config_lacks_alpha(tmp, adapter, base):
    bad = _adapter_copy(adapter, tmp / "noalpha")
    _edit_config(bad, lora_alpha=None)
    return ["inspect", bad], "lacks 'lora_alpha'"


def _case_unknown_store_protocol(tmp, adapter, base):
    return ["store", "ls", "--store", "nope://bucket/x"], "unknown store protocol 'nope'"


def _case_full_checkpoint_without_base(tmp, adapter, base):
    return ["inspect", base], "pass --base"


def _case_missing_keep_file(tmp, adapter, base):
    return ["store", "gc", "--store", tmp / "s", "--keep", tmp / "nope.txt"], "--keep file"


def _merge_args(tmp, adapter, base, *extra):
    return ["merge", "--base", base, "--adapters", adapter, adapter.parent / "textures", "--out", tmp / "merged",
            "--store", tmp / "s", *extra]


def _case_merge_base_module_without_the_adapter(tmp, adapter, base):
    return _merge_args(tmp, adapter, base, "--method", "ties", "--base-module", "text"), "--base-module 'text': the base holds no module"


def _case_merge_max_rank_with_weights(tmp, adapter, base):
    return _merge_args(tmp, adapter, base, "--method", "ties", "--format", "weights", "--max-rank", "4"), "--max-rank 4 caps a PEFT adapter's rank"


def _case_merge_unknown_method(tmp, adapter, base):
    return _merge_args(tmp, adapter, base, "--method", "tiez"), "unknown merge method 'tiez'; allowed: average"


def _case_merge_bad_hyper_parameter_value(tmp, adapter, base):
    return _merge_args(tmp, adapter, base, "--method", "ties", "--set", "density=1.5"), "density='1.5' is invalid; expected float in (0, 1]"


def _case_merge_unknown_hyper_parameter(tmp, adapter, base):
    return _merge_args(tmp, adapter, base, "--method", "iso_c", "--set", "k=3"), "method 'iso_c' has no option 'k'; allowed: alpha"


def _case_merge_set_without_value(tmp, adapter, base):
    return _merge_args(tmp, adapter, base, "--method", "ties", "--set", "density"), "--set 'density' is not KEY=VALUE"


def _case_merge_unknown_space(tmp, adapter, base):
    return _merge_args(tmp, adapter, base, "--method", "ties", "--space", "kernel"), "unknown space 'kernel'; allowed: full, knots, core"


def _case_merge_bad_space_option(tmp, adapter, base):
    return _merge_args(tmp, adapter, base, "--method", "ties", "--space", "knots", "--space-option", "naive=perhaps"), "naive='perhaps' is invalid"


def _case_merge_dense_result_as_peft(tmp, adapter, base):
    return _merge_args(tmp, adapter, base, "--method", "ties", "--space", "full"), "save with format='weights'"


def _case_merge_regmean_without_grams(tmp, adapter, base):
    return _merge_args(tmp, adapter, base, "--method", "regmean", "--space", "core"), "needs side input 'grams'"


def _case_merge_factor_method_after_plus(tmp, adapter, base):
    return _merge_args(tmp, adapter, base, "--method", "ties+lora_lego"), "'lora_lego' needs LoRA factors and cannot post-process"


def _case_merge_output_exists(tmp, adapter, base):
    (tmp / "merged").mkdir()
    return _merge_args(tmp, adapter, base, "--method", "ties", "--space", "core"), "already exists; choose another path or pass --force"


def _case_merge_grid_without_select(tmp, adapter, base):
    return _merge_args(tmp, adapter, base, "--method", "ties", "--grid", "density=0.2,0.5"), "add --select val or --select tas"


def _case_merge_select_unknown_rule(tmp, adapter, base):
    return _merge_args(tmp, adapter, base, "--method", "ties", "--select", "test"), "unknown selection rule 'test'; allowed: val, tas"


def _case_merge_select_grid_too_large(tmp, adapter, base):
    return _merge_args(tmp, adapter, base, "--method", "ties", "--select", "val"), "narrow it with --grid KEY=V1,V2"


def _case_merge_select_with_space_option(tmp, adapter, base):
    return (_merge_args(tmp, adapter, base, "--method", "tsv", "--space", "knots", "--space-option", "naive=true", "--select", "val"),
            "drop --grams, --modules and --space-option")


def _case_merge_select_bench_not_a_study(tmp, adapter, base):
    return _merge_args(tmp, adapter, base, "--method", "tsv", "--select", "val", "--bench", tmp / "nope.yaml"), "neither 'micro' nor a study YAML"


def _case_merge_select_foreign_base(tmp, adapter, base):
    return _merge_args(tmp, adapter, base, "--method", "tsv", "--select", "val"), "do not fit the micro-r4 benchmark"


def _case_duplicate_names_without_base(tmp, adapter, base):
    return ["inspect", f"same={adapter}", f"same={adapter.parent / 'textures'}"], "two sources are named 'same'"


def _case_json_file_as_base(tmp, adapter, base):
    (tmp / "base.json").write_text('{"a": 1}')
    return ["inspect", adapter, "--base", tmp / "base.json"], "neither a safetensors nor a torch weights file"


def _case_pickle_with_objects(tmp, adapter, base):
    import fractions

    bad = _adapter_copy(adapter, tmp / "pickle")
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    (bad / "adapter_model.safetensors").unlink()
    torch.save({**tensors, "extra": fractions.Fraction(1, 2)}, bad / "adapter_model.bin")
    return ["inspect", bad], "convert it to safetensors"


def _case_alpha_not_a_number(tmp, adapter, base):
    bad = _adapter_copy(adapter, tmp / "alpha")
    _edit_config(bad, lora_alpha="sixteen")
    return ["inspect", bad], "lora_alpha = 'sixteen'; it must be a number"


def _case_alpha_pattern_bad_regex(tmp, adapter, base):
    bad = _adapter_copy(adapter, tmp / "pattern")
    _edit_config(bad, alpha_pattern={"(": 4})
    return ["inspect", bad], "alpha_pattern key '(' is not a regular expression"


def _case_rank_pattern_bad_value(tmp, adapter, base):
    bad = _adapter_copy(adapter, tmp / "rank")
    _edit_config(bad, rank_pattern={"attn": "four"})
    return ["inspect", bad], "rank_pattern['attn'] = 'four' is not a valid rank"


def _case_modules_bad_regex(tmp, adapter, base):
    return _merge_args(tmp, adapter, base, "--method", "ties", "--format", "weights", "--modules", "(["), "--modules) '([' is not a regular expression"


def _case_store_is_a_file(tmp, adapter, base):
    (tmp / "afile").write_text("")
    return ["store", "ls", "--store", tmp / "afile"], "is a file, not a directory"


def _case_merge_out_under_a_file(tmp, adapter, base):
    (tmp / "afile").write_text("")
    args = _merge_args(tmp, adapter, base, "--method", "ties", "--format", "weights")
    args[args.index("--out") + 1] = tmp / "afile" / "merged"
    return args, "which is a file; choose a path under a directory"


def _case_merge_store_is_a_file(tmp, adapter, base):
    (tmp / "afile").write_text("")
    args = _merge_args(tmp, adapter, base, "--method", "ties", "--format", "weights")
    args[args.index("--store") + 1] = tmp / "afile"
    return args, "store"


def _case_merge_missing_grams(tmp, adapter, base):
    return _merge_args(tmp, adapter, base, "--method", "regmean", "--grams", tmp / "grams.safetensors"), "--grams"


def _case_merge_no_adapters(tmp, adapter, base):
    return ["merge", "--base", base, "--method", "ties", "--out", tmp / "merged"], "no adapters given"


def _case_merge_task_name_that_escapes_the_output(tmp, adapter, base):
    args = _merge_args(tmp, adapter, base, "--method", "ties", "--format", "weights")
    args[args.index("--adapters") + 1] = f"../x={adapter}"
    return args, "task name '../x' must start with a letter or digit"


def _case_merge_consensus_needs_more_tasks_than_it_has(tmp, adapter, base):
    return _merge_args(tmp, adapter, base, "--method", "consensus", "--format", "weights", "--set", "k=3"), \
        "consensus: k=3 masks must agree but the task set has 2 tasks"


def _case_inspect_task_name_without_a_path(tmp, adapter, base):
    return ["inspect", "digits="], "'digits=' names task 'digits' but gives no path"


def _case_inspect_task_name_with_a_slash(tmp, adapter, base):
    return ["inspect", f"a/b={adapter}"], "task name 'a/b' must start with a letter or digit"


def _case_merge_infinite_shard_size(tmp, adapter, base):
    return _merge_args(tmp, adapter, base, "--method", "ties", "--format", "weights", "--shard-size", "inf"), "--shard-size 'inf' is not a size"


def _case_merge_superscript_rank(tmp, adapter, base):
    return _merge_args(tmp, adapter, base, "--method", "task_arithmetic", "--space", "core", "--max-rank", "²"), "unknown serving engine '²'"


def _case_merge_empty_max_rank(tmp, adapter, base):
    return _merge_args(tmp, adapter, base, "--method", "task_arithmetic", "--space", "core", "--max-rank", ""), "--max-rank is empty"


def _case_merge_max_rank_engine_with_an_empty_cap(tmp, adapter, base):  # vllm:$CAP with CAP unset
    return _merge_args(tmp, adapter, base, "--method", "task_arithmetic", "--space", "core", "--max-rank", "vllm:"), \
        "has an empty cap after ':'"


def _case_merge_max_rank_cap_with_an_empty_engine(tmp, adapter, base):
    return _merge_args(tmp, adapter, base, "--method", "task_arithmetic", "--space", "core", "--max-rank", ":64"), \
        "has an empty engine before ':'"


def _case_merge_modules_repeat_count_too_large(tmp, adapter, base):
    return _merge_args(tmp, adapter, base, "--method", "ties", "--format", "weights", "--modules", "a{99999999999}"), \
        "is not a regular expression (the repetition number is too large)"


def _case_merge_out_inside_the_store(tmp, adapter, base):
    (tmp / "s" / "refs").mkdir(parents=True)
    args = _merge_args(tmp, adapter, base, "--method", "ties", "--format", "weights")
    args[args.index("--out") + 1] = tmp / "s" / "refs" / "merged"
    return args, "lies inside the store"


def _case_merge_out_inside_an_input_adapter(tmp, adapter, base):
    args = _merge_args(tmp, adapter, base, "--method", "ties", "--format", "weights")
    args[args.index("--out") + 1] = adapter / "merged"
    return args, "lies inside the adapter"


def _case_merge_superscript_seed(tmp, adapter, base):
    return _merge_args(tmp, adapter, base, "--method", "dare_ties", "--format", "weights", "--set", "seed=²"), "seed"


def _case_check_header_length_beyond_any_read(tmp, adapter, base):
    bad = tmp / "huge-header"
    shutil.copytree(adapter, bad)
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes((2**63).to_bytes(8, "little") + weights.read_bytes()[8:])
    return ["check", bad], "corrupt or truncated safetensors header (OverflowError)"


def _case_store_gc_keep_is_a_folder(tmp, adapter, base):
    return ["store", "gc", "--store", tmp / "s", "--keep", tmp], "is not a regular file"


def _adapt_args(tmp, adapter, base, *extra):
    return ["adapt", "--base", base, "--adapters", adapter, adapter.parent / "textures", "--method", "adamerging",
            "--out", tmp / "adapted", "--store", tmp / "s", *extra]


def _case_adapt_zero_iterations(tmp, adapter, base):
    return _adapt_args(tmp, adapter, base, "--iters", "0"), "iters=0 must be at least 1"


def _case_adapt_nan_learning_rate(tmp, adapter, base):
    return _adapt_args(tmp, adapter, base, "--lr", "nan"), "lr=nan must be a positive number"


def _case_adapt_zero_batch(tmp, adapter, base):
    return _adapt_args(tmp, adapter, base, "--batch-size", "0"), "batch_size=0 must be at least 1"


def _case_adapt_clamp_not_a_pair(tmp, adapter, base):  # issue 30 probe case 390: a TypeError after the references ran
    return _adapt_args(tmp, adapter, base, "--set", "clamp=abc"), "clamp='abc' is invalid; expected [low, high]"


def _case_adapt_clamp_low_above_high(tmp, adapter, base):  # probe case 391: every λ clamped to one value, silently
    return _adapt_args(tmp, adapter, base, "--set", "clamp=[1,0]"), "clamp=[1, 0] is invalid; expected [low, high]"


def _case_adapt_init_beyond_any_coefficient(tmp, adapter, base):  # probe cases 392/393: float32 overflow after the references
    return _adapt_args(tmp, adapter, base, "--set", "init=1e308"), "init='1e308' is invalid; expected float in [-1000, 1000]"


def _case_adapt_unknown_origin(tmp, adapter, base):
    args = _adapt_args(tmp, adapter, base, "--set", "origin=bogus")
    args[args.index("adamerging")] = "adarank"
    return args, "origin='bogus' is invalid"


def _case_adapt_preference_length(tmp, adapter, base):
    args = _adapt_args(tmp, adapter, base, "--preference", "0.2,0.3,0.5")
    args[args.index("adamerging")] = "tara_b"
    return args, "preference has 3 entries for 2 tasks"


def _case_run_zero_workers(tmp, adapter, base):
    return ["run", REPO / "studies" / "micro.yaml", "--runner", "thread=0", "--store", tmp / "s"], "worker count from 1 to 256"


def _case_run_a_billion_workers(tmp, adapter, base):  # issue 30 fresh probe 576: unbounded parallel nodes, each with its state
    return ["run", REPO / "studies" / "micro.yaml", "--runner", "thread=1000000000", "--store", tmp / "s"], "worker count from 1 to 256"


def _case_serve_register_only_without_a_server(tmp, adapter, base):
    return ["serve", REPO / "studies" / "micro.yaml", "--register-only", "--store", tmp / "s"], "set PREFECT_API_URL"


def _case_store_file_url_without_a_path(tmp, adapter, base):  # issue 30 probe case 338: it was the working directory
    return ["store", "ls", "--store", "file://"], "store URL 'file://' names no folder"


def _case_store_path_with_a_line_break(tmp, adapter, base):  # probe case 348 ($MERGELAB_STORE read from a file)
    return ["store", "ls", "--store", f"{tmp / 's'}\n"], "holds a control character (a line break?)"


def _case_store_whose_objects_is_a_file(tmp, adapter, base):  # probe case 349
    (tmp / "s").mkdir()
    (tmp / "s" / "objects").write_text("x")
    return ["store", "ls", "--store", tmp / "s"], "objects is a file, not a folder, so this is no store"


def _case_store_a_folder_of_user_files(tmp, adapter, base):  # probe case 351: merge wrote objects into an adapter's folder
    args = _merge_args(tmp, adapter, base, "--method", "ties", "--format", "weights")
    args[args.index("--store") + 1] = adapter
    return args, "is a folder of other files (e.g. 'README.md'), not a store"


def _case_build_micro_zero_threads(tmp, adapter, base):  # issue 30 probe 678: refused after the model libraries loaded
    return ["build-micro", "--quick", "--threads", "0", "--out", tmp / "m", "--store", tmp / "s"], "Invalid value for '--threads'"


def _case_build_micro_more_threads_than_cores(tmp, adapter, base):  # probe 680: 100000 threads, out of memory with a traceback
    return ["build-micro", "--quick", "--threads", "100000", "--out", tmp / "m", "--store", tmp / "s"], "Invalid value for '--threads'"


def _case_build_micro_negative_seed(tmp, adapter, base):  # probe 681: numpy's traceback
    return ["build-micro", "--quick", "--seed", "-1", "--out", tmp / "m", "--store", tmp / "s"], "Invalid value for '--seed'"


def _case_build_micro_out_under_a_file(tmp, adapter, base):  # probe 683: the pre-training ran, the export would have failed
    (tmp / "afile").write_text("")
    return ["build-micro", "--quick", "--out", tmp / "afile" / "micro", "--store", tmp / "s"], "which is a file; choose a path under a directory"


def _case_build_text_negative_seed(tmp, adapter, base):
    return ["build-text", "--quick", "--seed", "-1", "--out", tmp / "t", "--store", tmp / "s"], "Invalid value for '--seed'"


def _case_verify_seed_beyond_int64(tmp, adapter, base):  # probes 666-667: accepted
    return ["store", "verify", "--store", tmp / "s", "--recompute", "1", "--seed", str(2**70)], "Invalid value for '--seed'"


BAD_INPUT = [v for k, v in sorted(globals().items()) if k.startswith("_case_")]


@pytest.mark.parametrize("case", BAD_INPUT, ids=lambda f: f.__name__.removeprefix("_case_"))
def test_bad_input_is_one_line_and_exit_code_2(case, tmp_path, vit_adapters, tiny_vit):
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vit.state_dict().items()}, str(base))
    args, message = case(tmp_path, vit_adapters[0], base)
    before = set(tmp_path.rglob("*"))
    result = run(*args)
    assert set(tmp_path.rglob("*")) == before, "bad input left an artifact behind"
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.output


def test_at_least_forty_classes_of_bad_input():
    assert len(BAD_INPUT) >= 40
