"""Synthetic task sets and PEFT adapters: seeded, shape-faithful stand-ins for real checkpoints.

Used by the benchmarks (ViT-B/32 and LLaMA layer shapes without downloading weights), by tests
(real PEFT adapter directories on tiny models) and by ``mergelab demo --synthetic``. Nothing
here is presented as a trained model.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from mergelab.taskset import BaseRef, LowRank, TaskSet, TaskUpdate

__all__ = ["random_lowrank", "random_taskset", "tiny_vision_transformer", "write_peft_adapters"]

#: ViT-B/32 vision attention shapes (q, k, v, out of 12 blocks): 48 matrices of 768 x 768.
VIT_B32_ATTENTION = {f"visual.transformer.resblocks.{i}.attn.{p}.weight": (768, 768) for i in range(12) for p in ("q_proj", "k_proj", "v_proj", "out_proj")}


def random_lowrank(out_features: int, in_features: int, rank: int, generator: torch.Generator,
                   scale: float = 1.0, dtype: torch.dtype = torch.float32) -> LowRank:
    """A LoRA-like update: Gaussian factors scaled so that ``‖B A‖_F ≈ scale``."""
    B = torch.randn(out_features, rank, generator=generator, dtype=dtype)
    A = torch.randn(rank, in_features, generator=generator, dtype=dtype)
    norm = (B.double().norm() * A.double().norm() / rank**0.5).item()
    return LowRank(B * (scale / norm), A)


def random_taskset(shapes: Mapping[str, tuple[int, int]], tasks: int | Sequence[str], rank: int | Sequence[int] = 16,
                   seed: int = 0, dtype: torch.dtype = torch.float32) -> TaskSet:
    """A TaskSet of random low-rank updates; ``rank`` may differ per task (heterogeneous ranks)."""
    names = [f"task{i}" for i in range(tasks)] if isinstance(tasks, int) else list(tasks)
    ranks = [rank] * len(names) if isinstance(rank, int) else list(rank)
    g = torch.Generator().manual_seed(seed)
    updates = []
    for name, r in zip(names, ranks, strict=True):
        modules = {m: random_lowrank(o, i, r, g, dtype=dtype) for m, (o, i) in shapes.items()}
        updates.append(TaskUpdate(name, modules, source="synthetic", meta={"format": "synthetic", "seed": seed, "rank": r}))
    return TaskSet(tuple(updates), BaseRef(f"synthetic-seed{seed}"))


def tiny_vision_transformer(seed: int = 0, width: int = 32, layers: int = 2, image_size: int = 16) -> nn.Module:
    """A randomly initialised open_clip ``VisionTransformer`` small enough for unit tests."""
    import open_clip

    torch.manual_seed(seed)
    cfg = {
        "embed_dim": width,
        "vision_cfg": {"image_size": image_size, "layers": layers, "width": width, "patch_size": 4, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": width, "heads": 2, "layers": 1},
    }
    return open_clip.CLIP(**cfg).visual


def write_peft_adapters(model: nn.Module, out_dir: str | Path, names: Sequence[str], *, target_modules: Sequence[str],
                        rank: int = 4, alpha: float = 8, seed: int = 0, std: float = 0.05, **lora_kwargs) -> list[Path]:
    """Save one PEFT LoRA adapter per name for ``model`` (left unmodified), with random non-zero B.

    PEFT initialises ``lora_B`` to zero; here both factors are random so that every adapter is a
    distinct, non-trivial update. Returns the adapter directories.
    """
    from peft import LoraConfig, get_peft_model

    paths = []
    for i, name in enumerate(names):
        torch.manual_seed(seed * 1000 + i)
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), **lora_kwargs)
        peft_model = get_peft_model(copy.deepcopy(model), config)
        with torch.no_grad():
            for param_name, param in peft_model.named_parameters():
                if "lora_B" in param_name or "lora_embedding_B" in param_name:
                    param.normal_(0.0, std)
        path = Path(out_dir) / name
        peft_model.save_pretrained(str(path))
        paths.append(path)
    return paths
