"""``bench.kind: open_clip``: an open_clip architecture (``arch``, e.g. ``ViT-B-32``) with local
pretrained ``weights`` (a ``.pt`` / ``.bin`` / ``.safetensors`` file).

Every task gives its PEFT ``adapter`` (or full ``checkpoint``) and an ``ImageFolder`` ``data`` root
(``ROOT/<split>/<class>/<image>``); zero-shot heads come from the text tower (class names ×
templates). The image tower's packed attention is split into ``q_proj`` / ``k_proj`` / ``v_proj`` /
``out_proj`` (:mod:`mergelab.model.attention`), its MLP is ``mlp.c_fc`` / ``mlp.c_proj``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from mergelab.bench.benches import Bench, BenchKind, BenchSpec, Tasks, TaskSource, file_digest, folder_id, task_id, task_sources
from mergelab.errors import InputError
from mergelab.naming import ModuleLayout
from mergelab.strict import Int

if TYPE_CHECKING:
    from mergelab.model import Backbone

__all__ = ["IMAGE_FOLDER", "KIND", "OPEN_CLIP_LAYOUT", "OpenClipSpec", "folder_bench"]

#: An open_clip image tower with split attention: ``transformer.resblocks.N.{attn.*_proj, mlp.c_fc, mlp.c_proj}``.
OPEN_CLIP_LAYOUT = ModuleLayout(
    blocks=r"(?:^|\.)resblocks\.(\d+)\.",
    kinds=(("q", r"\.attn\.q_proj\."), ("k", r"\.attn\.k_proj\."), ("v", r"\.attn\.v_proj\."),
           ("qkv", r"\.attn\.in_proj_weight$"), ("out", r"\.attn\.out_proj\."),
           ("mlp_in", r"\.mlp\.c_fc\."), ("mlp_out", r"\.mlp\.c_proj\.")),
)
#: The data layout of an image task.
IMAGE_FOLDER = "ROOT/<split>/<class>/<image>"


class OpenClipSpec(BenchSpec):
    """``arch``: the open_clip architecture; ``weights``: its local pretrained weights file;
    ``image_size``: the tasks' image size (``None``: the architecture's)."""

    kind: Literal["open_clip"] = "open_clip"
    arch: str | None = None
    weights: Path | None = None
    image_size: Int | None = None
    image_folders: ClassVar[bool] = True

    @property
    def base_weights(self) -> Path | None:
        return self.weights


def folder_bench(name: str, backbone: Backbone, kind: str, image_size: int | None, tasks: Tasks, model_id: dict[str, Any]) -> Bench:
    """A bench of ``ImageFolder`` tasks (:func:`~mergelab.data.folder.folder_task`) on ``backbone``;
    ``model_id`` gains the image size (``open_clip`` and ``hf_clip``)."""
    from mergelab.data.folder import DEFAULT_TEMPLATES, folder_task

    sources = task_sources(tasks, kind, IMAGE_FOLDER)
    size = image_size or backbone.image_size
    built = {t.name: folder_task(t.data, name=t.name, image_size=size, classnames=t.classnames,
                                 templates=tuple(t.templates) if t.templates else DEFAULT_TEMPLATES) for t in sources}
    # no "kind" field: the data ids (and so the evaluation keys) of open_clip benches stay what they were
    return Bench(name, backbone, built, [(t.name, Path(t.adapter or t.checkpoint)) for t in sources], {**model_id, "size": size},
                 {t.name: (task_id(built[t.name]), folder_id(Path(t.data))) for t in sources})


def load(spec: OpenClipSpec, tasks: Tasks) -> Bench:
    """The architecture with its weights (image tower split), and the tasks' folders."""
    import open_clip

    from mergelab.model import open_clip_backbone

    if not spec.arch or spec.weights is None:
        raise InputError("bench: open_clip needs arch (e.g. ViT-B-32) and weights (a local .pt/.bin/.safetensors file)")
    if not Path(spec.weights).is_file():
        raise InputError(f"bench.weights: {spec.weights} does not exist; give the local pretrained weights file")
    model = open_clip.create_model(spec.arch, pretrained=str(spec.weights))
    model.eval()
    return folder_bench(spec.arch, open_clip_backbone(model), spec.kind, spec.image_size, tasks,
                        {"arch": spec.arch, "weights": file_digest(Path(spec.weights))})


def example(folder: Path) -> tuple[OpenClipSpec, Tasks]:
    """A random open_clip model of the micro benchmark's architecture saved as a weights file, and two
    image-folder tasks with a rank-2 LoRA each on the MLPs of its image tower, written into ``folder``: the
    kind's example (:mod:`mergelab.conformance`)."""
    import copy

    from mergelab.model.openclip_backend import MICRO_ARCH, register_configs
    from mergelab.synthetic import image_folders, open_clip_checkpoint, write_peft_adapters

    register_configs()
    tasks = ["shapes", "colours"]
    model = open_clip_checkpoint(folder / "weights.pt", MICRO_ARCH)
    adapters = write_peft_adapters(copy.deepcopy(model.visual), folder / "adapters", tasks, target_modules=["c_fc", "c_proj"],
                                   rank=2, alpha=4)
    data = image_folders(folder / "data", tasks, ["ring", "dot"])
    return OpenClipSpec(arch=MICRO_ARCH, weights=folder / "weights.pt"), [
        TaskSource(name=t, adapter=a, data=Path(data[t])) for t, a in zip(tasks, adapters, strict=True)]


KIND = BenchKind(OpenClipSpec, load, OPEN_CLIP_LAYOUT, example=example)
