"""``bench.kind: hf_seq_cls``: a local ``AutoModelForSequenceClassification`` directory (a decoder
classifier with a ``score`` head, e.g. LLaMA; 001 Tab. 2, 003 Tab. 2) as ``weights``.

Every task gives its PEFT ``adapter``, whose ``modules_to_save`` hold the task's own trained head,
and a ``data`` folder of ``{train,val,test}.{csv,jsonl}`` rows (text, label;
:mod:`mergelab.data.text`). Merging merges the LoRA part; each task is evaluated with its own head,
so there is no joint task. ``max_length``: the token length texts are padded / truncated to.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from mergelab.bench.benches import Bench, BenchKind, BenchSpec, Tasks, TaskSource, directory_digest, file_digest, folder_id, \
    model_directory, pretrained, task_id, task_sources
from mergelab.errors import InputError
from mergelab.naming import ModuleLayout
from mergelab.strict import Int

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["DECODER_LAYOUT", "KIND", "TEXT_ROWS", "HfSeqClsSpec"]

#: A LLaMA-family decoder (LLaMA, Mistral, Qwen, Gemma): ``model.layers.N.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj}``.
DECODER_LAYOUT = ModuleLayout(
    blocks=r"(?:^|\.)layers\.(\d+)\.",
    kinds=(("q", r"\.self_attn\.q_proj\."), ("k", r"\.self_attn\.k_proj\."), ("v", r"\.self_attn\.v_proj\."),
           ("out", r"\.self_attn\.o_proj\."), ("mlp_in", r"\.mlp\.(?:gate|up)_proj\."), ("mlp_out", r"\.mlp\.down_proj\.")),
)
#: The data layout of a text task (:mod:`mergelab.data.text`).
TEXT_ROWS = "ROOT/{train,val,test}.{csv,jsonl} rows of text and label"


class HfSeqClsSpec(BenchSpec):
    """``weights``: the classifier's directory; ``max_length``: the token length of its inputs."""

    kind: Literal["hf_seq_cls"] = "hf_seq_cls"
    weights: Path | None = None
    max_length: Int = Field(128, ge=1)

    @property
    def own_heads(self) -> bool:
        return True

    @property
    def base_weights(self) -> Path | None:
        return self.weights


def load(spec: HfSeqClsSpec, tasks: Tasks) -> Bench:
    """The classifier with its tokenizer; each task's adapter brings its own ``score`` head."""
    import transformers
    from torch import nn

    from mergelab.checkpoints import saved_modules
    from mergelab.checkpoints.files import ADAPTER_WEIGHTS, weights_file
    from mergelab.data.text import text_task
    from mergelab.model import hf_sequence_backbone

    root = model_directory(spec.weights, spec.kind, "AutoModelForSequenceClassification")
    sources = task_sources(tasks, spec.kind, TEXT_ROWS, needs="adapter, data")
    model, tokenizer = pretrained(lambda: (transformers.AutoModelForSequenceClassification.from_pretrained(str(root), local_files_only=True),
                                           transformers.AutoTokenizer.from_pretrained(str(root), local_files_only=True)),
                                  root, "sequence classifier with its tokenizer")
    head = getattr(model, "score", None)
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise InputError(f"bench.weights: {type(model).__name__} has no bias-free score head; hf_seq_cls evaluates decoder "
                         "classifiers whose head reads the last token (LLaMA, Mistral, Qwen, Gemma)")
    pad = model.config.pad_token_id
    if tokenizer.pad_token_id is None and pad is not None:
        tokenizer.pad_token_id = pad
    if tokenizer.pad_token_id is None or pad is None or tokenizer.pad_token_id != pad:
        raise InputError(f"bench.weights: the model's pad_token_id ({pad}) and the tokenizer's ({tokenizer.pad_token_id}) must "
                         "be set and equal (the head reads the last non-padding token); set pad_token_id in config.json")
    tokenizer.padding_side = "right"

    def tokenize(texts: Sequence[str]) -> Tensor:
        return tokenizer(list(texts), padding="max_length", truncation=True, max_length=spec.max_length, return_tensors="pt")["input_ids"]

    built, heads = {}, {}
    for t in sources:
        if t.adapter is None:
            raise InputError(f"tasks: {t.name} needs an adapter (with its trained head) and a data folder")
        own = saved_modules(t.adapter)
        if "score.weight" not in own:
            raise InputError(f"tasks: {t.name}'s adapter {t.adapter} saves no score head (modules_to_save); train it with "
                             "task_type='SEQ_CLS' so that each task keeps its own classifier")
        built[t.name] = text_task(t.data, tokenize=tokenize, name=t.name, classnames=t.classnames)
        heads[t.name] = own["score.weight"].float()
        if heads[t.name].shape[0] != built[t.name].num_classes:
            raise InputError(f"tasks: {t.name}'s head has {heads[t.name].shape[0]} classes, its data {built[t.name].num_classes} "
                             f"({list(built[t.name].classnames)[:5]}); give classnames in head order")
    model_id = {"kind": "hf_seq_cls", "weights": directory_digest(root), "max_length": spec.max_length}
    task_ids = {t.name: (task_id(built[t.name]), folder_id(Path(t.data)), file_digest(weights_file(Path(t.adapter), ADAPTER_WEIGHTS)))
                for t in sources}
    backbone = hf_sequence_backbone(model.eval(), tokenizer=tokenize, linear_heads=True)
    return Bench(root.name, backbone, built, [(t.name, Path(t.adapter)) for t in sources], model_id, task_ids, heads)


def example(folder: Path) -> tuple[HfSeqClsSpec, Tasks]:
    """A random 2-block ``LlamaForSequenceClassification`` directory and two text tasks, each with a rank-2
    SEQ_CLS LoRA on ``q_proj`` / ``v_proj`` and its own ``score`` head (3 named labels; 2 index labels),
    written into ``folder``: the kind's example (:mod:`mergelab.conformance`)."""
    import transformers

    from mergelab.synthetic import llama_classifier, text_folders, write_peft_adapters

    tasks = {"nli": ["entailment", "neutral", "contradiction"], "sentiment": None}
    words = ["good", "bad", "yes", "no", "cat", "dog"]
    llama_classifier(folder / "llama", words=words, vocab_size=len(words) + 2, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, num_labels=2)
    adapters = {}
    for seed, (task, names) in enumerate(tasks.items()):
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            str(folder / "llama"), num_labels=len(names or (0, 1)), ignore_mismatched_sizes=True, local_files_only=True)
        adapters[task] = write_peft_adapters(model.eval(), folder / "adapters", [task], seed=seed, rank=2, alpha=4, std=0.3,
                                             task_type="SEQ_CLS", target_modules=["q_proj", "v_proj"])[0]
    data = text_folders(folder / "data", tasks, words)
    return HfSeqClsSpec(weights=folder / "llama", max_length=8), [
        TaskSource(name=t, adapter=adapters[t], data=Path(data[t]), classnames=names) for t, names in tasks.items()]


KIND = BenchKind(HfSeqClsSpec, load, DECODER_LAYOUT, example=example)
