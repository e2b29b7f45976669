"""``bench.kind: hf_clip``: a local ``transformers`` ``CLIPModel`` directory as ``weights``.

Adapters target its image tower as a ``CLIPVisionModel`` does
(``[vision_model.]encoder.layers.N.self_attn.{q,k,v,out}_proj``, the KnOTS checkpoints' layout;
transformers 5 drops the ``vision_model.`` level, the prefix is found either way); the zero-shot
heads come from its text tower. Tasks as for ``open_clip`` (``ImageFolder`` roots).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Literal

from mergelab.bench.benches import Bench, BenchKind, BenchSpec, Tasks, directory_digest, model_directory, pretrained
from mergelab.bench.kinds.open_clip import folder_bench
from mergelab.naming import ModuleLayout
from mergelab.strict import Int

__all__ = ["HF_CLIP_LAYOUT", "HfClipSpec", "KIND"]

#: A ``CLIPVisionModel``: ``encoder.layers.N.{self_attn.{q,k,v,out}_proj, mlp.fc1, mlp.fc2}``.
HF_CLIP_LAYOUT = ModuleLayout(
    blocks=r"(?:^|\.)layers\.(\d+)\.",
    kinds=(("q", r"\.self_attn\.q_proj\."), ("k", r"\.self_attn\.k_proj\."), ("v", r"\.self_attn\.v_proj\."),
           ("out", r"\.self_attn\.out_proj\."), ("mlp_in", r"\.mlp\.fc1\."), ("mlp_out", r"\.mlp\.fc2\.")),
)


class HfClipSpec(BenchSpec):
    """``weights``: the ``CLIPModel`` directory; ``image_size``: the tasks' (``None``: the model's)."""

    kind: Literal["hf_clip"] = "hf_clip"
    weights: Path | None = None
    image_size: Int | None = None
    image_folders: ClassVar[bool] = True

    @property
    def base_weights(self) -> Path | None:
        return self.weights


def load(spec: HfClipSpec, tasks: Tasks) -> Bench:
    """The ``CLIPModel`` with its tokenizer, and the tasks' folders."""
    import transformers

    from mergelab.model import hf_clip_backbone

    root = model_directory(spec.weights, spec.kind, "CLIPModel")
    model, tokenizer = pretrained(lambda: (transformers.CLIPModel.from_pretrained(str(root), local_files_only=True),
                                           transformers.AutoTokenizer.from_pretrained(str(root), local_files_only=True)),
                                  root, "CLIPModel with its tokenizer")

    def tokenize(texts: Sequence[str]):
        return tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")["input_ids"]

    # arch None: the data ids of hf_clip benches stay what they were
    return folder_bench(root.name, hf_clip_backbone(model.eval(), tokenizer=tokenize), spec.kind, spec.image_size, tasks,
                        {"arch": None, "weights": directory_digest(root)})


KIND = BenchKind(HfClipSpec, load, HF_CLIP_LAYOUT)
