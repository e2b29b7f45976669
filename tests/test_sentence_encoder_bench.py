"""The sentence-encoder bench (issue 28 item 1) on a tiny random BERT saved as a sentence-transformers
directory (word-piece vocabulary written here, mean pooling, Normalize) with PEFT LoRA adapters on
``query/key/value/dense``: every static method of a study in every space, every adaptive method,
every analysis and the joint task run on it unchanged; the linear-head protocol scores each task
with a head fitted to its own fine-tuned encoder. Nothing downloads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mergelab.config import load_study
from mergelab.errors import InputError
from mergelab.store import Store
from mergelab.study import Run, local_submit, run_graph
from mergelab.synthetic import sentence_encoder_directory, write_peft_adapters

#: Two tasks with distinct label spaces; every row holds its label's word among filler words.
TASKS = {"weather": ("sun", "rain", "snow"), "animals": ("cat", "dog")}
FILLER = ("the", "a", "is", "it", "this", "here", "now", "very")
TEMPLATES = ["about {}.", "it is {}."]
WORDS = (*FILLER, "about", ".", *(w for names in TASKS.values() for w in names))


def _text_rows(root, rows: int = 12, seed: int = 0) -> dict[str, str]:
    """``ROOT/<task>/{train,val,test}.jsonl``: ``rows`` sentences per split, each its label's word among filler."""
    rng = np.random.default_rng(seed)
    for task, names in TASKS.items():
        (root / task).mkdir(parents=True)
        for split in ("train", "val", "test"):
            lines = []
            for i in range(rows):
                words = [*rng.choice(FILLER, 4)]
                words.insert(int(rng.integers(0, 5)), names[i % len(names)])
                lines.append(json.dumps({"text": " ".join(words), "label": names[i % len(names)]}) + "\n")
            (root / task / f"{split}.jsonl").write_text("".join(lines))
    return {task: str(root / task) for task in TASKS}


def _adapters(encoder, out) -> dict[str, str]:
    """A PEFT LoRA (r 2) per task on the encoder's query/key/value/dense, both factors random."""
    import transformers

    model = transformers.BertModel.from_pretrained(str(encoder), add_pooling_layer=False)
    paths = write_peft_adapters(model, out, list(TASKS), target_modules=["query", "key", "value", "dense"], rank=2, alpha=4, std=0.3)
    return {task: str(path) for task, path in zip(TASKS, paths, strict=True)}


@pytest.fixture(scope="module")
def bench_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sentence")
    encoder = sentence_encoder_directory(root / "encoder", WORDS)
    return encoder, _adapters(encoder, root / "adapters"), _text_rows(root / "data")


def _study(bench_files, **changes) -> dict:
    encoder, adapters, data = bench_files
    tasks = [{"name": t, "adapter": adapters[t], "data": data[t], "templates": TEMPLATES} for t in TASKS]
    return {"name": "sentences", "bench": {"kind": "sentence_encoder", "weights": str(encoder), "max_length": 16},
            "tasks": tasks, "seeds": [0], **changes}


def test_the_encoder_pools_as_its_directory_says_and_heads_come_from_the_frozen_base(bench_files, tmp_path):
    import transformers

    from mergelab.bench import BenchSession, bench_spec, load_bench

    encoder, adapters, data = bench_files
    bench = load_bench(bench_spec(_study(bench_files)["bench"]), load_study(_study(bench_files, analyses=["norms"])).tasks)
    session = BenchSession(bench)
    ids = bench.tasks["weather"].tensors("test")[0]
    bert = transformers.BertModel.from_pretrained(str(encoder), add_pooling_layer=False).eval()
    with torch.no_grad():
        hidden = bert(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
    mask = (ids != 0)[..., None].float()
    expected = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # mean over the words, then Normalize
    torch.testing.assert_close(bench.backbone.encode_image(ids), expected, rtol=1e-5, atol=1e-6)
    assert "pooler.dense.weight" not in bench.backbone.base_state()  # never read by sentence-transformers, never merged
    # the zero-shot head: per class the normalised mean of its prompts' base embeddings, times the logit scale
    tokens = bench.backbone.tokenizer([t.format("rain") for t in TEMPLATES])
    with torch.no_grad():
        prompts = bert(input_ids=tokens, attention_mask=(tokens != 0).long()).last_hidden_state
    prompt_mask = (tokens != 0)[..., None].float()
    rain = F.normalize(F.normalize((prompts * prompt_mask).sum(1) / prompt_mask.sum(1), dim=-1).mean(0), dim=-1) * 20.0
    torch.testing.assert_close(session.head("weather")[1], rain, rtol=1e-5, atol=1e-5)
    assert bench.taskset.layout is not None and {bench.taskset.layout.kind(m) for m in bench.taskset.module_names} == {
        "q", "k", "v", "out", "mlp_in", "mlp_out"}
    cls = load_bench(bench_spec({"kind": "sentence_encoder", "weights": str(sentence_encoder_directory(tmp_path / "cls", WORDS, "cls", False))}),
                     load_study(_study(bench_files, analyses=["norms"])).tasks)
    with torch.no_grad():
        first = transformers.BertModel.from_pretrained(str(tmp_path / "cls"), add_pooling_layer=False)(input_ids=ids).last_hidden_state[:, 0]
    torch.testing.assert_close(cls.backbone.encode_image(ids), first, rtol=1e-4, atol=1e-5)  # the [CLS] state, not normalised


def test_a_pass_over_token_ids_runs_rows_grouped_by_length_and_keeps_their_order(bench_files, monkeypatch):
    """A token-id encoder runs rows shortest first in groups that pad to their own longest row (within a
    token budget) and returns them in the rows' order: a whole pass (evaluation) and one batch of mixed
    lengths (an analysis or an adaptive step, gradients included) give what encoding each row alone gives."""
    from mergelab.bench import bench_spec, load_bench
    from mergelab.evaluation import metrics
    from mergelab.model import base

    bench = load_bench(bench_spec(_study(bench_files)["bench"]), load_study(_study(bench_files, analyses=["norms"])).tasks)
    backbone = bench.backbone
    texts = [" ".join(["the"] * n + ["rain"]) for n in (9, 0, 4, 12, 1, 7, 2, 3)]
    ids = backbone.tokenizer(texts)
    monkeypatch.setattr(base, "TOKEN_BUDGET", 24)
    batches = base.length_batches(ids, 3, backbone.pad)
    lengths = (ids != backbone.pad).sum(1)
    assert sorted(torch.cat(batches).tolist()) == list(range(len(texts)))  # every row once
    assert torch.cat(batches).tolist() == torch.argsort(lengths, stable=True).tolist()  # shortest first
    assert all(len(b) <= 3 and (len(b) == 1 or len(b) * int(lengths[b].max()) <= 24) for b in batches) and len(batches) > 3
    name, weight = next((n, w) for n, w in backbone.base_state().items() if n.endswith("query.weight"))
    alone = torch.cat([backbone.encode_image(backbone.tokenizer([t])) for t in texts])
    torch.testing.assert_close(metrics.image_features(backbone, ids, batch_size=3), alone, rtol=1e-5, atol=1e-6)

    def gradient(batch: torch.Tensor) -> torch.Tensor:
        w = weight.clone().requires_grad_(True)
        backbone.encode_image(batch, {name: w}).square().sum().backward()
        return w.grad

    torch.testing.assert_close(backbone.encode_image(ids), alone, rtol=1e-5, atol=1e-6)  # one call, several groups
    torch.testing.assert_close(gradient(ids), sum(gradient(backbone.tokenizer([t])) for t in texts), rtol=1e-4, atol=1e-6)


def test_rows_of_token_ids_are_cut_into_the_batches_of_fewest_padded_tokens_and_calls():
    """A random batch of mixed lengths (an adaptive step's 16 texts) runs as a few calls of about one length
    each: one long text no longer pads fifteen short ones; rows of one length stay in one call."""
    from mergelab.model.base import CALL_TOKENS, length_batches

    def ids(lengths: list[int]) -> torch.Tensor:
        return torch.tensor([[7] * n + [0] * (max(lengths) - n) for n in lengths])

    def cost(batches: list[torch.Tensor], lengths: list[int]) -> int:
        return sum(CALL_TOKENS + len(b) * max(lengths[i] for i in b.tolist()) for b in batches)

    mixed = [12] * 15 + [120]
    batches = length_batches(ids(mixed), 16, pad=0)
    assert [b.tolist() for b in batches] == [list(range(15)), [15]]
    assert cost(batches, mixed) < CALL_TOKENS + 16 * 120
    assert [len(b) for b in length_batches(ids([20] * 16), 16, pad=0)] == [16]
    assert sorted(len(b) for b in length_batches(ids([20] * 16), 5, pad=0)) == [1, 5, 5, 5]  # batch_size bounds the rows
    assert length_batches(ids([3]), 4, pad=0)[0].tolist() == [0] and length_batches(torch.zeros(0, 4, dtype=torch.long), 4, pad=0) == []


def test_a_study_runs_every_method_space_adaptive_method_analysis_and_the_joint_task(bench_files, tmp_path, one_thread):
    from mergelab.adaptation import ADAPTERS
    from mergelab.experiments.registry import ANALYSES
    from mergelab.merging import METHODS
    from mergelab.spaces import SPACES

    first = {name: {k: [v[0]] for k, v in method.grid.items()} for name, method in METHODS.items()}
    first["lora_lego"]["k"] = [4]  # at most Σ_t r_t clusters of minimal semantic units
    methods = [{"method": name, "spaces": list(SPACES), "grid": first[name]}
               for name, method in METHODS.items() if not method.side]  # side inputs (RegMean's Gram matrices): none in a study
    adaptive = [{"method": name, "iters": 2, "batch_size": 4} for name in ADAPTERS]
    adaptive.append({"method": "adarank", "label": "adarank_cart", "iters": 2, "batch_size": 4, "hp": {"origin": "cart"},
                     "start_grid": {"lam": [1.0], "rank_ratio": [0.5]}})
    spec = load_study(_study(bench_files, methods=methods, adaptive=adaptive, analyses=list(ANALYSES), joint=True,
                             analysis_settings={"components": {"components": 0.5, "layers": [1]}}))
    ctx = Run(spec, str(tmp_path / "store"))
    _, done = run_graph(ctx, local_submit(ctx))
    store = Store(tmp_path / "store")
    ds = store.get_dataset(done.key)
    acc = ds["score"].sel(task=list(TASKS), metric="acc")
    for m in methods:
        for space in SPACES:
            scores = acc.sel(merge_method=m["method"], space=space).dropna("config", how="all")
            assert scores.sizes["config"] >= 1 and bool(((scores >= 0) & (scores <= 1)).all()), (m["method"], space)
    for a in [*ADAPTERS, "adarank_cart"]:
        assert bool(acc.sel(merge_method=a).notnull().any()), a
    ta = {"merge_method": "task_arithmetic"}
    np.testing.assert_allclose(acc.sel(space="full", **ta).values, acc.sel(space="core", **ta).values)  # 003 Eq. 11
    joint = ds["score"].sel(task="joint", metric="hits@1", merge_method="ties").dropna("config", how="all")
    assert joint.sizes["config"] == 1 and bool(joint.notnull().all())  # the joint task over both tasks' labels
    for name in ANALYSES:
        assert store.exists(store.ref(f"studies/sentences/analysis/{name}")), name
    history = store.get_dataset(store.ref("studies/sentences/adapt/adarank"))
    assert set(history.kind.values) == {"q", "k", "v", "out", "mlp_in", "mlp_out"}  # the bench's layout


def test_linear_heads_are_fitted_to_each_fine_tuned_encoder_and_leave_no_joint_task(bench_files, tmp_path):
    from mergelab.bench.kinds.sentence_encoder import fit_linear_head
    from mergelab.evaluation.metrics import image_features

    study = _study(bench_files, methods=[{"method": "task_arithmetic", "spaces": ["full", "core"], "grid": {"alpha": [0.5]}}],
                   adaptive=[{"method": "adamerging", "iters": 2, "batch_size": 4}])
    study["bench"]["heads"] = "linear"
    spec = load_study(study)
    assert spec.joint is False
    with pytest.raises(InputError, match="no joint label space"):
        load_study({**study, "joint": True})
    ctx = Run(spec, str(tmp_path / "store"))
    _, done = run_graph(ctx, local_submit(ctx))
    ds = Store(tmp_path / "store").get_dataset(done.key)
    assert bool(ds["score"].sel(task=list(TASKS), metric="acc").notnull().any(dim=("space", "config", "seed")).all())
    session = ctx.session
    for name in TASKS:
        ids, labels = session.bench.tasks[name].tensors("train")
        expected = fit_linear_head(image_features(session.backbone, ids, session.finetuned(name)), labels, len(TASKS[name]))
        torch.testing.assert_close(session.head(name), expected)
        fitted = float(ds["reference_score"].sel(reference="finetuned", task=name, metric="acc"))
        assert fitted == pytest.approx(session.accuracy(name, "test", session.finetuned(name))[0])


def test_a_sentence_encoder_directory_it_cannot_read_is_one_line(bench_files, tmp_path):
    from mergelab.bench import bench_spec, load_bench

    encoder, adapters, data = bench_files
    tasks = load_study(_study(bench_files, analyses=["norms"])).tasks

    def refused(weights, message, **settings):
        with pytest.raises(InputError, match=message):
            load_bench(bench_spec({"kind": "sentence_encoder", "weights": str(weights), **settings}), tasks)

    refused(tmp_path / "nothing", "needs weights: a local sentence-transformers")
    dense = sentence_encoder_directory(tmp_path / "dense", WORDS)
    modules = json.loads((dense / "modules.json").read_text())
    (dense / "modules.json").write_text(json.dumps([*modules, {"path": "3_Dense", "type": "sentence_transformers.models.Dense"}]))
    refused(dense, r"lists \['Dense'\]; the sentence_encoder bench reads a Transformer")
    pooled = sentence_encoder_directory(tmp_path / "max", WORDS)
    (pooled / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    refused(pooled, r"pools by \['max_tokens'\]")
    (pooled / "modules.json").unlink()
    refused(pooled, "has no modules.json .*set bench.pooling: mean or cls")
    assert load_bench(bench_spec({"kind": "sentence_encoder", "weights": str(pooled), "pooling": "cls"}), tasks).backbone.pooling == "cls"


def test_the_data_id_follows_the_data_not_where_or_when_it_was_written(bench_files, tmp_path):
    """A copy of the data folders (new paths, new mtimes: a fresh clone) keeps the bench's data id, so the
    store's references and evaluations are reused; a changed row changes it (issue 30: keys read mtimes)."""
    import os
    import shutil

    from mergelab.bench import bench_spec, load_bench

    encoder, adapters, data = bench_files
    copies = {t: shutil.copytree(folder, tmp_path / "copy" / t) for t, folder in data.items()}
    for path in (tmp_path / "copy").rglob("*.jsonl"):
        os.utime(path, ns=(1, 1))

    def data_id(folders) -> str:
        study = _study((encoder, adapters, {t: str(f) for t, f in folders.items()}), analyses=["norms"])
        return load_bench(bench_spec(study["bench"]), load_study(study).tasks).data_id

    original = data_id(data)
    assert data_id(copies) == original
    row = copies[next(iter(TASKS))] / "val.jsonl"
    row.write_text(row.read_text().replace('"text": "', '"text": "again ', 1))
    assert data_id(copies) != original
