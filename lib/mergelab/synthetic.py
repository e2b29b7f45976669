"""Synthetic task sets, PEFT adapters, model directories and data folders: seeded, shape-faithful
stand-ins for real checkpoints and datasets.

Used by the benchmarks (ViT-B/32 and LLaMA shapes without downloading weights), by tests (real
PEFT adapter directories, model directories and data folders on tiny configs) and by
``mergelab demo --synthetic``. The model builders write what a user has on disk — an open_clip
weights file, a ``CLIPModel`` or ``AutoModelForSequenceClassification`` ``save_pretrained``
directory with a tokenizer — so that the real-model benches load them exactly as they load real
checkpoints. Random weights and random data: nothing here is presented as a trained model.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from mergelab.taskset import BaseRef, LowRank, TaskSet, TaskUpdate

__all__ = ["clip_directory", "image_folders", "llama_classifier", "open_clip_checkpoint", "random_lowrank",
           "random_taskset", "sentence_encoder_directory", "text_folders", "tiny_vision_transformer",
           "word_tokenizer", "write_peft_adapters"]

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
    distinct, non-trivial update. Modules PEFT keeps whole per adapter (``modules_to_save``, such as
    a ``task_type="SEQ_CLS"`` adapter's ``score`` head) are drawn afresh too, so every task has its
    own head. Returns the adapter directories.

    It takes 9 parameters because it writes test fixtures the way PEFT's ``LoraConfig`` describes them: the model,
    folder and names, the targets, rank and alpha, the seed and scale of the random factors, and any further
    ``LoraConfig`` field.
    """
    from peft import LoraConfig, get_peft_model

    paths = []
    for i, name in enumerate(names):
        torch.manual_seed(seed * 1000 + i)
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), **lora_kwargs)
        peft_model = get_peft_model(copy.deepcopy(model), config)
        with torch.no_grad():
            for param_name, param in peft_model.named_parameters():
                if any(part in param_name for part in ("lora_B", "lora_embedding_B", "modules_to_save")):
                    param.normal_(0.0, std)
        path = Path(out_dir) / name
        peft_model.save_pretrained(str(path))
        paths.append(path)
    return paths


def image_folders(root: str | Path, tasks: Sequence[str], classes: Sequence[str], *, size: int = 32, per_class: int = 3,
                  seed: int = 0) -> dict[str, str]:
    """``ROOT/<task>/{train,val,test}/<class>/<i>.png`` (the ImageFolder layout of the vision benches):
    noise with the class's colour channel (class index mod 3) raised. Returns each task's root."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for task in tasks:
        for split in ("train", "val", "test"):
            for c, name in enumerate(classes):
                folder = Path(root) / task / split / name
                folder.mkdir(parents=True)
                for i in range(per_class):
                    pixels = rng.integers(0, 128, (size, size, 3), dtype=np.uint8)
                    pixels[..., c % 3] = 255
                    Image.fromarray(pixels).save(folder / f"{i}.png")
    return {task: str(Path(root) / task) for task in tasks}


def text_folders(root: str | Path, tasks: Mapping[str, Sequence[str] | None], words: Sequence[str], *, rows: int = 12,
                 length: int = 5, seed: int = 0) -> dict[str, str]:
    """``ROOT/<task>/{val,test}`` text rows of ``length`` random words (the ``hf_seq_cls`` bench's data):
    a task with class names writes JSON lines labelled by name, one with ``None`` a CSV of 2-way index
    labels. Returns each task's root."""
    import json

    import numpy as np

    rng = np.random.default_rng(seed)
    for task, names in tasks.items():
        folder = Path(root) / task
        folder.mkdir(parents=True)
        for split in ("val", "test"):
            texts = [" ".join(rng.choice(list(words), length)) for _ in range(rows)]
            if names:
                lines = [json.dumps({"text": t, "label": names[i % len(names)]}) + "\n" for i, t in enumerate(texts)]
                (folder / f"{split}.jsonl").write_text("".join(lines))
            else:
                (folder / f"{split}.csv").write_text("text,label\n" + "".join(f"{t},{i % 2}\n" for i, t in enumerate(texts)))
    return {task: str(Path(root) / task) for task in tasks}


def sentence_encoder_directory(root: Path, words: Sequence[str], pooling: str = "mean", normalize: bool = True) -> Path:
    """A random 2-block BERT (width 16) saved with a word-piece tokenizer of ``words`` and a
    sentence-transformers pipeline (``pooling``, then ``Normalize`` when ``normalize``)."""
    import transformers

    root.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(words)]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(root / "vocab.txt"), do_lower_case=True).save_pretrained(str(root))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, pad_token_id=0)
    transformers.BertModel(config).save_pretrained(str(root))
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (root / "modules.json").write_text(json.dumps(modules))
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 16, "pooling_mode_cls_token": pooling == "cls",
                                                                "pooling_mode_mean_tokens": pooling == "mean"}))
    return root


def word_tokenizer(words: Sequence[str]):
    """A word-level fast tokenizer (``[PAD]`` = 0, ``[UNK]`` = 1, then ``words``): a model directory's
    tokenizer that needs no download (a real one's vocabulary would)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(dict.fromkeys(words))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def open_clip_checkpoint(path: str | Path, arch: str, seed: int = 0) -> nn.Module:
    """A random open_clip model of a registered architecture (``ViT-B-32``, …) saved as a whole-model
    weights file (``torch.save`` of its state dict, as open_clip's checkpoints are). Returns the model."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.create_model(arch)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def clip_directory(root: str | Path, *, vision: Mapping, text: Mapping, projection_dim: int, words: Sequence[str],
                   seed: int = 0) -> nn.Module:
    """A random ``transformers.CLIPModel`` (``CLIPVisionConfig`` / ``CLIPTextConfig`` fields in
    ``vision`` / ``text``) saved with a word-level tokenizer over ``words``, as ``save_pretrained``
    lays a model directory out. Returns the model."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=dict(text), vision_config=dict(vision),
                                                           projection_dim=projection_dim))
    model.save_pretrained(root)
    word_tokenizer(words).save_pretrained(root)
    return model


def llama_classifier(root: str | Path, *, words: Sequence[str], seed: int = 0, **config) -> nn.Module:
    """A random ``LlamaForSequenceClassification`` (``LlamaConfig`` fields in ``config``; pad id 0, the
    word-level tokenizer's) saved with that tokenizer over ``words``. Returns the model."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(pad_token_id=0, **config))
    model.save_pretrained(root)
    word_tokenizer(words).save_pretrained(root)
    return model
