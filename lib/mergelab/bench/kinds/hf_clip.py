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

from mergelab.bench.benches import Bench, BenchKind, BenchSpec, Tasks, TaskSource, directory_digest, model_directory, pretrained
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


def example(folder: Path) -> tuple[HfClipSpec, Tasks]:
    """A random 2-block ``CLIPModel`` directory and two image-folder tasks with a rank-2 LoRA each on the
    attention projections (KnOTS' layout), written into ``folder``: the kind's example (:mod:`mergelab.conformance`)."""
    import transformers

    from mergelab.synthetic import clip_directory, image_folders, write_peft_adapters

    tasks, classes = ["shapes", "colours"], ["ring", "dot"]
    clip = clip_directory(folder / "clip", words=["a", "photo", "of", *classes], projection_dim=16,
                          text={"vocab_size": 12, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                "num_attention_heads": 2, "max_position_embeddings": 16, "eos_token_id": 2},
                          vision={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                                  "image_size": 32, "patch_size": 8})
    vision = transformers.CLIPVisionModel(clip.config.vision_config)
    vision.load_state_dict(clip.vision_model.state_dict())
    adapters = write_peft_adapters(vision, folder / "adapters", tasks, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
                                   rank=2, alpha=4)
    data = image_folders(folder / "data", tasks, classes)
    return HfClipSpec(weights=folder / "clip"), [TaskSource(name=t, adapter=a, data=Path(data[t]))
                                                   for t, a in zip(tasks, adapters, strict=True)]


KIND = BenchKind(HfClipSpec, load, HF_CLIP_LAYOUT, example=example)
