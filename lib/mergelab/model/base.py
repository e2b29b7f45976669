"""The backbone protocol every model backend implements, and the helpers the backends share.

A backbone exposes the image encoder whose parameters get merged (``vision``, its state-dict
names are the names ``load_taskset`` and PEFT see), image and text features, and a functional
forward in which any subset of the encoder's parameters is replaced by name
(``torch.func.functional_call``, or a block at a time: :mod:`mergelab.model.streaming`), so merged
models, adaptation (001 Sec. 3, 002 Sec. 5) and Jacobians (001 Sec. 2.3) run without copying the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from mergelab.model.streaming import StreamedParams, streamed_call
from mergelab.naming import module_kind

__all__ = ["ATTENTION_KINDS", "CALL_TOKENS", "TOKEN_BUDGET", "Backbone", "attention_linears", "by_length", "capture_output",
           "length_batches", "run_functional", "vision_state", "without_trailing_padding"]

#: Module kinds (mergelab.naming) that LoRA targets: q, k, v and out of every attention block.
ATTENTION_KINDS = ("q", "k", "v", "out")


@runtime_checkable
class Backbone(Protocol):
    """What merging, adaptation, analysis and evaluation code needs from a model."""

    name: str
    vision: nn.Module
    logit_scale: float
    image_size: int

    def base_state(self) -> dict[str, Tensor]:
        """The encoder's weights (detached, sharing the module's storage: read them, never write them
        in place): the ``base`` for ``load_taskset``."""

    def lora_targets(self) -> list[str]:
        """PEFT ``target_modules``: the q, k, v, out ``nn.Linear`` of every encoder block."""

    def encode_image(self, images: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """``(N, D)`` embeddings (not normalised); ``params`` replaces encoder parameters by name."""

    def image_tokens(self, images: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """``(N, L, W)`` final-block patch tokens (no class token, before the final norm)."""

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """``(N, D)`` text embeddings (not normalised)."""


def vision_state(vision: nn.Module) -> dict[str, Tensor]:
    """An encoder's parameters and buffers by state-dict name, detached and sharing the module's
    storage: no copy of a model's weights (a second 4.6 GiB for a Llama-3.2-1B); callers that
    change weights in place (training) clone them first."""
    return {k: v.detach() for k, v in vision.state_dict().items()}


def without_trailing_padding(ids: Tensor, pad: int) -> Tensor:
    """Token ids ``(N, L)`` without the trailing columns that are padding in every row: a batch pads to
    its own longest row, not to its split's (right-padded encoders give the same outputs; left-padded
    ids have no such columns)."""
    real = (ids != pad).any(0).nonzero()
    return ids[:, : int(real.max()) + 1 if len(real) else 1]


#: Padded tokens in one forward of a token-id encoder, at most (a bound on its activations' memory).
TOKEN_BUDGET = 2048

#: What one more forward call costs, in padded tokens: a call of all-MiniLM-L6-v2 on one thread costs as
#: much as 48 more tokens in its batch, with gradients or without (measured 2026-12-07).
CALL_TOKENS = 48


def length_batches(ids: Tensor, batch_size: int, pad: int) -> list[Tensor]:
    """Row indices of the batches of one pass over right-padded token ids ``(N, L)``: the rows shortest
    first, cut into the batches whose padded tokens plus :data:`CALL_TOKENS` per batch are fewest, each
    of at most ``batch_size`` rows and :data:`TOKEN_BUDGET` padded tokens (a batch pads to its own longest
    row). On the text benchmark, a random batch of 16 texts pads to ~2.7x its tokens in one call."""
    lengths = (ids != pad).sum(1)
    order = torch.argsort(lengths, stable=True)
    longest = lengths[order].clamp(min=1).cpu().numpy()
    cost, cut = np.zeros(len(order) + 1), np.zeros(len(order) + 1, dtype=np.int64)
    for end in range(1, len(order) + 1):  # cost[end]: the cheapest cut of the first ``end`` rows (a row's batch ends at it)
        start = np.arange(max(0, end - batch_size), end)
        padded = (end - start) * longest[end - 1]
        total = cost[start] + CALL_TOKENS + np.where((padded > TOKEN_BUDGET) & (end - start > 1), np.inf, padded)
        best = int(np.argmin(total))
        cost[end], cut[end] = total[best], start[best]
    bounds, end = [], len(order)
    while end > 0:
        bounds.append((int(cut[end]), end))
        end = int(cut[end])
    return [order[a:b] for a, b in reversed(bounds)]


def by_length(run: Callable[[Tensor], Tensor], ids: Tensor, pad: int) -> Tensor:
    """``run(ids)`` row for row, with the rows of right-padded token ids run in groups of about one length
    (:func:`length_batches`), each cut to its own longest row (:func:`without_trailing_padding`), and the
    outputs put back in the rows' order. Differentiable; a right-padded encoder's output per row does not
    depend on the row's batch, so only the padded work changes (a batch of mixed lengths pads every row to
    its longest)."""
    groups = length_batches(ids, len(ids), pad)
    if len(groups) <= 1:
        return run(without_trailing_padding(ids, pad))
    out = torch.cat([run(without_trailing_padding(ids[rows], pad)) for rows in groups])
    return out[torch.argsort(torch.cat(groups))]


def run_functional(module: nn.Module, params: Mapping[str, Tensor] | None, *args: Any, **kwargs: Any) -> Any:
    """``module(*args, **kwargs)`` with the named parameters replaced (differentiably) when given;
    :class:`~mergelab.model.streaming.StreamedParams` are formed a repeated block at a time
    (:func:`~mergelab.model.streaming.streamed_call`), with the same outputs."""
    if params is None:
        return module(*args, **kwargs)
    if isinstance(params, StreamedParams):
        return streamed_call(module, params, *args, **kwargs)
    return functional_call(module, dict(params), args, kwargs, strict=False)


@contextlib.contextmanager
def capture_output(module: nn.Module) -> Iterator[list[Any]]:
    """Collect the outputs of ``module``'s forward calls while the context is open."""
    seen: list[Any] = []
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        yield seen
    finally:
        handle.remove()


def attention_linears(vision: nn.Module, kinds: Sequence[str] = ATTENTION_KINDS,
                      keep: Callable[[str], bool] = lambda _: True) -> list[str]:
    """Names of the ``nn.Linear`` modules whose kind (``mergelab.naming.module_kind``) is in ``kinds``."""
    return [name for name, module in vision.named_modules()
            if isinstance(module, nn.Linear) and keep(name) and module_kind(f"{name}.weight") in kinds]
