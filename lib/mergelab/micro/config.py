"""What determines a built micro benchmark: :class:`BuildConfig` and the build profiles :data:`CONFIGS`;
and :class:`BuildRun`, what every step of a build (this one's and the text benchmark's) is handed.

A module of its own so that the build (:mod:`mergelab.micro.build`) and its export
(:mod:`mergelab.micro.export`) both read them without importing each other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from mergelab.finetuning import LoraConfig, config_dict
from mergelab.micro.artifacts import vision_cfg
from mergelab.micro.training import DenseConfig, PretrainConfig
from mergelab.store import Store

__all__ = ["CONFIGS", "CONSISTENCY", "BuildConfig", "BuildRun", "Progress"]

#: Weight of the LoRA fine-tuning's feature-consistency term: 0.25 since the micro benchmark v3, the variant
#: the declared rule chose on val (``benchmarks/variants.py``, data/micro/README.md); v2 used 3.
CONSISTENCY = 0.25
Progress = Any  # rich.progress.Progress or None
ConfigT = TypeVar("ConfigT")


@dataclass(frozen=True)
class BuildConfig:
    """Everything that determines the built benchmark, besides the seed."""

    profile: str
    pretrain: PretrainConfig
    lora_steps: int
    lora_batch: int
    dense: Mapping[str, DenseConfig]
    ranks: tuple[int, ...] = (4, 16)
    lora_alpha: float = 16.0
    lora_lr: float = 3e-4 * 768 / 96
    consistency: float = CONSISTENCY
    refit_steps: int = 300
    vision_layers: int | None = None

    @property
    def vision(self) -> dict[str, int] | None:
        """The image tower's config when it is not the architecture's own (``vision_layers``)."""
        return vision_cfg(self.vision_layers)

    def lora(self, rank: int, seed: int) -> LoraConfig:
        """001 App. C.2 settings: alpha 16 at every rank (the supplement's rank-4 set keeps the defaults),
        dropout 0.1, AdamW, cosine, weight decay 1e-4. The learning rate is App. C.2's 3e-4 transferred
        from ViT-B/32's width 768 to the micro width 96 (× 768 / 96, the muP rule for hidden-layer Adam
        learning rates): with Adam a LoRA factor moves by ~lr per step whatever the width, so the same
        lr changes a width-96 layer's output 8× less than a width-768 one's. ``consistency``: the
        weight of the feature-consistency term on the other tasks' pre-training images
        (:func:`~mergelab.micro.training.consistency_loss`, data/micro/README.md)."""
        return LoraConfig(rank=rank, alpha=self.lora_alpha, lr=self.lora_lr, steps=self.lora_steps, batch_size=self.lora_batch,
                          seed=seed, consistency=self.consistency)

    def mixed(self, tasks: Sequence[str]) -> dict[str, int]:
        """The mixed-rank set (003 Tab. 9): tasks alternate between the smallest and the largest rank."""
        low, high = min(self.ranks), max(self.ranks)
        return {name: low if i % 2 == 0 else high for i, name in enumerate(tasks)}

    def as_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, "pretrain": config_dict(self.pretrain), "lora_steps": self.lora_steps,
                "lora_batch": self.lora_batch, "ranks": list(self.ranks), "lora_alpha": self.lora_alpha, "lora_lr": self.lora_lr,
                "consistency": self.consistency, "dense": {k: config_dict(v) for k, v in self.dense.items()},
                "refit_steps": self.refit_steps, **({"vision_layers": self.vision_layers} if self.vision_layers else {})}


#: The build profiles: ``full`` is the shipped benchmark; ``quick`` (``--quick``) checks the build path in
#: a few minutes, with too few steps for its accuracies to mean anything.
CONFIGS: dict[str, BuildConfig] = {
    "full": BuildConfig("full", PretrainConfig(steps=1200, batch_size=256), lora_steps=600, lora_batch=64,
                        dense={"segmentation": DenseConfig(120, 1e-4), "depth": DenseConfig(120, 2e-4),
                               "keypoint": DenseConfig(600, 1e-3), "shape": DenseConfig(400, 1e-3)}),
    "quick": BuildConfig("quick", PretrainConfig(steps=60, batch_size=128), lora_steps=10, lora_batch=32,
                         dense={"segmentation": DenseConfig(6, 5e-5), "depth": DenseConfig(6, 1e-4),
                                "keypoint": DenseConfig(30, 8e-4), "shape": DenseConfig(12, 3e-4)},
                         refit_steps=100),
}


@dataclass(frozen=True)
class BuildRun(Generic[ConfigT]):
    """What every step of one build reads and hands on unchanged: the store that keeps each artifact
    under its content key, the build's config (:class:`BuildConfig`, or the text benchmark's), the
    seed and the progress display (``None``: none)."""

    store: Store
    config: ConfigT
    seed: int
    progress: Progress = None
