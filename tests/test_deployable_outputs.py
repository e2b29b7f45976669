"""Outputs users deploy and adapters users have (issue 33): serving ranks (``--max-rank vllm``), the model
card, sharded weights, adapters a merge of ``B A`` would get wrong, and causal-LM adapters."""

from __future__ import annotations

import copy
import json
import shlex
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import save_file
from typer.testing import CliRunner

from mergelab.cards import model_card
from mergelab.checkpoints import cap_rank, load_taskset, save_merged
from mergelab.checkpoints.writing import merged_rank, parse_size
from mergelab_app.cli import app
from mergelab.errors import InputError
from mergelab.merging import merge
from mergelab.serving import SERVING_RANKS, parse_max_rank, serving_rank
from mergelab.synthetic import write_peft_adapters

runner = CliRunner()
TASKS = ("copy", "reverse", "sort")
#: LoRA on every attention and MLP projection, at ranks that differ by module (PEFT's rank_pattern).
LORA = {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "rank_pattern": {"q_proj": 2, "down_proj": 6}, "alpha_pattern": {"down_proj": 3}, "task_type": "CAUSAL_LM"}


def run(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """A random 2-layer ``LlamaForCausalLM`` (grouped-query attention: k/v narrower than q) saved with ``save_pretrained``."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    root = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(config).save_pretrained(root)
    return root


def _model(root: Path):
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(root).eval()


@pytest.fixture(scope="module")
def causal_adapters(llama, tmp_path_factory) -> list[Path]:
    return write_peft_adapters(_model(llama), tmp_path_factory.mktemp("causal"), TASKS, rank=4, alpha=8, **LORA)


# 1. Serving ranks ------------------------------------------------------------------------------


def test_vllm_rank_is_the_smallest_accepted_at_or_above_the_merge_and_below_a_cap():
    vllm = SERVING_RANKS["vllm"]
    assert [serving_rank(r, vllm) for r in (1, 2, 8, 12, 300, 321, 600)] == [1, 8, 8, 16, 320, 512, 512]
    assert serving_rank(12, vllm, cap=100) == 16 and serving_rank(200, vllm, cap=100) == 64
    assert parse_max_rank("vllm").resolve(12) == 16 and parse_max_rank("vllm:100").resolve(200) == 64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert parse_max_rank("16").resolve(600) == 16  # an accepted integer: silent
    with pytest.warns(UserWarning, match="--max-rank 12 is not a max_lora_rank vllm accepts .* max_lora_rank 16"):
        assert parse_max_rank(12).resolve(3) == 12
    for bad, message in (("0", "is not a rank"), ("vllm:x", "is not a rank"), ("tgi", "unknown serving engine 'tgi'")):
        with pytest.raises(InputError, match=message):
            parse_max_rank(bad)


def test_merge_max_rank_vllm_records_the_rank_and_each_modules_error(vit_adapters, tiny_vit, tmp_path):
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vit.state_dict().items()}, str(base))
    common = ["merge", "--base", base, "--adapters", *vit_adapters, "--method", "task_arithmetic", "--space", "core",
              "--store", tmp_path / "s"]
    exact = run(*common, "--max-rank", "vllm", "--out", tmp_path / "exact")  # merged rank 3 · 4 = 12 -> 16
    assert exact.exit_code == 0, exact.output
    record = json.loads((tmp_path / "exact" / "merge.json").read_text())
    assert (record["max_rank"], record["max_rank_rule"], record["serving"]) == (16, "vllm", {"engine": "vllm", "max_lora_rank": 16})
    assert record["rank_cap_error"] == {} and json.loads((tmp_path / "exact" / "adapter_config.json").read_text())["r"] == 12
    capped = run(*common, "--max-rank", "vllm:10", "--out", tmp_path / "capped")  # the largest accepted <= 10: 8
    assert capped.exit_code == 0, capped.output
    record = json.loads((tmp_path / "capped" / "merge.json").read_text())
    assert record["max_rank"] == 8 and len(record["rank_cap_error"]) == 4 and all(0 < e < 1 for e in record["rank_cap_error"].values())
    card = (tmp_path / "capped" / "README.md").read_text()
    assert "vllm serves it with `--max-lora-rank 8`" in card
    assert all(f"| {m} | {e:.3g} |" in card for m, e in record["rank_cap_error"].items())
    odd = run(*common, "--max-rank", "12", "--out", tmp_path / "odd")
    assert odd.exit_code == 0 and odd.stderr.count("warning: --max-rank 12 is not a max_lora_rank vllm accepts") == 1


def test_merge_help_documents_max_rank_vllm():
    text = " ".join(run("merge", "--help").stdout.replace("│", " ").split())
    assert "'vllm' (the smallest rank vLLM accepts" in text and "vllm: 1, 8, 16, 32, 64, 128, 256, 320, 512" in text


# 2. The model card -----------------------------------------------------------------------------


def _front_matter(card: str) -> tuple[dict, str]:
    _, front, body = card.split("---\n", 2)
    return yaml.safe_load(front), body


def test_the_card_is_the_records_and_names_every_hash(vit_adapters, tiny_vit, tmp_path):
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vit.state_dict().items()}, str(base))
    result = run("merge", "--base", base, "--adapters", *vit_adapters, "--method", "ties", "--space", "core", "--set", "density=0.3",
                 "--out", tmp_path / "out", "--store", tmp_path / "s")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "merge.json").read_text())
    card = (tmp_path / "out" / "README.md").read_text()
    assert card == model_card(record)  # generated from the record, nothing else
    front, body = _front_matter(card)
    assert front["library_name"] == "peft" and front["base_model"] == "base.safetensors"
    assert {"mergelab", "lora", "ties", "core-space"} <= set(front["tags"])
    taskset = load_taskset(base, vit_adapters)
    hashes = {t.name: t.content_hash for t in taskset}
    assert {t["name"]: t["content_hash"] for t in record["tasks"]} == hashes
    for name, digest in [("base", taskset.base.content_hash), *hashes.items()]:
        assert f"| {name} |" in body and f"`{digest}`" in body
    assert f"`{record['content_hash']}`" in body and "`density=0.3`" in body
    command = body.split("```bash\n", 1)[1].split("\n```", 1)[0]
    assert command.startswith("mergelab merge ") and "--set density=0.3" in command and "--space core" in command
    again = run(*shlex.split(command)[1:], "--out", tmp_path / "again")  # the command again, into a new folder
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "again" / "merge.json").read_text())["content_hash"] == record["content_hash"]


def test_a_card_shows_the_selection_and_scores_with_intervals():
    record = {"method": "ties", "space": "core", "format": "peft", "base": {"name": "vit", "path": "/m/vit", "content_hash": "b0"},
              "tasks": [{"name": "digits", "source": "/a/d", "content_hash": "h1"}], "hyper_parameters": {"density": 0.2},
              "content_hash": "r0", "selection": {"rule": "val", "chosen": "density=0.2", "ref": "studies/x/results",
                                                  "criterion": {"density=0.2": 0.91, "density=0.5": 0.88}},
              "scores": {"digits": {"val_norm_acc": 0.91, "acc": 0.8, "norm_acc": 0.9}},
              "intervals": {"zeroshot": [0.05, 0.12]}, "reproducibility": {"versions": {"mergelab": "9.9"}}}
    card = model_card(record)
    assert "Written by mergelab 9.9" in card and "Rule `val` chose `density=0.2`" in card
    assert "| density=0.2 | 0.9100 | selected |" in card and "| density=0.5 | 0.8800 |  |" in card
    assert "| digits | 91.0 | 80.0 | 90.0 |" in card and "[+5.0, +12.0] points" in card
    assert "## Rank" not in card and "## Reproduce" not in card  # nothing the record does not hold


# 3. Sharded weights ---------------------------------------------------------------------------


def test_parse_size_reads_hugging_face_units():
    assert [parse_size(v) for v in ("5GB", "500MiB", "0.5KB", 4096, "12 kb")] == [5 * 10**9, 500 * 2**20, 500, 4096, 12000]
    for bad in ("", "5XB", "-1GB", "GB", "0"):
        with pytest.raises(InputError, match="--shard-size .* is not a size"):
            parse_size(bad)


def test_weights_above_the_shard_size_are_shards_transformers_loads(llama, causal_adapters, tmp_path):
    common = ["merge", "--base", llama, "--adapters", *causal_adapters[:2], "--method", "task_arithmetic", "--format", "weights",
              "--store", tmp_path / "s"]
    assert run(*common, "--out", tmp_path / "one").exit_code == 0
    result = run(*common, "--shard-size", "20KB", "--out", tmp_path / "shards")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "one" / "model.safetensors.index.json").exists()
    index = json.loads((tmp_path / "shards" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / "shards" / s).stat().st_size < 21_000 for s in shards)  # 20 KB of tensors + header
    assert shards[0].startswith("model-00001-of-") and not (tmp_path / "shards" / "model.safetensors").exists()
    single, sharded = _model(tmp_path / "one").state_dict(), _model(tmp_path / "shards").state_dict()
    base = _model(llama).state_dict()
    assert single.keys() == sharded.keys() == base.keys()
    for name in single:
        torch.testing.assert_close(sharded[name], single[name], atol=0, rtol=0, msg=name)
    assert any(not torch.equal(single[n], base[n]) for n in base)  # the merge, not the base
    bad = run(*common, "--shard-size", "5XB", "--out", tmp_path / "bad")
    assert bad.exit_code == 2 and bad.stderr.startswith("error: --shard-size '5XB' is not a size") and not (tmp_path / "bad").exists()


# 4. Adapters a merge of B A would get wrong ------------------------------------------------------


def _edited(adapter: Path, dst: Path, **config) -> Path:
    import shutil

    shutil.copytree(adapter, dst)
    data = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**data, **config}))
    return dst


@pytest.mark.parametrize("feature, make, shown", [
    ("DoRA", lambda model, adapter, tmp: write_peft_adapters(model, tmp, ["dora"], rank=4, **{**LORA, "use_dora": True})[0], "use_dora=true"),
    ("lora_bias", lambda model, adapter, tmp: write_peft_adapters(model, tmp, ["bias"], rank=4, **{**LORA, "lora_bias": True})[0],
     "lora_bias=true"),
    ("a quantized base", lambda model, adapter, tmp: _edited(adapter, tmp / "loftq", loftq_config={"loftq_bits": 4}),
     "LoftQ initialisation"),
    ("a quantized base", lambda model, adapter, tmp: _edited(adapter, tmp / "qalora", use_qalora=True), "use_qalora=true"),
    ("a quantized base", lambda model, adapter, tmp: _edited(adapter, tmp / "bnb", base_model_name_or_path="org/llama-bnb-4bit"),
     "base_model_name_or_path 'org/llama-bnb-4bit'"),
], ids=["dora", "lora_bias", "loftq", "qalora", "bnb_4bit"])
def test_adapters_whose_update_is_not_B_A_are_refused_and_checked(feature, make, shown, llama, causal_adapters, tmp_path):
    odd = make(_model(llama), causal_adapters[0], tmp_path)
    expected = f"trained with {feature} ({shown}"
    with pytest.raises(InputError, match="merge_and_unload") as err:
        load_taskset(llama / "model.safetensors", [odd, causal_adapters[1]])
    assert expected in str(err.value)
    merged = run("merge", "--base", llama, "--adapters", odd, causal_adapters[1], "--method", "ties", "--out", tmp_path / "out",
                 "--store", tmp_path / "s")
    assert merged.exit_code == 2 and len(merged.stderr.strip().splitlines()) == 1 and expected in merged.stderr
    assert not (tmp_path / "out").exists() and "Traceback" not in merged.output
    checked = run("check", odd, causal_adapters[1], "--base", llama, "--json")
    assert checked.exit_code == 1
    problems = json.loads(checked.stdout)["problems"]
    assert len(problems) == 1 and problems[0].startswith(f"{odd.name}: {expected}")


# 5. Causal-LM adapters --------------------------------------------------------------------------


@pytest.mark.parametrize("space", ["full", "knots", "core"])
def test_causal_lm_adapters_merge_in_every_space_and_load_back_in_peft(space, llama, causal_adapters, tmp_path):
    base = _model(llama)
    taskset = load_taskset(llama, causal_adapters)
    assert {t.meta["adapter_config"]["task_type"] for t in taskset} == {"CAUSAL_LM"}
    ranks = {n: u.rank for n, u in taskset.tasks[0].modules.items()}
    assert {ranks["model.layers.0.self_attn.q_proj.weight"], ranks["model.layers.0.mlp.down_proj.weight"],
            ranks["model.layers.0.self_attn.k_proj.weight"]} == {2, 6, 4}
    merged = merge(taskset, "ties", space, density=0.5)
    merged, errors = cap_rank(merged, merged_rank(merged))  # a dense (full-space) result as an exact LoRA
    assert all(e < 1e-5 for e in errors.values())
    out = save_merged(merged, tmp_path / "out")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and set(config["target_modules"]) == set(LORA["target_modules"])
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(out))
    for name, update in merged.modules.items():  # the loaded adapter's ΔW is the merged one
        layer = peft_model.get_submodule("base_model.model." + name.removesuffix(".weight"))
        torch.testing.assert_close(layer.get_delta_weight("default"), update.dense(), atol=1e-6, rtol=1e-5, msg=name)
    state = peft_model.merge_and_unload().state_dict()
    for name, weight in merged.apply(base.state_dict()).items():
        torch.testing.assert_close(state[name], weight, atol=1e-6, rtol=1e-5, msg=name)


def test_inspect_and_check_show_causal_lm_adapters(llama, causal_adapters):
    shown = run("inspect", *causal_adapters, "--base", llama, "--json")
    assert shown.exit_code == 0, shown.output
    report = json.loads(shown.stdout)
    assert [s["task"] for s in report] == list(TASKS) and len(report[0]["modules"]) == 2 * 7
    assert {m["rank"] for m in report[0]["modules"]} == {2, 4, 6}
    checked = run("check", *causal_adapters, "--base", llama)
    assert checked.exit_code == 0 and "ready to merge" in checked.stdout and "(2 patterns)" in checked.stdout
