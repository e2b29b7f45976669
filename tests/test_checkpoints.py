"""PEFT adapters and full checkpoints in, merged weights / PEFT adapters out, exactly."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import save_file

from mergelab.checkpoints import cap_rank, load_taskset, mha_out_proj_factor, peft_template, save_merged
from mergelab.errors import InputError
from mergelab.synthetic import write_peft_adapters
from mergelab.taskset import Dense, LowRank, MergedUpdate


def _peft_merged_state(model, adapter_dir) -> dict[str, torch.Tensor]:
    return PeftModel.from_pretrained(copy.deepcopy(model), str(adapter_dir)).merge_and_unload().state_dict()


def _one_task_merge(taskset) -> MergedUpdate:
    task = taskset.tasks[0]
    return MergedUpdate(task.modules, taskset.base, {"peft": peft_template(taskset), "method": "identity"})


def _assert_state_close(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)


def test_open_clip_adapter_round_trip_through_save_merged(tiny_vit, vit_adapters, tmp_path):
    """PEFT (packed MHA) -> load_taskset -> save_merged -> PeftModel.from_pretrained: same weights."""
    taskset = load_taskset(tiny_vit, vit_adapters[:1])
    expected = _peft_merged_state(tiny_vit, vit_adapters[0])
    merged = _one_task_merge(taskset)
    _assert_state_close(merged.apply(tiny_vit.state_dict()), expected)  # our reading == PEFT's forward
    out = save_merged(merged, tmp_path / "merged")
    _assert_state_close(_peft_merged_state(tiny_vit, out), expected)
    weights = save_merged(merged, tmp_path / "weights", format="weights", base=tiny_vit)
    from safetensors.torch import load_file

    _assert_state_close(load_file(str(weights / "model.safetensors")), expected)


def test_packed_attention_loras_split_exactly_onto_a_split_attention_base(tiny_vit, vit_adapters, tmp_path):
    """PEFT's MHA LoRA (packed in_proj + out_proj) on a base whose attention was split into q/k/v/out
    (the open_clip bench): the q/k/v updates are the packed update's rows, the split model computes
    what the PEFT model computes, and a merge on the split base saves as a packed adapter for the stock model."""
    from mergelab.model import split_attention

    split = split_attention(copy.deepcopy(tiny_vit)).eval()
    packed, views = load_taskset(tiny_vit, vit_adapters), load_taskset(split, vit_adapters)
    block = "transformer.resblocks.0.attn"
    assert {f"{block}.{k}_proj.weight" for k in ("q", "k", "v", "out")} <= set(views.module_names)
    for task_p, task_v in zip(packed.tasks, views.tasks, strict=True):
        rows = torch.cat([task_v.modules[f"{block}.{k}_proj.weight"].dense() for k in "qkv"])
        torch.testing.assert_close(rows, task_p.modules[f"{block}.in_proj_weight"].dense(), atol=0, rtol=0)
        torch.testing.assert_close(task_v.modules[f"{block}.out_proj.weight"].dense(), task_p.modules[f"{block}.out_proj.weight"].dense())
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    model = copy.deepcopy(split)
    model.load_state_dict(_one_task_merge(views).apply(split.state_dict()))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny_vit), str(vit_adapters[0])).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), peft_model(x), atol=1e-5, rtol=1e-4)
    # a merge of the three tasks on the split base (the views no longer share A) written back as one packed LoRA
    summed = MergedUpdate({n: LowRank(torch.cat([u.B for u in views.updates(n)], 1), torch.cat([u.A for u in views.updates(n)]))
                           for n in views.module_names}, views.base, {"peft": peft_template(views)})
    out = save_merged(summed, tmp_path / "merged")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 3 * 3 * 4  # q, k and v blocks of the three tasks' rank-4 factors
    expected = {n: tiny_vit.state_dict()[n] + sum(u.dense() for u in packed.updates(n)) for n in packed.module_names}
    reloaded = _peft_merged_state(tiny_vit, out)
    for name, weight in expected.items():
        torch.testing.assert_close(reloaded[name], weight, atol=1e-5, rtol=1e-5, msg=name)
    with pytest.raises(InputError, match="modules filter keeps none"):
        load_taskset(split, vit_adapters[:1], modules=[r".*in_proj_weight"])  # the split base has no packed parameter
    assert set(load_taskset(split, vit_adapters[:1], modules=[r".*\.q_proj\.weight"]).module_names) == {
        n for n in views.module_names if n.endswith("q_proj.weight")}


def test_hf_clip_adapter_round_trip_with_rslora_and_patterns(hf_clip_vision, tmp_path):
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"], use_rslora=True)
    [path] = write_peft_adapters(hf_clip_vision, tmp_path, ["a"], target_modules=config.target_modules, rank=4, alpha=16, use_rslora=True)
    taskset = load_taskset(hf_clip_vision, [path])
    assert {m["scaling"] for m in taskset.tasks[0].meta["modules"].values()} == {16 / 2}
    expected = _peft_merged_state(hf_clip_vision, path)
    out = save_merged(_one_task_merge(taskset), tmp_path / "merged")
    _assert_state_close(_peft_merged_state(hf_clip_vision, out), expected)

    [patterned] = write_peft_adapters(hf_clip_vision, tmp_path, ["b"], target_modules=["q_proj", "v_proj"], rank=4, alpha=8,
                                      rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 6})
    task = load_taskset(hf_clip_vision, [patterned]).tasks[0]
    v = task.meta["modules"]["encoder.layers.0.self_attn.v_proj.weight"]
    q = task.meta["modules"]["encoder.layers.0.self_attn.q_proj.weight"]
    assert (v["rank"], v["alpha"], v["scaling"]) == (2, 6.0, 3.0) and (q["rank"], q["scaling"]) == (4, 2.0)
    _assert_state_close(_one_task_merge(load_taskset(hf_clip_vision, [patterned])).apply(hf_clip_vision.state_dict()),
                        _peft_merged_state(hf_clip_vision, patterned))


def test_fan_in_fan_out_and_embedding_loras_are_transposed_into_parameter_orientation(tmp_path):
    import transformers

    torch.manual_seed(0)
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=16,
                                                          bos_token_id=0, eos_token_id=0))
    [path] = write_peft_adapters(gpt2, tmp_path, ["g"], target_modules=["c_attn", "wte"], rank=4, alpha=8, fan_in_fan_out=True)
    taskset = load_taskset(gpt2, [path])
    assert taskset.tasks[0].modules["wte.weight"].shape == (50, 32)
    expected = _peft_merged_state(gpt2, path)
    merged = _one_task_merge(taskset)
    _assert_state_close(merged.apply(gpt2.state_dict()), expected)
    _assert_state_close(_peft_merged_state(gpt2, save_merged(merged, tmp_path / "m")), expected)


def test_heterogeneous_ranks_and_low_rank_merge_rank_in_adapter(tiny_vit, tmp_path):
    paths = write_peft_adapters(tiny_vit, tmp_path / "r2", ["a"], target_modules=["attn"], rank=2, alpha=2)
    paths += write_peft_adapters(tiny_vit, tmp_path / "r6", ["b"], target_modules=["attn"], rank=6, alpha=12, seed=1)
    taskset = load_taskset(tiny_vit, paths)
    assert [u.rank for u in taskset.updates("transformer.resblocks.0.attn.in_proj_weight")] == [2, 6]
    # "cat" merge (exact sum of both): rank 8 adapter that PEFT loads and reproduces.
    modules = {m: LowRank(torch.cat([u.B for u in us], 1), torch.cat([u.A for u in us], 0))
               for m in taskset.module_names for us in [taskset.updates(m)]}
    merged = MergedUpdate(modules, taskset.base, {"peft": peft_template(taskset)})
    out = save_merged(merged, tmp_path / "cat")
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    _assert_state_close(_peft_merged_state(tiny_vit, out), merged.apply(tiny_vit.state_dict()), atol=1e-5)


def test_a_rank_cap_keeps_the_best_approximation_and_reloads_exactly_with_a_rank_pattern(tiny_vit, tmp_path):
    """--max-rank: Eckart–Young per module (the top singular triplets of ΔW), modules within the cap
    untouched; the heterogeneous result is written with rank_pattern and PEFT reproduces it."""
    paths = write_peft_adapters(tiny_vit, tmp_path / "r2", ["a"], target_modules=["c_fc", "c_proj"], rank=2, alpha=2)
    paths += write_peft_adapters(tiny_vit, tmp_path / "r6", ["b"], target_modules=["c_fc", "c_proj"], rank=6, alpha=12, seed=1)
    taskset = load_taskset(tiny_vit, paths)
    modules = {m: (us[0] if m.endswith("c_proj.weight") else LowRank(torch.cat([u.B for u in us], 1), torch.cat([u.A for u in us], 0)))
               for m in taskset.module_names for us in [taskset.updates(m)]}
    merged = MergedUpdate(modules, taskset.base, {"peft": peft_template(taskset)})
    capped, errors = cap_rank(merged, 3)
    assert sorted(errors) == sorted(m for m in modules if not m.endswith("c_proj.weight"))
    for name, update in modules.items():
        if name not in errors:
            assert capped.modules[name] is update
            continue
        U, s, Vh = torch.linalg.svd(update.dense(torch.float64))
        best = (U[:, :3] * s[:3]) @ Vh[:3]
        assert capped.modules[name].rank == 3
        torch.testing.assert_close(capped.modules[name].dense(torch.float64), best, atol=1e-5, rtol=1e-5)
        assert errors[name] == pytest.approx(float(s[3:].square().sum().sqrt() / s.square().sum().sqrt()), rel=1e-6)
    out = save_merged(capped, tmp_path / "capped")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 3 and set(config["rank_pattern"].values()) == {2}
    assert json.loads((out / "merge.json").read_text())["rank_cap_error"] == pytest.approx(errors)
    _assert_state_close(_peft_merged_state(tiny_vit, out), capped.apply(tiny_vit.state_dict()), atol=1e-5)
    dense = torch.randn(6, 5, dtype=torch.float64)
    [(name, low)] = cap_rank(MergedUpdate({"w": Dense(dense)}), 2)[0].modules.items()
    U, s, Vh = torch.linalg.svd(dense)
    assert isinstance(low, LowRank) and low.rank == 2  # a dense merge (TIES in full space) becomes a rank-2 LoRA
    torch.testing.assert_close(low.dense(), (U[:, :2] * s[:2]) @ Vh[:2])
    with pytest.raises(InputError, match="give an integer >= 1"):
        cap_rank(merged, 0)


def test_full_checkpoint_loads_as_dense_deltas(tiny_vit, tmp_path):
    base = tiny_vit.state_dict()
    tuned = {k: v + 0.01 if v.is_floating_point() else v for k, v in base.items()}
    save_file({k: v.contiguous() for k, v in tuned.items()}, str(tmp_path / "ft.safetensors"))
    save_file({k: v.contiguous() for k, v in base.items()}, str(tmp_path / "base.safetensors"))
    taskset = load_taskset(tmp_path / "base.safetensors", [f"ft={tmp_path / 'ft.safetensors'}"], modules=[r".*attn.*"])
    task = taskset["ft"]
    assert all(isinstance(u, Dense) for u in task.modules.values()) and all("attn" in m for m in task.modules)
    torch.testing.assert_close(task.modules["transformer.resblocks.0.attn.in_proj_weight"].delta,
                               torch.full_like(base["transformer.resblocks.0.attn.in_proj_weight"], 0.01), atol=1e-6, rtol=0)
    assert taskset.base.path.endswith("base.safetensors") and len(taskset.base.content_hash) == 64


def test_adapter_for_a_submodule_resolves_its_prefix_in_the_whole_model(tmp_path):
    import open_clip

    torch.manual_seed(0)
    clip = open_clip.CLIP(embed_dim=32, vision_cfg={"image_size": 16, "layers": 2, "width": 32, "patch_size": 4, "head_width": 16},
                          text_cfg={"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1})
    [path] = write_peft_adapters(clip.visual, tmp_path, ["v"], target_modules=["attn"])
    names = load_taskset(clip, [path]).module_names
    assert all(n.startswith("visual.transformer.") for n in names)


def test_a_tower_adapter_on_a_whole_clip_whose_towers_share_block_names(tmp_path):
    """ViT-B/32's text tower has as many blocks as its image tower, under the same names at the
    root: the adapter's recorded base class (PEFT's auto_mapping) or --base-module decides."""
    import open_clip

    torch.manual_seed(0)
    clip = open_clip.CLIP(embed_dim=32, vision_cfg={"image_size": 16, "layers": 2, "width": 32, "patch_size": 4, "head_width": 16},
                          text_cfg={"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 2})
    [path] = write_peft_adapters(clip.visual, tmp_path, ["v"], target_modules=["attn"])
    tower = load_taskset(clip.visual, [path])
    whole = load_taskset(clip, [path])
    assert list(whole.module_names) == [f"visual.{n}" for n in tower.module_names]
    for name in tower.module_names:
        torch.testing.assert_close(whole.tasks[0].modules[f"visual.{name}"].dense(), tower.tasks[0].modules[name].dense())
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["auto_mapping"]["base_model_class"] == "VisionTransformer"
    (path / "adapter_config.json").write_text(json.dumps({**config, "auto_mapping": None}))
    with pytest.raises(InputError, match=r"several sub-modules \('\.', 'visual'\); name the one it was trained on with --base-module"):
        load_taskset(clip, [path])
    assert load_taskset(clip, [path], base_module="visual").module_names == whole.module_names
    assert load_taskset(clip, [path], base_module=".").module_names == tower.module_names  # the text tower: what was asked
    with pytest.raises(InputError, match="--base-module 'text': the base holds no module of adapter .* there; it does under '.', 'visual'"):
        load_taskset(clip, [path], base_module="text")


def test_a_clip_vision_adapter_on_a_whole_hf_clip_model_whose_towers_are_equally_deep(tmp_path):
    """A transformers CLIPModel holds ``vision_model`` and ``text_model`` with the same layer names (ViT-B/32:
    12 layers each): an adapter trained on ``CLIPVisionModel`` (the KnOTS checkpoints) lands on ``vision_model``."""
    import transformers

    layers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    torch.manual_seed(0)
    clip = transformers.CLIPModel(transformers.CLIPConfig(text_config={"vocab_size": 40, **layers},
                                                          vision_config={"image_size": 32, "patch_size": 8, **layers}, projection_dim=16))
    vision = transformers.CLIPVisionModel(clip.config.vision_config)
    vision.load_state_dict(clip.vision_model.state_dict())
    [path] = write_peft_adapters(vision, tmp_path, ["v"], target_modules=["q_proj", "v_proj"])
    assert json.loads((path / "adapter_config.json").read_text())["auto_mapping"]["base_model_class"] == "CLIPVisionModel"
    names = load_taskset(clip, [path]).module_names
    assert names and all(n.startswith("vision_model.encoder.layers.") for n in names)


def test_save_merged_refuses_dense_modules_as_peft_and_existing_outputs(tmp_path, tiny_vit, vit_adapters):
    merged = MergedUpdate({"transformer.resblocks.0.attn.out_proj.weight": Dense(torch.zeros(32, 32))})
    with pytest.raises(InputError, match="format='weights'"):
        save_merged(merged, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    out = save_merged(_one_task_merge(load_taskset(tiny_vit, vit_adapters[:1])), tmp_path / "y")
    with pytest.raises(InputError, match="already exists"):
        save_merged(_one_task_merge(load_taskset(tiny_vit, vit_adapters[:1])), out)
    assert not list(tmp_path.glob(".y.*"))  # no temporary leftovers


def test_loaded_update_reproduces_the_peft_forward_pass(tiny_vit, vit_adapters):
    """What PEFT computes in forward (incl. its MHA out_proj double application, peft PR #3774) is
    what mergelab loads: base weights + loaded update give the PEFT model's outputs."""
    assert mha_out_proj_factor() in (1.0, 2.0)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny_vit), str(vit_adapters[1])).eval()
    merged = _one_task_merge(load_taskset(tiny_vit, vit_adapters[1:2]))
    plain = copy.deepcopy(tiny_vit).eval()
    plain.load_state_dict(merged.apply(tiny_vit.state_dict()))
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain(x), peft_model(x), atol=1e-5, rtol=1e-4)


def test_overwrite_swaps_the_output_in_one_step_and_a_failed_write_keeps_the_old_one(tiny_vit, vit_adapters, tmp_path, monkeypatch):
    import mergelab.checkpoints.writing as checkpoints

    merged = _one_task_merge(load_taskset(tiny_vit, vit_adapters[:1]))
    out = save_merged(merged, tmp_path / "out")
    (out / "old-marker").write_text("")
    save_merged(merged, out, overwrite=True)
    assert not (out / "old-marker").exists() and (out / "adapter_config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or backup left beside it

    (out / "old-marker").write_text("")
    monkeypatch.setattr(checkpoints, "_adapter_tensors", lambda *a: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError, match="disk full"):
        save_merged(merged, out, overwrite=True)
    assert (out / "old-marker").exists() and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_exchange_without_renameat2_falls_back_to_renames(tmp_path, monkeypatch):
    import ctypes

    import mergelab.checkpoints.writing as checkpoints

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "new").write_text("")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "old").write_text("")
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: (_ for _ in ()).throw(OSError("no libc")))
    checkpoints._exchange(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b" / "new").exists() and (tmp_path / "a" / "old").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_training_only_config_fields_do_not_change_the_task_hash(tiny_vit, vit_adapters, tmp_path):
    import json
    import shutil

    changed = tmp_path / "changed"
    shutil.copytree(vit_adapters[0], changed)
    config = json.loads((changed / "adapter_config.json").read_text())
    (changed / "adapter_config.json").write_text(json.dumps({**config, "lora_dropout": 0.3, "init_lora_weights": "gaussian"}))
    same, other = load_taskset(tiny_vit, [vit_adapters[0], changed]).tasks
    assert same.content_hash == other.content_hash
    (changed / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": config["lora_alpha"] * 2}))
    assert load_taskset(tiny_vit, [changed]).tasks[0].content_hash != same.content_hash
