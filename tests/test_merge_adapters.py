"""`merge` on real PEFT adapters: every method in every space, and loadable PEFT output."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel

from mergelab.checkpoints import load_taskset, save_merged
from mergelab.merging import METHODS, collect_input_grams, merge
from mergelab.spaces import SPACES
from mergelab.synthetic import write_peft_adapters
from mergelab.taskset import Dense, LowRank

SPACE_NAMES = list(SPACES)


@pytest.fixture(scope="module")
def vit_taskset(tiny_vit, vit_adapters):
    return load_taskset(tiny_vit, vit_adapters)


@pytest.fixture(scope="module")
def vit_grams(vit_taskset):
    """Synthetic positive-definite input Gram matrices per task and module. (The tiny open_clip
    ViT's out_proj input cannot be hooked: nn.MultiheadAttention calls its weight directly.)"""
    g = torch.Generator().manual_seed(0)
    grams = {}
    for task in vit_taskset.names:
        grams[task] = {}
        for module, update in vit_taskset.tasks[0].modules.items():
            X = torch.randn(64, update.shape[1], generator=g)
            grams[task][module] = X.T @ X / 64
    return grams


@pytest.mark.parametrize("space", SPACE_NAMES)
@pytest.mark.parametrize("method", [*METHODS, "tsv+iso_c", "ties+iso_c"])
def test_every_method_runs_in_every_space_on_peft_adapters(vit_taskset, vit_grams, method, space):
    side = {"grams": vit_grams} if method == "regmean" else None
    merged = merge(vit_taskset, method, space, side_inputs=side)
    assert list(merged.modules) == list(vit_taskset.module_names)
    for name, update in merged.modules.items():
        assert update.shape == vit_taskset.tasks[0].modules[name].shape
        assert bool(torch.isfinite(update.dense()).all()) and update.norm() > 0
        fills_null_space = space == "knots" and any(stage.frame for _, stage in METHODS[method].stages)  # 003's code
        if (space != "full" and not fills_null_space) or METHODS[method].inputs == "factors" or method == "svd":
            assert isinstance(update, LowRank)
        else:
            assert isinstance(update, Dense)
    assert merged.meta["method"] == method and merged.meta["space"] == space
    assert merged.meta["tasks"] == list(vit_taskset.names) and merged.meta["peft"]["adapter_config"]["r"] == 4


def _peft_state(model, adapter_dir):
    return PeftModel.from_pretrained(copy.deepcopy(model), str(adapter_dir)).merge_and_unload().state_dict()


@pytest.mark.parametrize(("method", "space", "hp"), [
    ("ties", "core", {"density": 0.3}),
    ("tsv+iso_c", "core", {"alpha": 0.8}),
    ("dare_ties", "knots", {"p": 0.2}),
    ("svd", "full", {"alpha": 0.5}),
])
def test_low_rank_merge_is_written_as_a_peft_adapter_that_reproduces_it(tiny_vit, vit_taskset, tmp_path, method, space, hp):
    merged = merge(vit_taskset, method, space, **hp)
    out = save_merged(merged, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    ranks = {u.rank for u in merged.modules.values()}
    assert config["r"] == max(ranks) and config["lora_alpha"] == config["r"]
    info = json.loads((out / "merge.json").read_text())
    assert (info["method"], info["space"], info["tasks"]) == (method, space, ["digits", "textures", "signs"])
    expected = merged.apply(tiny_vit.state_dict())
    loaded = _peft_state(tiny_vit, out)
    assert loaded.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(loaded[key], expected[key], atol=1e-5, rtol=1e-5, msg=key)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny_vit), str(out)).eval()
    plain = copy.deepcopy(tiny_vit).eval()
    plain.load_state_dict(expected)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), plain(x), atol=1e-5, rtol=1e-4)


def test_regmean_with_grams_collected_by_hooks_on_an_hf_clip(hf_clip_vision, tmp_path):
    """Calibration batches per task -> forward hooks -> RegMean in core space -> PEFT adapter."""
    targets = ["q_proj", "k_proj", "v_proj", "out_proj"]
    paths = write_peft_adapters(hf_clip_vision, tmp_path / "ad", ["a", "b"], target_modules=targets, rank=2, alpha=4)
    taskset = load_taskset(hf_clip_vision, paths)
    grams = {}
    for i, task in enumerate(taskset.names):
        tuned = PeftModel.from_pretrained(copy.deepcopy(hf_clip_vision), str(paths[i])).merge_and_unload().eval()
        g = torch.Generator().manual_seed(i)
        batches = [torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)]
        grams[task] = collect_input_grams(tuned, lambda b, m=tuned: m(pixel_values=b), batches, taskset.module_names)
    merged = merge(taskset, "regmean", "core", side_inputs={"grams": grams})
    full = merge(taskset, "regmean", "full", side_inputs={"grams": grams})
    for module in taskset.module_names:
        assert isinstance(merged.modules[module], LowRank) and merged.modules[module].rank <= 4
        assert merged.modules[module].norm() > 0 and full.modules[module].norm() > 0
    expected = merged.apply(hf_clip_vision.state_dict())
    loaded = _peft_state(hf_clip_vision, save_merged(merged, tmp_path / "merged"))
    for key in expected:
        torch.testing.assert_close(loaded[key], expected[key], atol=1e-5, rtol=1e-5, msg=key)
