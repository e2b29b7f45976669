"""The backbone protocol every model backend implements, and the helpers the backends share.

A backbone exposes the image encoder whose parameters get merged (``vision``, its state-dict
names are the names ``load_taskset`` and PEFT see), image and text features, and a functional
forward in which any subset of the encoder's parameters is replaced by name
(``torch.func.functional_call``), so merged models, adaptation (001 Sec. 3, 002 Sec. 5) and
Jacobians (001 Sec. 2.3) run without copying the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn
from torch.func import functional_call

from mergelab.naming import module_kind

__all__ = ["ATTENTION_KINDS", "Backbone", "attention_linears", "capture_output", "run_functional", "vision_state", "without_trailing_padding"]

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


def run_functional(module: nn.Module, params: Mapping[str, Tensor] | None, *args: Any, **kwargs: Any) -> Any:
    """``module(*args, **kwargs)`` with the named parameters replaced (differentiably) when given."""
    if params is None:
        return module(*args, **kwargs)
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
