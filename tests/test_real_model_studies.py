"""Studies on real-model benches from local files, run in-process: ``open_clip`` (an architecture
+ a weights file), ``hf_clip`` (a ``CLIPModel`` directory with KnOTS-layout adapters on its
``CLIPVisionModel`` attention) and ``hf_seq_cls`` (a LLaMA sequence classifier whose task adapters
bring their own heads, text rows as data). Tiny random configs of the same architectures; nothing
downloads."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from mergelab.config import load_study
from mergelab.errors import InputError
from mergelab.store import Store
from mergelab.study import Run, local_submit, run_graph
from mergelab.synthetic import clip_directory, image_folders, llama_classifier, text_folders, write_peft_adapters

TASKS = ("shapes", "colours")
CLASSES = ("red", "green")
METHODS = [{"method": "task_arithmetic", "spaces": ["full", "core"], "grid": {"alpha": [0.3, 0.6]}},
           {"method": "ties", "spaces": ["knots"], "grid": {"density": [0.5], "alpha": [1.0]}}]


def _run(bench: dict, adapters: dict, data: dict, store, **settings) -> "xr.Dataset":  # noqa: F821
    spec = load_study({"name": "real", "bench": bench, "methods": METHODS, "seeds": [0], **settings,
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


def _tiny_open_clip(tmp_path):
    """A random open_clip model registered as ``test-tiny-clip`` and saved as ``weights.pt``."""
    import open_clip

    config = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "test-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "configs")
    torch.manual_seed(0)
    model = open_clip.create_model("test-tiny-clip")
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    return model


def test_an_open_clip_study_from_an_architecture_and_a_weights_file(tmp_path):
    model = _tiny_open_clip(tmp_path)
    paths = write_peft_adapters(copy.deepcopy(model.visual), tmp_path / "adapters", TASKS, target_modules=["c_fc", "c_proj"],
                                rank=2, alpha=4)
    bench = {"kind": "open_clip", "arch": "test-tiny-clip", "weights": str(tmp_path / "weights.pt")}
    data = image_folders(tmp_path / "data", TASKS, CLASSES)
    _check(_run(bench, dict(zip(TASKS, paths, strict=True)), data, tmp_path / "store"))
    # LoRAs on the stock packed attention (PEFT's MHA LoRA) land on the bench's split q/k/v/out projections
    packed = write_peft_adapters(copy.deepcopy(model.visual), tmp_path / "packed", TASKS, target_modules=["attn"], rank=2, alpha=4)
    _check(_run(bench, dict(zip(TASKS, packed, strict=True)), data, tmp_path / "store"))


def test_a_study_runs_its_encoder_in_the_dtype_it_names_and_keys_those_scores_apart(tmp_path):
    model = _tiny_open_clip(tmp_path)
    paths = write_peft_adapters(copy.deepcopy(model.visual), tmp_path / "adapters", TASKS, target_modules=["c_fc", "c_proj"],
                                rank=2, alpha=4)
    bench = {"kind": "open_clip", "arch": "test-tiny-clip", "weights": str(tmp_path / "weights.pt")}
    data, adapters = image_folders(tmp_path / "data", TASKS, CLASSES), dict(zip(TASKS, paths, strict=True))
    full, bf16 = (_run(bench, adapters, data, tmp_path / "store", dtype=dtype) for dtype in ("float32", "bfloat16"))
    tas = {"task": list(TASKS), "metric": "tas"}
    # bfloat16 autocast keeps ~3 significant digits: close to float32, not equal (so it did run in bf16)
    np.testing.assert_allclose(bf16["reference_score"].sel(**tas).values, full["reference_score"].sel(**tas).values, rtol=0.1, atol=1e-3)
    assert not np.array_equal(bf16["score"].sel(**tas).values, full["score"].sel(**tas).values, equal_nan=True)
    with pytest.raises(InputError, match="torch sees no CUDA device" if not torch.cuda.is_available() else "CUDA device"):
        Run(load_study({"name": "real", "bench": bench, "methods": METHODS, "device": "cuda:99",
                        "tasks": [{"name": t, "adapter": str(adapters[t]), "data": data[t]} for t in TASKS]}), str(tmp_path / "store"))


def _tiny_clip_directory(root):
    """A random ``CLIPModel`` directory whose tokenizer knows the class names and prompt words."""
    words = [w.strip(".").lower() for template in ("a photo of a {}.", "a picture of a {}.") for w in template.split()]
    return clip_directory(root, words=[*words, *CLASSES], projection_dim=16,
                          text={"vocab_size": 24, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                "num_attention_heads": 2, "max_position_embeddings": 16, "eos_token_id": 2},
                          vision={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                                  "image_size": 32, "patch_size": 8})


def test_an_hf_clip_study_from_a_clip_model_directory_with_knots_layout_adapters(tmp_path):
    import transformers

    clip = _tiny_clip_directory(tmp_path / "clip")
    vision = transformers.CLIPVisionModel(clip.config.vision_config)
    vision.load_state_dict(clip.vision_model.state_dict())  # transformers 5: CLIPVisionModel is the vision tower itself
    paths = write_peft_adapters(vision, tmp_path / "adapters", TASKS, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
                                rank=2, alpha=4)
    bench = {"kind": "hf_clip", "weights": str(tmp_path / "clip")}
    _check(_run(bench, dict(zip(TASKS, paths, strict=True)), image_folders(tmp_path / "data", TASKS, CLASSES), tmp_path / "store"))


def test_an_hf_clip_bench_names_what_its_directory_lacks(tmp_path):
    spec = load_study({"name": "real", "bench": {"kind": "hf_clip", "weights": str(tmp_path)}, "methods": METHODS,
                       "tasks": [{"name": "x", "adapter": str(tmp_path), "data": str(tmp_path)}]})
    with pytest.raises(InputError, match="hf_clip needs weights: a local CLIPModel directory"):
        Run(spec, str(tmp_path / "store")).bench


WORDS = ("good", "bad", "fine", "awful", "yes", "no", "maybe", "cat", "dog", "sun", "rain", "tree")
#: two text tasks with their own heads: a 3-way one with named labels (JSON lines), a 2-way one with index labels (CSV)
TEXT_TASKS = {"nli": ("entailment", "neutral", "contradiction"), "sentiment": None}


def _tiny_llama_classifier(root):
    """A random 2-label ``LlamaForSequenceClassification`` directory with a word-level tokenizer (pad id 0)."""
    llama_classifier(root, words=WORDS, vocab_size=len(WORDS) + 2, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, num_labels=2)


def _classifier(root, num_labels: int):
    import transformers

    return transformers.AutoModelForSequenceClassification.from_pretrained(str(root), num_labels=num_labels, ignore_mismatched_sizes=True,
                                                                           local_files_only=True).eval()


def _seq_cls_adapters(base_dir, out) -> dict[str, str]:
    """Per task a PEFT SEQ_CLS LoRA on q/v with random B and its own random ``score`` head."""
    return {task: str(write_peft_adapters(_classifier(base_dir, len(names or (0, 1))), out, [task], seed=i, rank=2, alpha=4,
                                          std=0.3, task_type="SEQ_CLS", target_modules=["q_proj", "v_proj"])[0])
            for i, (task, names) in enumerate(TEXT_TASKS.items())}


def test_an_hf_seq_cls_study_evaluates_each_task_with_its_own_head_and_saves_adapters_with_them(tmp_path):
    from peft import PeftModel

    from mergelab.checkpoints import load_taskset, save_merged, saved_modules, task_heads
    from mergelab.merging import merge
    from mergelab.preflight import check

    _tiny_llama_classifier(tmp_path / "llama")
    adapters = _seq_cls_adapters(tmp_path / "llama", tmp_path / "adapters")
    data = text_folders(tmp_path / "data", TEXT_TASKS, WORDS)
    tasks = [{"name": t, "adapter": adapters[t], "data": data[t], **({"classnames": list(n)} if n else {})} for t, n in TEXT_TASKS.items()]
    spec = load_study({"name": "nli", "bench": {"kind": "hf_seq_cls", "weights": str(tmp_path / "llama"), "max_length": 8},
                       "methods": METHODS, "tasks": tasks})
    assert spec.joint is False  # no shared label space across the tasks' own heads
    ctx = Run(spec, str(tmp_path / "store"))
    _, done = run_graph(ctx, local_submit(ctx))
    ds = Store(tmp_path / "store").get_dataset(done.key)
    acc = ds["score"].sel(task=list(TEXT_TASKS), metric="acc")
    ta = {"merge_method": "task_arithmetic", "config": ["alpha=0.3", "alpha=0.6"]}
    scores = acc.sel(space=["full", "core"], **ta)
    assert bool(scores.notnull().all()) and bool(((0 <= scores) & (scores <= 1)).all())
    np.testing.assert_allclose(acc.sel(space="full", **ta).values, acc.sel(space="core", **ta).values)

    # each fine-tuned reference is the PEFT model of that task (its LoRA and its head) on its test rows
    for task, names in TEXT_TASKS.items():
        peft_model = PeftModel.from_pretrained(_classifier(tmp_path / "llama", len(names or (0, 1))), adapters[task]).eval()
        ids, labels = ctx.bench.tasks[task].tensors("test")
        with torch.no_grad():
            expected = float((peft_model(input_ids=ids, attention_mask=(ids != 0).long()).logits.argmax(-1) == labels).float().mean())
        got = float(ds["reference_score"].sel(reference="finetuned", task=task, metric="acc"))
        assert got == pytest.approx(expected), task

    # the merge saves as one PEFT adapter per task: the merged LoRA plus that task's head
    assert check([f"{t}={adapters[t]}" for t in TEXT_TASKS], base=tmp_path / "llama").problems == []  # heads are not problems
    taskset = load_taskset(_classifier(tmp_path / "llama", 2), [f"{t}={adapters[t]}" for t in TEXT_TASKS])
    assert set(taskset.tasks[0].meta["saved_modules"]) == {"score.weight"} and "score.weight" not in taskset.tasks[0].modules
    merged = merge(taskset, "task_arithmetic", "core", alpha=0.5)
    out = save_merged(merged, tmp_path / "merged", heads=task_heads(taskset))
    ids = ctx.bench.tasks["nli"].tensors("test")[0]
    for task, names in TEXT_TASKS.items():
        base = _classifier(tmp_path / "llama", len(names or (0, 1)))
        state = {**merged.apply(base.state_dict()), **saved_modules(adapters[task])}
        with torch.no_grad():
            expected = torch.func.functional_call(base, state, (), {"input_ids": ids, "attention_mask": (ids != 0).long()}).logits
            loaded = PeftModel.from_pretrained(_classifier(tmp_path / "llama", len(names or (0, 1))), str(out / task)).eval()
            got = loaded(input_ids=ids, attention_mask=(ids != 0).long()).logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_an_hf_seq_cls_study_refuses_a_joint_task_and_adapters_without_heads(tmp_path):
    from peft import LoraConfig, get_peft_model

    bench = {"kind": "hf_seq_cls", "weights": str(tmp_path / "llama")}
    with pytest.raises(InputError, match="no joint label space"):
        load_study({"name": "nli", "bench": bench, "joint": True, "methods": METHODS, "tasks": [{"name": "x", "adapter": str(tmp_path)}]})
    _tiny_llama_classifier(tmp_path / "llama")
    headless = get_peft_model(_classifier(tmp_path / "llama", 2), LoraConfig(r=2, target_modules=["q_proj"]))
    headless.save_pretrained(str(tmp_path / "headless"))
    data = text_folders(tmp_path / "data", TEXT_TASKS, WORDS)
    spec = load_study({"name": "nli", "bench": bench, "methods": METHODS,
                       "tasks": [{"name": "sentiment", "adapter": str(tmp_path / "headless"), "data": data["sentiment"]}]})
    with pytest.raises(InputError, match="saves no score head"):
        Run(spec, str(tmp_path / "store")).bench


def test_text_tasks_read_csv_and_jsonl_rows_carve_val_and_name_what_is_wrong(tmp_path):
    from mergelab.data.text import text_task

    def tokenize(texts):
        return torch.tensor([[len(w) for w in t.split()][:4] + [0] * (4 - len(t.split()[:4])) for t in texts])

    root = tmp_path / "task"
    root.mkdir()
    (root / "train.csv").write_text("text,label\n" + "".join(f"w{'x' * i} y,{'pos' if i % 2 else 'neg'}\n" for i in range(10)))
    (root / "test.jsonl").write_text('{"text": "a bb", "label": "pos"}\n{"text": "ccc", "label": "neg"}\n')
    task = text_task(root, tokenize=tokenize)
    assert task.classnames == ("neg", "pos")  # sorted names when none are given
    val, train = task.split("val"), task.split("train")
    assert len(val) == 2 and len(train) == 8 and task.tensors("test")[0].tolist() == [[1, 2, 0, 0], [3, 0, 0, 0]]
    assert task.tensors("test")[1].tolist() == [1, 0]
    with pytest.raises(InputError, match="label 'pos' is neither a class index below 2 nor one of the class names"):
        text_task(root, tokenize=tokenize, classnames=["no", "yes"]).split("test")
    (root / "test.jsonl").unlink()
    with pytest.raises(InputError, match=r"needs test\.csv\|jsonl"):
        text_task(root, tokenize=tokenize)
