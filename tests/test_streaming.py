"""A forward with replaced parameters formed a repeated block at a time (issue 31 item 4): the outputs of
``functional_call`` with every replacement formed up front, bit for bit, the base never written, and one
block's replacements alive at a time (counted, not measured)."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

from mergelab.model.base import run_functional
from mergelab.model.streaming import StreamedParams


def _llama() -> tuple[nn.Module, tuple, dict]:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=50, num_labels=2, pad_token_id=0)
    return transformers.LlamaForSequenceClassification(config).eval(), (), {"input_ids": torch.randint(1, 50, (4, 7))}


def _open_clip() -> tuple[nn.Module, tuple, dict]:
    """Stock packed attention: ``nn.MultiheadAttention`` reads its ``out_proj``'s weight itself."""
    from mergelab.synthetic import tiny_vision_transformer

    torch.manual_seed(0)
    return tiny_vision_transformer(seed=0).eval(), (torch.randn(2, 3, 16, 16),), {}


class Formed:
    """``W_0 + ΔW`` of every matrix (and one norm outside the blocks), counting the bytes alive at once."""

    def __init__(self, model: nn.Module) -> None:
        self.base = {n: p.detach().clone() for n, p in model.named_parameters()}
        names = [n for n, p in model.named_parameters() if p.ndim == 2 and ("proj" in n or "in_proj" in n)]
        names += [n for n, p in model.named_parameters() if p.ndim == 1 and "norm" in n and "layers" not in n][:1]
        g = torch.Generator().manual_seed(1)
        self.deltas = {n: 0.1 * torch.randn(self.base[n].shape, generator=g) for n in names}
        self.alive = self.most = 0

    def make(self, name: str) -> torch.Tensor:
        t = self.base[name] + self.deltas[name]
        self.alive += t.nbytes
        self.most = max(self.most, self.alive)
        weakref.finalize(t, self._freed, t.nbytes)
        return t

    def _freed(self, nbytes: int) -> None:
        self.alive -= nbytes


@pytest.mark.parametrize("build", [_llama, _open_clip], ids=["hf_llama", "open_clip_packed"])
def test_a_streamed_forward_is_functional_calls_bit_for_bit_one_block_at_a_time(build):
    model, args, kwargs = build()
    formed = Formed(model)
    up_front = {n: formed.base[n] + d for n, d in formed.deltas.items()}
    weights = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    with torch.no_grad():
        expected = run_functional(model, up_front, *args, **kwargs)
        got = run_functional(model, StreamedParams(formed.deltas, formed.make), *args, **kwargs)
        base = model(*args, **kwargs)
    out = (lambda o: o.logits) if hasattr(expected, "logits") else (lambda o: o)
    assert torch.equal(out(got), out(expected)) and not torch.equal(out(got), out(base))
    assert all(p is dict(model.named_parameters())[n] and torch.equal(p, copy) for n, (p, copy) in weights.items())
    outside = [n for n in formed.deltas if ".layers." not in n and ".resblocks." not in n]
    per_block = {}
    for name, delta in formed.deltas.items():
        if name not in outside:
            block = name.split(".layers.")[-1].split(".resblocks.")[-1].split(".")[0]
            per_block[block] = per_block.get(block, 0) + delta.nbytes
    held = sum(formed.deltas[n].nbytes for n in outside) + max(per_block.values())
    assert formed.most == held < sum(d.nbytes for d in formed.deltas.values()) and formed.alive == 0


def test_a_tied_weight_is_replaced_under_each_of_its_names():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
            self.blocks[1].weight = self.blocks[0].weight

        def forward(self, x):
            return self.blocks[1](self.blocks[0](x))

    model, x = Tied(), torch.randn(3, 4)
    replaced = torch.randn(4, 4)
    expected = torch.func.functional_call(model, {"blocks.0.weight": replaced}, (x,))
    got = run_functional(model, StreamedParams(["blocks.0.weight"], lambda _: replaced), x)
    assert torch.equal(got, expected) and model.blocks[1].weight is model.blocks[0].weight


def test_a_block_whose_weights_fail_to_form_leaves_every_weight_in_place():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    weights = list(model.parameters())

    def make(name: str) -> torch.Tensor:
        if name.startswith("1."):
            raise RuntimeError("unreadable")
        return torch.zeros(4, 4)

    with pytest.raises(RuntimeError, match="unreadable"):
        run_functional(model, StreamedParams(["0.weight", "1.weight"], make), torch.randn(2, 4))
    assert list(model.parameters()) == weights
