"""PEFT LoRA fine-tuning against a frozen classification head, shared by the benchmark builds.

The recipe is 001 App. C.2's: LoRA on the encoder's projections, the frozen zero-shot head as the
classifier, cross-entropy on the normalised features, AdamW with weight decay, LoRA dropout and a
cosine learning-rate schedule. :func:`train_lora` runs it on any ``nn.Module`` given how a batch
becomes features (an image tower, a pooled sentence encoder); the micro build adds its
feature-consistency term through ``extra`` (:mod:`mergelab.micro.training`). The adapter comes
back as exactly what ``PeftModel.save_pretrained`` writes, and :func:`write_adapter` writes it as
a standard PEFT directory.

Every run is deterministic given its ``seed`` (batches from a ``torch.Generator``).
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Features", "LoraConfig", "config_dict", "cosine_schedule", "train_lora", "write_adapter", "write_tensors"]

Tick = Callable[[], None]
#: ``features(model, inputs, generator) -> (N, D)``: a batch of inputs through the adapted model
#: (the generator draws any augmentation).
Features = Callable[[nn.Module, Tensor, torch.Generator], Tensor]


def _noop() -> None:
    return None


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to zero (Loshchilov & Hutter, 2017)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass(frozen=True)
class LoraConfig:
    """PEFT LoRA with 001 App. C.2's defaults (r 16, alpha 16, dropout 0.1, lr 3e-4, weight decay 1e-4).

    ``consistency``: the weight of the micro build's feature-consistency term (0: plain
    cross-entropy, as the papers fine-tune; :func:`mergelab.micro.training.consistency_loss`).
    """

    rank: int = 16
    alpha: float = 16
    dropout: float = 0.1
    lr: float = 3e-4
    weight_decay: float = 1e-4
    steps: int = 300
    batch_size: int = 64
    seed: int = 0
    consistency: float = 0.0


def train_lora(module: nn.Module, targets: Sequence[str], inputs: Tensor, labels: Tensor, head: Tensor, config: LoraConfig,
               features: Features, tick: Tick = _noop,
               extra: Callable[[nn.Module, torch.Generator], Tensor] | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Fine-tune a PEFT LoRA adapter on ``targets`` of (a copy of) ``module`` with the frozen ``head``
    ``(C, D)``: per step a seeded batch of ``inputs`` / ``labels``, loss
    ``CE(normalize(features) @ headᵀ, labels)`` (+ ``extra(model, generator)``), AdamW with weight
    decay and a cosine schedule (001 App. C.2). Returns (adapter tensors, adapter config), exactly
    what ``PeftModel.save_pretrained`` writes.

    It takes 9 parameters because both builds (micro images, text rows) share this loop: the module, its LoRA targets,
    the data, the frozen head and the config, and the three places the builds differ (how features are read, a progress
    tick, an extra loss term)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from safetensors.torch import load_file

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    peft_config = PeftLoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                 target_modules=list(targets), bias="none")
    model = get_peft_model(copy.deepcopy(module), peft_config)  # get_peft_model mutates: wrap a copy
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = cosine_schedule(opt, config.steps)
    for _ in range(config.steps):
        batch = torch.randint(0, len(labels), (config.batch_size,), generator=generator)
        logits = F.normalize(features(model, inputs[batch], generator), dim=-1) @ head.T
        loss = F.cross_entropy(logits, labels[batch])
        if extra is not None:
            loss = loss + extra(model, generator)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        tick()
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tensors = load_file(str(Path(tmp) / "adapter_model.safetensors"))
        adapter_config = json.loads((Path(tmp) / "adapter_config.json").read_text())
    return tensors, adapter_config


def config_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as a plain dict (for store keys and manifests)."""
    return asdict(config)


def write_tensors(path: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=dict(metadata or {}))


def write_adapter(directory: Path, tensors: Mapping[str, Tensor], config: Mapping[str, Any]) -> None:
    """A standard PEFT adapter directory (``adapter_model.safetensors`` + ``adapter_config.json``).

    PEFT keeps ``target_modules`` as a set, so its saved order varies between processes; it is
    written sorted, which makes the directory byte-identical across builds.
    """
    config = dict(config)
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    write_tensors(directory / "adapter_model.safetensors", tensors, {"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
