"""The paper recipes of ``studies/papers/real/``: the ViT-B/32 eight-task study (001 Tab. 1, 003 Tab. 3) on
``open_clip`` and ``hf_clip`` and the LLaMA-3-8B NLI study (003 Tab. 2) on ``hf_seq_cls``. Each passes
``mergelab check --study`` once its ``/path/to/`` placeholders point at tiny random stand-ins of the same
layout (a model, one PEFT adapter per task, data folders with each task's real number of classes), and
its bench loads from them; its grids and schedules are the papers'. Nothing runs a study."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mergelab.bench import load_bench
from mergelab_app.cli import app
from mergelab.config import load_study
from mergelab.errors import InputError
from mergelab.preflight import check_study
from mergelab.synthetic import clip_directory, image_folders, llama_classifier, text_folders, write_peft_adapters

REAL = Path(__file__).resolve().parents[1] / "studies" / "papers" / "real"
#: The eight tasks of 001 Tab. 1 / 003 Tab. 3 and their numbers of classes.
VISION = {"cars": 196, "dtd": 47, "eurosat": 10, "gtsrb": 43, "mnist": 10, "resisc45": 45, "sun397": 397, "svhn": 10}
NLI = ("snli", "mnli", "sick", "qnli", "rte", "scitail")
ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _steps(start: float, stop: float, step: float = 0.1) -> list[float]:
    return [round(start + i * step, 4) for i in range(int(round((stop - start) / step)) + 1)]


def _recipe(tmp_path: Path, name: str, **replace: str) -> Path:
    """The recipe copied with its folder (its class-name and template files) into ``tmp_path``, every
    ``/path/to/`` placeholder pointing under ``tmp_path`` and ``replace``'s other edits made."""
    shutil.copytree(REAL, tmp_path / "real")
    path = tmp_path / "real" / name
    text = path.read_text().replace("/path/to/", f"{tmp_path}/")
    for old, new in replace.items():
        text = text.replace(old, new)
    path.write_text(text)
    return path


def _image_data(root: Path) -> None:
    """Per task an ImageFolder with the task's real number of classes, folders named by zero-padded
    class index (sorting in the class-name files' order), one tiny image per class and split."""
    for i, (task, n) in enumerate(VISION.items()):
        image_folders(root, [task], [f"{c:03d}" for c in range(n)], size=8, per_class=1, seed=i)


def _passes(path: Path):
    """``mergelab check --study`` reports no problem, and the bench loads from the stand-ins."""
    result = CliRunner().invoke(app, ["check", "--study", str(path)], env={"COLUMNS": "160"})
    assert result.exit_code == 0 and "ready to merge" in result.stdout, result.output
    spec = load_study(path)
    assert check_study(spec).problems == []
    bench = load_bench(spec.bench, spec.evaluated)
    assert list(bench.tasks) == [t.name for t in spec.tasks]
    return spec, bench


def test_the_recipes_refuse_their_placeholders_until_they_are_replaced():
    for path in sorted(REAL.glob("*.yaml")):
        spec = load_study(path)
        with pytest.raises(InputError, match=r"do not exist \(bench\.weights /path/to/.*replace the placeholders"):
            check_study(spec)
    assert {p.name for p in REAL.glob("*.yaml")} == {"vitb32-open_clip.yaml", "vitb32-hf_clip.yaml", "llama3-8b-nli.yaml"}
    # none is a companion study of the micro benchmark: `make papers` and the shared-store tests glob studies/papers/*.yaml
    assert not any(p.name.startswith("vitb32") or p.name.startswith("llama") for p in REAL.parent.glob("*.yaml"))


def test_class_names_and_templates_read_from_files_load_as_their_lines(tmp_path):
    (tmp_path / "names.txt").write_text("cat\n\n  dog  \n")
    study = {"name": "files", "bench": {"kind": "hf_clip", "weights": str(tmp_path)}, "methods": [{"method": "task_arithmetic"}]}
    task = {"name": "pets", "adapter": str(tmp_path), "data": str(tmp_path), "classnames": str(tmp_path / "names.txt")}
    assert load_study({**study, "tasks": [task]}).tasks[0].classnames == ["cat", "dog"]
    path = tmp_path / "study.yaml"  # in a study file, relative to the file
    path.write_text(yaml.safe_dump({**study, "tasks": [{**task, "classnames": "names.txt", "templates": "names.txt"}]}))
    assert load_study(path).tasks[0].templates == ["cat", "dog"]
    (tmp_path / "empty.txt").write_text("\n")
    for name, message in (("nowhere.txt", "is not a file"), ("empty.txt", "holds 0 entries")):
        with pytest.raises(InputError, match=rf"tasks\[0\]\.classnames: classnames: .*{name} {message}"):
            load_study({**study, "tasks": [{**task, "classnames": str(tmp_path / name)}]})


def test_the_vision_recipes_carry_the_papers_tasks_grids_and_schedules():
    specs = [load_study(REAL / f"vitb32-{kind}.yaml") for kind in ("open_clip", "hf_clip")]
    assert [s.bench.kind for s in specs] == ["open_clip", "hf_clip"] and specs[0].bench.arch == "ViT-B-32"
    dump = [s.model_dump(exclude={"name", "description", "bench"}) for s in specs]
    assert dump[0] == dump[1]  # the two variants differ in their bench only
    spec = specs[0]
    assert [t.name for t in spec.tasks] == list(VISION) and [len(t.classnames) for t in spec.tasks] == list(VISION.values())
    tasks = {t.name: t for t in spec.tasks}
    assert tasks["eurosat"].classnames[:2] == ["annual crop land", "forest"] and tasks["svhn"].classnames == [str(d) for d in range(10)]
    assert tasks["mnist"].templates == ['a photo of the number: "{}".'] and len(tasks["resisc45"].templates) == 18
    assert all("{}" in t for task in spec.tasks for t in task.templates)
    assert spec.selection == "val" and spec.joint and spec.device == "cuda"
    methods = {m.method: m for m in spec.methods}
    assert methods["task_arithmetic"].grid == {"alpha": _steps(0.1, 1.0)}  # 001 App. C.3
    assert methods["ties"].spaces == ["full", "knots", "core"] and methods["ties"].grid["density"] == _steps(0.1, 0.9)
    configs = {m.method: m.configs() for m in spec.methods}
    # 003 Tab. 7's ViT-B/32 Core-space optima lie in the grids
    assert {"alpha": 0.6, "density": 0.1} in configs["ties"]
    assert {"alpha": 0.6, "density": 0.1, "p": 0.1} in configs["dare_ties"]
    assert {"alpha": 0.2} in configs["tsv"] and {"alpha": 0.9} in configs["iso_c"]
    assert {"alpha": 0.4, "rank_ratio": 0.32, "lam": 5.8} in configs["cart"]
    assert {"ties.density": 0.3, "iso_c.alpha": 2.0} in configs["ties+iso_c"]
    assert {"dare_ties.p": 0.1, "dare_ties.density": 0.3, "iso_c.alpha": 2.0} in configs["dare_ties+iso_c"]
    assert {"iso_c.alpha": 0.9} in configs["tsv+iso_c"]
    assert {"cart.rank_ratio": 0.04, "cart.lam": 2.6, "iso_c.alpha": 0.7} in configs["cart+iso_c"]
    assert methods["lora_lego"].grid["k"] == [8, 16, 32, 64, 128]  # 001 App. C.3
    adaptive = {a.name: a for a in spec.adaptive}
    # 001 Tab. 1: AdaMerging and TARA A / B after 250 and 500 iterations at lr 1e-3 (TARA: AdamW, phi 0.4; AdaMerging: lambda 0.3)
    for method, init in (("adamerging", 0.3), ("tara_a", 0.4), ("tara_b", 0.4)):
        assert [(adaptive[f"{method}_{n}"].iters, adaptive[f"{method}_{n}"].lr, adaptive[f"{method}_{n}"].hp["init"])
                for n in (250, 500)] == [(250, 1e-3, init), (500, 1e-3, init)]
    assert all(a.batch_size == 16 for a in spec.adaptive)
    # 002 App. A: TA origin at lambda 0.3; CART origin over lambda 0.1 ... 3.0 and the top 8 / 12 / 16 / 32 %; temperature 10
    assert adaptive["adarank_ta"].hp == {"origin": "ta", "lam": 0.3, "temperature": 10.0}
    assert adaptive["adarank_cart"].start_grid == {"lam": _steps(0.1, 3.0), "rank_ratio": [0.08, 0.12, 0.16, 0.32]}


def test_the_nli_recipe_carries_003_tab2s_tasks_and_grids():
    spec = load_study(REAL / "llama3-8b-nli.yaml")
    assert spec.bench.kind == "hf_seq_cls" and not spec.joint and [t.name for t in spec.tasks] == list(NLI)
    assert all(len(t.classnames) == 3 for t in spec.tasks)  # 001 App. C.2: a three-way head per task
    # 003 App. D.2: no CART and no +Iso-C rows on the language tasks
    assert [m.method for m in spec.methods] == ["task_arithmetic", "ties", "dare_ties", "tsv", "iso_c"]
    configs = {m.method: m.configs() for m in spec.methods}
    # 003 Tab. 7's Llama 3 8B Core-space optima lie in the grids
    assert {"alpha": 1.1, "density": 0.8} in configs["ties"] and {"alpha": 1.1, "density": 0.8, "p": 0.1} in configs["dare_ties"]
    assert {"alpha": 0.5} in configs["tsv"] and {"alpha": 2.8} in configs["iso_c"]


def test_the_open_clip_recipe_passes_check_on_tiny_stand_ins(tmp_path):
    import open_clip
    import torch

    config = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "test-recipe-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "configs")
    torch.manual_seed(0)
    model = open_clip.create_model("test-recipe-clip")
    (tmp_path / "open_clip").mkdir()
    torch.save(model.state_dict(), tmp_path / "open_clip" / "ViT-B-32.pt")
    # LoRA on the stock packed attention (q, k, v and out of every block, 001 App. C.2)
    write_peft_adapters(copy.deepcopy(model.visual), tmp_path / "adapters", list(VISION), target_modules=["attn"], rank=2, alpha=2)
    _image_data(tmp_path / "data")
    path = _recipe(tmp_path, "vitb32-open_clip.yaml", **{"arch: ViT-B-32": "arch: test-recipe-clip"})
    spec, bench = _passes(path)
    assert bench.tasks["sun397"].classnames[0] == "abbey" and bench.tasks["gtsrb"].num_classes == 43

    # a task whose folders do not match its class names is a problem, named
    shutil.rmtree(tmp_path / "data" / "dtd" / "train" / "046")
    problems = check_study(load_study(path)).problems
    assert any(re.search(r"dtd: 47 class names for 46 class folders", p) for p in problems), problems
    assert any("dtd: " in p and "class folders, train has 46" in p for p in problems), problems


def test_the_hf_clip_recipe_passes_check_on_tiny_stand_ins(tmp_path):
    import transformers

    clip = clip_directory(tmp_path / "clip-vit-base-patch32", words=["a", "photo", "of", "the"], projection_dim=16,
                          text={"vocab_size": 8, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                "num_attention_heads": 2, "max_position_embeddings": 32, "eos_token_id": 2},
                          vision={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                  "image_size": 16, "patch_size": 8})
    vision = transformers.CLIPVisionModel(clip.config.vision_config)
    vision.load_state_dict(clip.vision_model.state_dict())
    write_peft_adapters(vision, tmp_path / "adapters", list(VISION), target_modules=ATTENTION, rank=2, alpha=2)  # KnOTS' layout
    _image_data(tmp_path / "data")
    _passes(_recipe(tmp_path, "vitb32-hf_clip.yaml"))


def test_the_nli_recipe_passes_check_on_tiny_stand_ins_with_a_sharded_base(tmp_path):
    import transformers

    words = ["premise", "hypothesis", "yes", "no", "cat", "dog"]
    root = tmp_path / "llama-3-8b-seqcls"
    model = llama_classifier(root, words=words, vocab_size=len(words) + 2, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, num_labels=3)
    (root / "model.safetensors").unlink()
    model.save_pretrained(root, max_shard_size="2KB")  # shards and an index, as LLaMA-3-8B's directory holds
    assert (root / "model.safetensors.index.json").is_file()
    base = transformers.AutoModelForSequenceClassification.from_pretrained(str(root), local_files_only=True).eval()
    write_peft_adapters(base, tmp_path / "adapters", list(NLI), rank=2, alpha=2, task_type="SEQ_CLS",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    spec = load_study(REAL / "llama3-8b-nli.yaml")
    text_folders(tmp_path / "data", {t.name: t.classnames for t in spec.tasks}, words, rows=6)
    spec, _ = _passes(_recipe(tmp_path, "llama3-8b-nli.yaml"))
    found = check_study(spec)
    assert not found.notes  # the sharded base's shapes are read from its shards' headers
    assert all(len(t.modules) == 8 for t in found.tasks)  # q, k, v, o of both blocks, each fitting the base
