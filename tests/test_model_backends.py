"""The backbone protocol, tested the same way on tiny open_clip, ViT-B-32 and the HF backends."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from mergelab.checkpoints import load_taskset
from mergelab.errors import InputError
from mergelab.model import BACKENDS, Backbone, ClosedVocabTokenizer, SplitAttention, split_attention
from mergelab.naming import module_kind, module_layer

TEXTS = ["a photo of a cat", "a photo of a dog", "the number seven"]


def _tokenizer(context_length: int = 8) -> ClosedVocabTokenizer:
    return ClosedVocabTokenizer.from_texts(TEXTS, context_length=context_length)


def _tiny_open_clip():
    tok = _tokenizer()
    return BACKENDS["open_clip"]("mergelab-micro", tokenizer=tok, seed=0,
                                 text_cfg={"context_length": 8, "vocab_size": tok.vocab_size, "width": 32, "heads": 2, "layers": 1})


def _vit_b32():
    """ViT-B-32's blocks (12 × width 768) at 64 px to keep the protocol tests cheap; 224 px is checked below."""
    return BACKENDS["open_clip"]("ViT-B-32", seed=0, force_image_size=64)


def _hf_clip():
    import transformers

    tok = _tokenizer()
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=8, eos_token_id=tok.eot, bos_token_id=tok.sot, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4),
        projection_dim=16)
    return BACKENDS["hf_clip"](config, tokenizer=tok)


def _hf_clip_vision():
    import transformers

    torch.manual_seed(0)
    return BACKENDS["hf_clip_vision"](transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                                    num_attention_heads=2, image_size=16, patch_size=4))


def _hf_bert():
    import transformers

    tok = _tokenizer()
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=8, num_labels=3)
    return BACKENDS["hf_seq_cls"](config, tokenizer=tok)


FACTORIES = {"tiny_open_clip": _tiny_open_clip, "vit_b32": _vit_b32, "hf_clip": _hf_clip, "hf_clip_vision": _hf_clip_vision,
             "hf_seq_cls": _hf_bert}
#: (blocks, has a text tower) per backend.
EXPECTED = {"tiny_open_clip": (4, True), "vit_b32": (12, True), "hf_clip": (2, True), "hf_clip_vision": (2, False), "hf_seq_cls": (2, True)}


@pytest.fixture(scope="module", params=list(FACTORIES))
def backend(request):
    return request.param, FACTORIES[request.param]()


def _inputs(name: str, backbone: Backbone, n: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if name == "hf_seq_cls":
        return _tokenizer()(["a photo of a cat", "the dog"][:n])
    return torch.randn(n, 3, backbone.image_size, backbone.image_size, generator=g)


def test_protocol_shapes_and_features(backend):
    name, backbone = backend
    blocks, has_text = EXPECTED[name]
    assert isinstance(backbone, Backbone)
    x = _inputs(name, backbone)
    with torch.no_grad():
        emb, tokens = backbone.encode_image(x), backbone.image_tokens(x)
    assert emb.ndim == 2 and emb.shape[0] == 2 and torch.isfinite(emb).all()
    assert tokens.ndim == 3 and tokens.shape[0] == 2 and torch.isfinite(tokens).all()
    assert backbone.logit_scale > 0 and backbone.image_size > 0
    if has_text:
        with torch.no_grad():
            text = backbone.encode_text(TEXTS)
        assert text.shape == (3, emb.shape[1])
        assert not torch.allclose(text[0], text[1])
    else:
        with pytest.raises(InputError, match="no text tower"):
            backbone.encode_text(TEXTS)


def test_lora_targets_are_q_k_v_out_of_every_block(backend):
    name, backbone = backend
    blocks, _ = EXPECTED[name]
    targets = backbone.lora_targets()
    assert len(targets) == 4 * blocks
    assert sorted(module_kind(t + ".weight") for t in targets) == sorted(["q", "k", "v", "out"] * blocks)
    assert sorted({module_layer(t + ".weight") for t in targets}) == list(range(blocks))
    modules, state = dict(backbone.vision.named_modules()), backbone.base_state()
    assert all(isinstance(modules[t], torch.nn.Linear) for t in targets)
    assert all(f"{t}.weight" in state for t in targets)


def test_params_replace_weights_functionally_and_differentiably(backend):
    name, backbone = backend
    x = _inputs(name, backbone)
    target = backbone.lora_targets()[0] + ".weight"
    weight = backbone.vision.state_dict()[target].detach().clone()
    delta = torch.zeros_like(weight, requires_grad=True)
    out = backbone.encode_image(x, {target: weight + delta})
    torch.testing.assert_close(out, backbone.encode_image(x))  # zero delta: same model
    out.square().sum().backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    changed = backbone.encode_image(x, {target: weight * 1.5})
    assert not torch.allclose(changed, out)
    torch.testing.assert_close(backbone.vision.state_dict()[target], weight)  # the module itself is untouched
    tokens = backbone.image_tokens(x, {target: weight * 1.5})
    assert not torch.allclose(tokens, backbone.image_tokens(x))


def test_peft_adapter_on_lora_targets_loads_through_load_taskset_and_matches_peft(backend, tmp_path):
    """An adapter trained on ``lora_targets()`` is what load_taskset reads: base + ΔW reproduces PEFT's forward."""
    name, backbone = backend
    if name == "vit_b32":
        pytest.skip("same code path as tiny_open_clip; ViT-B-32 is checked for shapes only")
    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(backbone.vision), LoraConfig(r=4, lora_alpha=16, target_modules=backbone.lora_targets()))
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if "lora_B" in pname:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(str(tmp_path / "a"))
    taskset = load_taskset(backbone.base_state(), [tmp_path / "a"])
    assert len(taskset.module_names) == len(backbone.lora_targets())
    base = backbone.base_state()
    params = {k: base[k] + u.dense() for k, u in taskset.tasks[0].modules.items()}
    x = _inputs(name, backbone)
    loaded = PeftModel.from_pretrained(copy.deepcopy(backbone.vision), str(tmp_path / "a")).eval()
    with torch.no_grad():
        ours = backbone.encode_image(x, params)
        if name == "hf_seq_cls":
            out = loaded(input_ids=x, attention_mask=(x != backbone.pad).long(), output_hidden_states=True)
            theirs = backbone.pool(out.hidden_states[-1], x, backbone.pad)
        elif name.startswith("hf_clip"):
            theirs = loaded(x).pooler_output
        else:
            theirs = loaded(x)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_vit_b32_at_its_native_resolution_constructs_and_runs():
    backbone = BACKENDS["open_clip"]("ViT-B-32", seed=0)
    assert backbone.image_size == 224
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        assert backbone.encode_image(x).shape == (1, 512)
        assert backbone.image_tokens(x).shape == (1, 49, 768)
        assert backbone.encode_text(["a photo of a cat"]).shape == (1, 512)


def test_split_attention_is_exactly_the_packed_attention():
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None, force_image_size=64).eval()  # ViT-B-32 blocks, fewer patches
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        packed = model.encode_image(x)
        split_attention(model.visual)
        split = model.encode_image(x)
    assert isinstance(model.visual.transformer.resblocks[0].attn, SplitAttention)
    torch.testing.assert_close(split, packed, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
def test_split_attention_matches_mha_with_masks_and_layouts(batch_first):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(12, 3, batch_first=batch_first).eval()
    split = SplitAttention.from_packed(mha)
    q = torch.randn(2, 5, 12) if batch_first else torch.randn(5, 2, 12)
    mask = torch.full((5, 5), float("-inf")).triu(1)  # causal, as in the text tower
    for m in (None, mask, mask == float("-inf")):
        with torch.no_grad():
            torch.testing.assert_close(split(q, q, q, attn_mask=m)[0], mha(q, q, q, need_weights=False, attn_mask=m)[0],
                                       atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(split.k_proj.weight, mha.in_proj_weight[12:24])


def test_bad_backend_inputs_raise_input_errors():
    with pytest.raises(InputError, match="unknown open_clip architecture"):
        BACKENDS["open_clip"]("ViT-Nope")
    with pytest.raises(InputError, match="closed-vocabulary"):
        BACKENDS["open_clip"]("mergelab-micro")
    with pytest.raises(InputError, match="CLIPModel"):
        BACKENDS["hf_clip"](torch.nn.Linear(2, 2))


def test_closed_vocab_tokenizer_round_trip():
    tok = ClosedVocabTokenizer.from_texts(["A photo of a cat.", "a dog"], context_length=6)
    ids = tok(["a cat", "a zebra photo of a dog and more"])
    assert ids.shape == (2, 6)
    assert ids[0].tolist() == [tok.sot, tok.encode("a")[1], tok.encode("cat")[1], tok.eot, 0, 0]
    assert ids[1, -1] == tok.eot and tok.UNK in ids[1].tolist()  # truncated, unknown word mapped to UNK
    assert int(ids.max()) == tok.vocab_size - 1  # eot is the largest id (argmax pooling)
    assert ClosedVocabTokenizer.from_json(tok.to_json())(["a cat"]).equal(tok(["a cat"]))


def test_a_placed_backbone_runs_in_bfloat16_and_passes_gradients_back_to_cpu_parameters():
    from mergelab.model.placement import PlacedBackbone, placed

    backbone = _tiny_open_clip()
    assert placed(backbone, "cpu", "float32") is backbone  # nothing to place
    images = torch.randn(3, 3, backbone.image_size, backbone.image_size)
    base = backbone.base_state()
    name = next(k for k in base if k.endswith("attn.q_proj.weight"))
    reference = backbone.encode_image(images)
    bf16 = placed(copy.deepcopy(backbone), "cpu", "bfloat16")
    assert isinstance(bf16, PlacedBackbone) and bf16.lora_targets() == backbone.lora_targets()
    weight = base[name].clone().requires_grad_(True)
    out = bf16.encode_image(images, {name: weight})
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    torch.testing.assert_close(out, reference, rtol=0.1, atol=0.05)
    assert not torch.equal(out, reference)  # it did run in bfloat16
    out.square().sum().backward()
    assert weight.grad is not None and weight.grad.dtype == torch.float32 and bool(weight.grad.abs().sum() > 0)
    with pytest.raises(InputError, match="not a torch device"):
        placed(backbone, "gpu please")
    with pytest.raises(InputError, match="dtype 'int8' is not supported"):
        placed(backbone, "cpu", "int8")
