"""Studies on real-model benches from local files, run in-process: ``open_clip`` (an architecture
+ a weights file) and ``hf_clip`` (a ``CLIPModel`` directory with KnOTS-layout adapters on its
``CLIPVisionModel`` attention). Tiny random configs of the same architectures; nothing downloads."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mergelab.config import load_study
from mergelab.errors import InputError
from mergelab.store import Store
from mergelab.study import Run, local_submit, run_graph
from mergelab.synthetic import write_peft_adapters

TASKS = ("shapes", "colours")
CLASSES = ("red", "green")
METHODS = [{"method": "task_arithmetic", "spaces": ["full", "core"], "grid": {"alpha": [0.3, 0.6]}},
           {"method": "ties", "spaces": ["knots"], "grid": {"density": [0.5], "alpha": [1.0]}}]


def _image_folders(root, size: int = 32, per_class: int = 3) -> dict[str, str]:
    """ROOT/<task>/{train,val,test}/<class>/<i>.png: noise with the class's colour channel raised."""
    rng = np.random.default_rng(0)
    for task in TASKS:
        for split in ("train", "val", "test"):
            for c, name in enumerate(CLASSES):
                folder = root / task / split / name
                folder.mkdir(parents=True)
                for i in range(per_class):
                    pixels = rng.integers(0, 128, (size, size, 3), dtype=np.uint8)
                    pixels[..., c] = 255
                    Image.fromarray(pixels).save(folder / f"{i}.png")
    return {task: str(root / task) for task in TASKS}


def _run(bench: dict, adapters: dict, data: dict, store) -> "xr.Dataset":  # noqa: F821
    spec = load_study({"name": "real", "bench": bench, "methods": METHODS, "seeds": [0],
                       "tasks": [{"name": t, "adapter": str(adapters[t]), "data": data[t]} for t in TASKS]})
    ctx = Run(spec, str(store))
    _, done = run_graph(ctx, local_submit(ctx))
    return Store(store).get_dataset(done.key)


def _check(ds) -> None:
    assert list(ds.merge_method.values) == ["task_arithmetic", "ties"] and ds.attrs["tasks"] == list(TASKS)
    acc = ds["score"].sel(task=list(TASKS), metric="acc")
    ta = {"merge_method": "task_arithmetic", "config": ["alpha=0.3", "alpha=0.6"]}
    full = acc.sel(space="full", **ta)
    assert bool(full.notnull().all()) and bool(((0 <= full) & (full <= 1)).all())
    # Core space is lossless for task arithmetic (003 Eq. 11): the same scores as the full space
    np.testing.assert_allclose(full.values, acc.sel(space="core", **ta).values)
    assert bool(acc.sel(merge_method="ties", space="knots", config="alpha=1.0,density=0.5").notnull().all())
    assert bool(ds["reference_score"].sel(reference="zeroshot", task=list(TASKS), metric="acc").notnull().all())


def test_an_open_clip_study_from_an_architecture_and_a_weights_file(tmp_path):
    import open_clip

    config = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "test-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "configs")
    torch.manual_seed(0)
    model = open_clip.create_model("test-tiny-clip")
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    paths = write_peft_adapters(copy.deepcopy(model.visual), tmp_path / "adapters", TASKS, target_modules=["c_fc", "c_proj"],
                                rank=2, alpha=4)
    bench = {"kind": "open_clip", "arch": "test-tiny-clip", "weights": str(tmp_path / "weights.pt")}
    data = _image_folders(tmp_path / "data")
    _check(_run(bench, dict(zip(TASKS, paths, strict=True)), data, tmp_path / "store"))
    # LoRAs on the stock packed attention (PEFT's MHA LoRA) land on the bench's split q/k/v/out projections
    packed = write_peft_adapters(copy.deepcopy(model.visual), tmp_path / "packed", TASKS, target_modules=["attn"], rank=2, alpha=4)
    _check(_run(bench, dict(zip(TASKS, packed, strict=True)), data, tmp_path / "store"))


def _tiny_clip_directory(root):
    """A random ``CLIPModel`` saved with a word-level tokenizer (the real one's vocabulary would
    need a download), as ``save_pretrained`` lays a model directory out."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w.strip(".").lower() for template in ("a photo of a {}.", "a photo of the {}.") for w in template.split()}
                   | set(CLASSES) | {"{}"})
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    config = transformers.CLIPConfig(
        text_config={"vocab_size": len(vocab) + 8, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "eos_token_id": 2},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config)
    model.save_pretrained(root)
    fast.save_pretrained(root)
    return model


def test_an_hf_clip_study_from_a_clip_model_directory_with_knots_layout_adapters(tmp_path):
    import transformers

    clip = _tiny_clip_directory(tmp_path / "clip")
    vision = transformers.CLIPVisionModel(clip.config.vision_config)
    vision.load_state_dict(clip.vision_model.state_dict())  # transformers 5: CLIPVisionModel is the vision tower itself
    paths = write_peft_adapters(vision, tmp_path / "adapters", TASKS, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
                                rank=2, alpha=4)
    bench = {"kind": "hf_clip", "weights": str(tmp_path / "clip")}
    _check(_run(bench, dict(zip(TASKS, paths, strict=True)), _image_folders(tmp_path / "data"), tmp_path / "store"))


def test_an_hf_clip_bench_names_what_its_directory_lacks(tmp_path):
    spec = load_study({"name": "real", "bench": {"kind": "hf_clip", "weights": str(tmp_path)}, "methods": METHODS,
                       "tasks": [{"name": "x", "adapter": str(tmp_path), "data": str(tmp_path)}]})
    with pytest.raises(InputError, match="hf_clip needs weights: a local CLIPModel directory"):
        Run(spec, str(tmp_path / "store")).bench
