"""``bench.kind: sentence_encoder``: a local BERT-family sentence encoder (a sentence-transformers
directory, or a plain ``save_pretrained`` BERT directory) as ``weights``.

**Model.** The ``transformers`` ``AutoModel`` of the directory's ``Transformer`` module
(``modules.json``; the directory itself when there is none), pooled as its ``Pooling`` module's
``config.json`` says (mean over the non-padding tokens, or the first token) and L2-normalised when
``modules.json`` lists ``Normalize``; ``pooling`` sets the pooling of a directory without a
``Pooling`` module. Other modules (``Dense``, …) and pooling modes are refused. The model's
``pooler`` is dropped: sentence-transformers never reads it. The merged encoder is the whole
``AutoModel``; LoRA adapters (PEFT, on the model as loaded here) target its ``query`` / ``key`` /
``value`` / ``dense`` projections (``encoder.layer.N.attention.self.{query,key,value}``,
``attention.output.dense``, ``intermediate.dense``, ``output.dense``).

**Tasks.** Folders of text rows, as :mod:`mergelab.data.text` reads them
(``ROOT/{train,val,test}.{csv,jsonl}``, a ``text`` and a ``label`` per row); a task's
``templates`` turn its class names into label prompts (default ``"{}"``: the name itself).

**Heads** (``heads``):

* ``zero_shot`` (default): per class the normalised mean of its label prompts' embeddings, computed
  once with the frozen *base* encoder, times ``logit_scale`` — the analogue of CLIP's frozen text
  head (001 App. C.2). The joint task pools every task's labels as for CLIP.
* ``linear``: per task a bias-free linear head, fitted once on the task's train rows to its own
  fine-tuned encoder's embeddings (multinomial logistic regression, :func:`fit_linear_head`) and
  then frozen: the papers' protocol of a head per task (001 Tab. 2, 003 Tab. 2) for adapters that
  bring none. Each task is scored with its own head, so there is no joint task.

``logit_scale`` (default 20, the scale of sentence-transformers' contrastive loss the MiniLM
encoders were trained with) sets how sharp the zero-shot heads' softmax is: what the entropy
objectives of the adaptive methods see. ``max_length``: the token length texts are truncated to.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from mergelab.bench.benches import Bench, BenchKind, BenchSpec, Tasks, TaskSource, directory_digest, folder_id, model_directory, \
    pretrained, task_id, task_sources
from mergelab.bench.kinds.hf_seq_cls import TEXT_ROWS
from mergelab.errors import InputError
from mergelab.naming import ModuleLayout
from mergelab.strict import Float, Int

if TYPE_CHECKING:  # the model code imports torch when it runs: validating a study never does
    from torch import Tensor, nn

__all__ = ["BERT_LAYOUT", "KIND", "POOLING", "SentenceEncoder", "SentenceEncoderSpec", "fit_linear_head", "read_encoder",
           "sentence_pipeline"]

#: A BERT-family encoder: ``encoder.layer.N.{attention.self.{query,key,value}, attention.output.dense, intermediate.dense, output.dense}``.
BERT_LAYOUT = ModuleLayout(
    blocks=r"(?:^|\.)layer\.(\d+)\.",
    kinds=(("q", r"\.attention\.self\.query\."), ("k", r"\.attention\.self\.key\."), ("v", r"\.attention\.self\.value\."),
           ("out", r"\.attention\.output\.dense\."), ("mlp_in", r"\.intermediate\.dense\."), ("mlp_out", r"\.layer\.\d+\.output\.dense\.")),
)


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """``(N, W)`` mean of the final hidden states ``(N, L, W)`` over the tokens ``mask`` ``(N, L)`` keeps."""
    weights = mask[..., None].to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def cls_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """``(N, W)`` final hidden state of the first token (``[CLS]``)."""
    return hidden[:, 0]


#: Pooling modes: the name sentence-transformers' ``Pooling`` config gives each (``pooling_mode_<key>``) and its function.
POOLING: dict[str, tuple[str, Callable[[Tensor, Tensor], Tensor]]] = {"mean": ("mean_tokens", mean_pool), "cls": ("cls_token", cls_pool)}


class SentenceEncoderSpec(BenchSpec):
    """``weights``: the encoder's directory; ``heads``: ``zero_shot`` or ``linear``; ``pooling``: for
    a directory without a ``Pooling`` module; ``logit_scale``: the zero-shot heads' scale;
    ``max_length``: the token length of the inputs."""

    kind: Literal["sentence_encoder"] = "sentence_encoder"
    weights: Path | None = None
    heads: Literal["zero_shot", "linear"] = "zero_shot"
    pooling: Literal["mean", "cls"] | None = None
    logit_scale: Float = Field(20.0, gt=0)
    max_length: Int = Field(128, ge=1)

    @property
    def own_heads(self) -> bool:
        return self.heads == "linear"


@dataclass(eq=False)
class SentenceEncoder:
    """A :class:`~mergelab.model.base.Backbone` over a sentence encoder: token ids ``(N, L)`` are its
    "images", the pooled sentence embedding its features, the label prompts' embeddings (base
    weights) its zero-shot heads."""

    vision: nn.Module
    tokenizer: Callable[[Sequence[str]], Tensor]
    pooling: Literal["mean", "cls"]
    normalize: bool
    pad: int
    logit_scale: float
    image_size: int
    linear_heads: bool = False
    name: str = "sentence_encoder"

    def __post_init__(self) -> None:
        self.vision.eval()

    def base_state(self) -> dict[str, Tensor]:
        from mergelab.model.base import vision_state

        return vision_state(self.vision)

    def lora_targets(self) -> list[str]:
        """The ``query`` / ``key`` / ``value`` / ``dense`` projections of every block (PEFT ``target_modules``)."""
        from torch import nn

        return [name for name, module in self.vision.named_modules()
                if isinstance(module, nn.Linear) and BERT_LAYOUT.role(f"{name}.weight") != "other"]

    def _hidden(self, ids: Tensor, params: Mapping[str, Tensor] | None) -> tuple[Tensor, Tensor]:
        from mergelab.model.base import run_functional

        mask = (ids != self.pad).long()
        return run_functional(self.vision, params, input_ids=ids, attention_mask=mask).last_hidden_state, mask

    def pooled(self, module: nn.Module, ids: Tensor) -> Tensor:
        """``(N, W)`` pooled, unnormalised embeddings of token ids through ``module``: the encoder or an
        adapted copy of it (a PEFT model being trained). Columns that are padding in every row are cut first."""
        from mergelab.model.base import without_trailing_padding

        ids = without_trailing_padding(ids, self.pad)
        mask = (ids != self.pad).long()
        return POOLING[self.pooling][1](module(input_ids=ids, attention_mask=mask).last_hidden_state, mask)

    def encode_image(self, images: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """``(N, D)`` sentence embeddings of token ids (normalised when the encoder's pipeline normalises);
        rows of about one length run together (:func:`~mergelab.model.base.by_length`)."""
        import torch.nn.functional as F

        from mergelab.model.base import by_length

        pooled = by_length(lambda ids: POOLING[self.pooling][1](*self._hidden(ids, params)), images, self.pad)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    def image_tokens(self, images: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """``(N, L, W)`` final hidden states (padding positions included)."""
        return self._hidden(images, params)[0]

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """``(N, D)`` embeddings of texts with the base weights (the zero-shot heads' prompts)."""
        return self.encode_image(self.tokenizer(list(texts)))


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"bench.weights: cannot read {what} {path} ({err}); re-save the encoder with sentence-transformers") from None


def _pooling_mode(config: Mapping[str, Any], where: Path) -> Literal["mean", "cls"]:
    """The one pooling mode a sentence-transformers ``Pooling`` config switches on."""
    on = sorted(key.removeprefix("pooling_mode_") for key, value in config.items() if key.startswith("pooling_mode_") and value is True)
    known = {key: mode for mode, (key, _) in POOLING.items()}
    if len(on) != 1 or on[0] not in known:
        raise InputError(f"bench.weights: {where} pools by {on or 'nothing'}; the sentence_encoder bench pools by exactly one of "
                         f"{', '.join(f'pooling_mode_{k}' for k in known)}")
    return known[on[0]]


def sentence_pipeline(root: Path, pooling: Literal["mean", "cls"] | None) -> tuple[Path, Literal["mean", "cls"], bool]:
    """``(transformer directory, pooling mode, normalise)`` of a sentence-transformers directory
    (``modules.json``), or of a plain encoder directory pooled by ``pooling`` (not normalised)."""
    if not (root / "modules.json").is_file():
        if pooling is None:
            raise InputError(f"bench.weights: {root} has no modules.json (a plain encoder); set bench.pooling: mean or cls")
        return root, pooling, False
    modules = {str(m.get("type", "")).rsplit(".", 1)[-1]: root / str(m.get("path", ""))
               for m in _read_json(root / "modules.json", "the module list")}
    unsupported = sorted(set(modules) - {"Transformer", "Pooling", "Normalize"})
    if unsupported or "Transformer" not in modules:
        raise InputError(f"bench.weights: {root}/modules.json lists {unsupported or 'no Transformer'}; the sentence_encoder bench "
                         "reads a Transformer, then Pooling and optionally Normalize")
    if "Pooling" in modules:
        pooling = _pooling_mode(_read_json(modules["Pooling"] / "config.json", "the pooling config"), modules["Pooling"])
    elif pooling is None:
        raise InputError(f"bench.weights: {root}/modules.json lists no Pooling module; set bench.pooling: mean or cls")
    return modules["Transformer"], pooling, "Normalize" in modules


def fit_linear_head(features: Tensor, labels: Tensor, classes: int, *, l2: float = 1e-3, iters: int = 100) -> Tensor:
    """``(C, D)`` bias-free multinomial logistic-regression head on fixed ``(N, D)`` features:
    ``argmin_W CE(features Wᵀ, labels) + l2 ‖W‖²``, L-BFGS from zero in float64 (deterministic)."""
    import torch
    import torch.nn.functional as F

    X = features.detach().double()
    W = torch.zeros(classes, X.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([W], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def loss() -> Tensor:
        optimizer.zero_grad()
        value = F.cross_entropy(X @ W.T, labels) + l2 * W.pow(2).sum()
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(loss)
    return W.detach().float()


def _linear_heads(bench: Bench) -> dict[str, Tensor]:
    """Each task's :func:`fit_linear_head` on its train rows' embeddings under its fine-tuned weights."""
    from mergelab.evaluation.metrics import image_features
    from mergelab.taskset import add_updates

    base = bench.backbone.base_state()
    heads = {}
    for update in bench.taskset:
        task = bench.tasks[update.name]
        ids, labels = task.tensors("train")
        features = image_features(bench.backbone, ids, add_updates(base, update.modules))
        heads[update.name] = fit_linear_head(features, labels, task.num_classes)
    return heads


def read_encoder(root: Path, pooling: Literal["mean", "cls"] | None = None, *, logit_scale: float = 20.0, max_length: int = 128,
                 linear_heads: bool = False) -> tuple[SentenceEncoder, Path]:
    """``(backbone, transformer directory)`` of a sentence-transformers (or plain, pooled by ``pooling``)
    encoder directory: the model as its pipeline says, its pooler dropped, texts tokenized to ``max_length``."""
    import transformers

    encoder_dir, pooling, normalize = sentence_pipeline(root, pooling)
    model, tokenizer = pretrained(lambda: (transformers.AutoModel.from_pretrained(str(encoder_dir), local_files_only=True),
                                           transformers.AutoTokenizer.from_pretrained(str(encoder_dir), local_files_only=True)),
                                  encoder_dir, "transformers encoder with its tokenizer")
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # sentence-transformers pools the hidden states; the pooler is never read (nor merged)
    if tokenizer.pad_token_id is None:
        raise InputError(f"bench.weights: {encoder_dir}'s tokenizer has no pad token; the encoder masks padding by it")

    def tokenize(texts: Sequence[str]) -> Tensor:
        return tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]

    backbone = SentenceEncoder(model, tokenize, pooling, normalize, int(tokenizer.pad_token_id), logit_scale, max_length,
                               linear_heads=linear_heads)
    if not backbone.lora_targets():
        raise InputError(f"bench.weights: {type(model).__name__} has no encoder.layer.N.attention.self.query/key/value projections; "
                         "the sentence_encoder bench reads BERT-family encoders (BERT, MiniLM, RoBERTa, MPNet-style names)")
    return backbone, encoder_dir


def load(spec: SentenceEncoderSpec, tasks: Tasks) -> Bench:
    """The encoder, pooled as its pipeline says; the tasks' text rows with label prompts; the heads ``spec.heads`` names."""
    from mergelab.data.text import text_task

    root = Path(spec.weights or "")
    if spec.weights is None or not (root / "modules.json").is_file():
        root = model_directory(spec.weights, spec.kind, "sentence-transformers (modules.json) or BERT")
    sources = task_sources(tasks, spec.kind, TEXT_ROWS)
    backbone, encoder_dir = read_encoder(root, spec.pooling, logit_scale=spec.logit_scale, max_length=spec.max_length,
                                         linear_heads=spec.heads == "linear")
    built = {t.name: replace(text_task(t.data, tokenize=backbone.tokenizer, name=t.name, classnames=t.classnames),
                             templates=tuple(t.templates or ("{}",))) for t in sources}
    model_id = {"kind": spec.kind, "weights": directory_digest(encoder_dir), "pooling": backbone.pooling, "normalize": backbone.normalize,
                "heads": spec.heads, "logit_scale": spec.logit_scale, "max_length": spec.max_length}
    task_ids = {t.name: (task_id(built[t.name]), folder_id(Path(t.data))) for t in sources}
    bench = Bench(root.name, backbone, built, [(t.name, Path(t.adapter or t.checkpoint)) for t in sources], model_id, task_ids)
    if spec.heads == "zero_shot":
        return bench
    fitted = {u.name: (*task_ids[u.name], u.content_hash) for u in bench.taskset}  # a fitted head follows its task's update
    return replace(bench, task_ids=fitted, heads=_linear_heads(bench))


def example(folder: Path) -> tuple[SentenceEncoderSpec, Tasks]:
    """A random 2-block BERT sentence encoder and two text tasks with a rank-2 LoRA each on its
    ``query/key/value/dense``, written into ``folder``: the kind's example (:mod:`mergelab.conformance`)."""
    import transformers

    from mergelab.synthetic import sentence_encoder_directory, text_folders, write_peft_adapters

    classes = {"weather": ["sun", "rain"], "animals": ["cat", "dog"]}
    words = ["the", "a", "is", *(w for names in classes.values() for w in names)]
    encoder = sentence_encoder_directory(folder / "encoder", words)
    data = text_folders(folder / "data", classes, words)
    model = transformers.BertModel.from_pretrained(str(encoder), add_pooling_layer=False)
    adapters = write_peft_adapters(model, folder / "adapters", list(classes), target_modules=["query", "key", "value", "dense"],
                                   rank=2, alpha=4, std=0.3)
    return (SentenceEncoderSpec(weights=encoder, max_length=16),
            [TaskSource(name=t, adapter=a, data=Path(data[t])) for t, a in zip(classes, adapters, strict=True)])


KIND = BenchKind(SentenceEncoderSpec, load, BERT_LAYOUT, example=example)
