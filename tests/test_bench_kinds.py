"""A bench kind is one module (issue 28 item 2): its settings schema, loader and module layout, one
line of ``BENCHES``. Its layout, not a name pattern, tells AdaRank and the analyses which modules
are attention and MLP matrices; on every registered kind's model it agrees with the generic names
the stored analyses were drawn with, so their coordinates stay what they were."""

from __future__ import annotations

import pytest
import torch

from mergelab.bench import BENCHES
from mergelab.config import load_study
from mergelab.naming import GENERIC, ModuleLayout
from mergelab.taskset import BaseRef, Dense, LowRank, TaskSet, TaskUpdate

STUDY = {"name": "s", "methods": [{"method": "ties", "grid": {"alpha": [1.0]}}]}


def _open_clip():
    from mergelab.model import BACKENDS

    return BACKENDS["open_clip"]("mergelab-micro", tokenizer=lambda texts: None)


def _hf_clip():
    import transformers

    from mergelab.model import BACKENDS

    return BACKENDS["hf_clip"](transformers.CLIPConfig(
        text_config={"vocab_size": 16, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 16, "patch_size": 8}, projection_dim=8))


def _hf_seq_cls():
    import transformers

    from mergelab.model import BACKENDS

    return BACKENDS["hf_seq_cls"](transformers.LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                           num_attention_heads=2, num_key_value_heads=1, pad_token_id=0))


def _sentence_encoder():
    import transformers

    from mergelab.bench.kinds.sentence_encoder import SentenceEncoder

    bert = transformers.BertModel(transformers.BertConfig(vocab_size=16, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                          intermediate_size=32), add_pooling_layer=False)
    return SentenceEncoder(bert, lambda texts: None, "mean", True, 0, 20.0, 16)


#: A tiny model of every registered kind that declares no example (``BenchKind.example``; a kind with one
#: is loaded from it, as tests/test_conformance.py's checks load it).
MODELS = {"open_clip": _open_clip, "hf_clip": _hf_clip, "hf_seq_cls": _hf_seq_cls, "sentence_encoder": _sentence_encoder,
          "text": _sentence_encoder}


@pytest.mark.parametrize("kind", list(BENCHES))
def test_every_kinds_layout_agrees_with_the_generic_names_on_its_model(kind):
    """The stored analyses' coordinates stay what they were; that the layout knows the adapted
    projections, and the settings' validation, are each kind's conformance checks."""
    from mergelab.conformance import example_bench

    layout = BENCHES[kind].layout
    backbone = example_bench(kind).backbone if BENCHES[kind].example is not None else MODELS[kind]()
    names = list(backbone.base_state())
    assert {n: GENERIC.kind(n) for n in names} == {n: layout.kind(n) for n in names}
    assert {n: GENERIC.layer(n) for n in names} == {n: layout.layer(n) for n in names}
    targets = [f"{t}.weight" for t in backbone.lora_targets()]
    assert targets and all(layout.role(t) != "other" and layout.layer(t) >= 0 for t in targets)
    roles = {layout.role(n) for n in names if len(backbone.base_state()[n].shape) == 2}
    assert roles == {"attention", "mlp", "other"} or roles == {"attention", "mlp"}


def test_a_study_files_bench_paths_are_relative_to_it_whatever_the_kind(tmp_path):
    import yaml

    (tmp_path / "studies").mkdir()
    for kind in BENCHES:
        path = tmp_path / "studies" / f"{kind}.yaml"
        fields = BENCHES[kind].spec.path_fields()
        path.write_text(yaml.safe_dump({**STUDY, "bench": {"kind": kind, **{f: "../models/x" for f in fields}}}))
        bench = load_study(path).bench
        assert fields and all(getattr(bench, f) == tmp_path / "studies" / "../models/x" for f in fields)


#: A family no generic name pattern knows: ``blk.N.mix`` is attention, ``blk.N.ffn`` the MLP.
ODD = ModuleLayout(blocks=r"(?:^|\.)blk\.(\d+)\.", kinds=(("qkv", r"\.mix\."), ("mlp_in", r"\.ffn\.")))


def _odd_taskset(layout: ModuleLayout) -> TaskSet:
    g = torch.Generator().manual_seed(0)
    tasks = [TaskUpdate(f"t{i}", {"blk.0.mix.weight": LowRank(torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g)),
                                  "blk.1.ffn.weight": LowRank(torch.randn(6, 2, generator=g), torch.randn(2, 6, generator=g)),
                                  "blk.1.gain": Dense(torch.randn(6, generator=g))}) for i in range(2)]
    return TaskSet(tuple(tasks), BaseRef("odd"), layout)


def test_adarank_and_the_analyses_read_the_task_sets_layout_not_name_patterns():
    from mergelab.adaptation import build
    from mergelab.analysis.geometry import norms

    declared, generic = build("adarank", _odd_taskset(ODD)), build("adarank", _odd_taskset(GENERIC))
    assert [lg.requires_grad for lg in declared.logits] == [True, True, False]  # attention and MLP matrices masked
    assert not any(lg.requires_grad for lg in generic.logits)  # unknown names: nothing is masked
    ds = norms(_odd_taskset(ODD))
    assert list(ds.kind.values) == ["qkv", "mlp_in", "other"] and list(ds.layer.values) == [0, 1, 1]
    assert _odd_taskset(ODD).subset(["t1"]).layout is ODD and _odd_taskset(ODD).restrict(["blk.0.*"]).layout is ODD
