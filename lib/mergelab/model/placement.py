"""Where and in what precision a backbone's encoder runs: a study's ``device`` and ``dtype``.

:func:`placed` wraps any :class:`~mergelab.model.base.Backbone` so that its encoder (``vision``)
lives on ``device`` and its forward passes run under ``torch.autocast`` to ``dtype`` (bfloat16 /
float16; float32 runs without autocast). Everything around it stays as it is: inputs, replacement
parameters and the base weights are CPU tensors, moved onto the device inside each call
(differentiably, so adaptation's gradients reach its CPU coefficients), and features come back
as float32 CPU tensors, so heads, metrics, merges and the store never see the device. The text
tower (zero-shot heads, built once) stays on the CPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mergelab.errors import InputError
from mergelab.model.base import Backbone
from mergelab.model.streaming import StreamedParams

__all__ = ["DTYPES", "PlacedBackbone", "parse_device", "placed", "resolve_device"]

#: ``dtype:`` settings of a study and the autocast dtype each stands for (``None``: no autocast).
DTYPES: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_device(device: str) -> torch.device:
    """``device`` as a torch device mergelab runs encoders on (``cpu``, ``cuda``, ``cuda:N``), or an
    InputError naming the fix; whether this machine has it is :func:`resolve_device`'s question (a
    study is validated where it loads, which need not be where it runs)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"device {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda"):
        raise InputError(f"device {device!r}: mergelab runs encoders on cpu or cuda")
    return parsed


def resolve_device(device: str) -> torch.device:
    """``device`` (:func:`parse_device`) as a torch device that exists on this machine, or an InputError naming the fix."""
    resolved = parse_device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r}: torch sees no CUDA device on this machine; set device: cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise InputError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s); use cuda:0 …")
    return resolved


@dataclass(eq=False)
class PlacedBackbone:
    """A backbone whose encoder runs on ``device`` under autocast to ``autocast`` (module docstring)."""

    inner: Backbone
    device: torch.device
    autocast: torch.dtype | None = None

    def __post_init__(self) -> None:
        self.inner.vision.to(self.device)

    # the protocol's attributes, as the wrapped backbone has them
    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def vision(self) -> nn.Module:
        return self.inner.vision

    @property
    def logit_scale(self) -> float:
        return self.inner.logit_scale

    @property
    def image_size(self) -> int:
        return self.inner.image_size

    @property
    def linear_heads(self) -> bool:
        return bool(getattr(self.inner, "linear_heads", False))

    def base_state(self) -> dict[str, Tensor]:
        return {k: v.cpu() for k, v in self.inner.base_state().items()}

    def lora_targets(self) -> list[str]:
        return self.inner.lora_targets()

    def _run(self, encode, images: Tensor, params: Mapping[str, Tensor] | None) -> Tensor:
        if params is None:
            moved = None
        elif isinstance(params, StreamedParams):  # each moves as it is formed
            moved = params.then(lambda t: t.to(self.device))
        else:
            moved = {k: v.to(self.device) for k, v in params.items()}
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            out = encode(images.to(self.device), moved)
        return out.float().cpu()

    def encode_image(self, images: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
        return self._run(self.inner.encode_image, images, params)

    def image_tokens(self, images: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
        return self._run(self.inner.image_tokens, images, params)

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        return self.inner.encode_text(texts)


def placed(backbone: Backbone, device: str = "cpu", dtype: str = "float32") -> Backbone:
    """``backbone`` itself on the CPU in float32; otherwise a :class:`PlacedBackbone`."""
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    resolved = resolve_device(device)
    if resolved.type == "cpu" and DTYPES[dtype] is None:
        return backbone
    return PlacedBackbone(backbone, resolved, DTYPES[dtype])
