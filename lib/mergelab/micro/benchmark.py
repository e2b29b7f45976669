"""The micro benchmark's tasks: eight classification tasks and a heterogeneous dense suite.

Eight tasks mirror the papers' eight (001 Sec. 4, App. C.1) in structure:

===============  ==========  =================================================  ========
task             analogue    source                                             classes
===============  ==========  =================================================  ========
digits           MNIST       scikit-learn's bundled handwritten digits (real)   10
housenumbers     SVHN        procedural: digits on clutter                      10
textures         DTD         crops of scikit-image's bundled photographs (real) 22
signs            GTSRB       procedural: traffic-sign-like glyphs               23
landcover        EuroSAT     procedural: land-cover fields                      10
aerial           RESISC45    procedural: structures on terrains                 28
scenes           SUN397      procedural: ground type × time of day              24
vehicles         Cars        procedural: body type × paint colour               35
===============  ==========  =================================================  ========

``digits`` and ``housenumbers`` share their class names ("zero" … "nine"), so their joint label
space de-duplicates them (:func:`mergelab.data.tasks.joint_label_space`). Every split is
regenerated on use from ``(seed, task, split)`` with numpy's PCG64, identically on every machine;
nothing generated is shipped. The ``pretrain`` split feeds the contrastive pre-training mixture and
never overlaps val/test: procedural tasks draw it from its own random stream, ``digits`` reuses
its train images, ``textures`` crops from the train band of each photograph.

The dense suite (004 Sec. 4.1 analogue) shares one image stream among four tasks with different
output spaces: per-patch segmentation, per-patch depth-like regression, keypoint regression and
shape classification.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mergelab.data import procedural as proc
from mergelab.data import scenes
from mergelab.data.render import resize
from mergelab.data.tasks import ClassificationTask, DenseTask, Split, to_uint8
from mergelab.errors import InputError

if TYPE_CHECKING:
    from mergelab.taskset import TaskSet

__all__ = ["DENSE_TASKS", "IMAGE_SIZE", "PROFILES", "TASKS", "Micro", "TaskSpec", "dense_suite", "load_micro", "micro_root",
           "aliases", "micro_tasks", "pretrain_captions"]

IMAGE_SIZE = 24
PATCH = 6
SPLIT_IDS = {"train": 0, "val": 1, "test": 2, "pretrain": 3}

#: Images per split for each build profile (digits has a fixed size: 60 / 10 / 30 % of 1,797).
PROFILES: dict[str, dict[str, int]] = {
    "full": {"train": 1500, "val": 200, "test": 500, "pretrain": 2500, "dense_train": 1200, "dense_val": 200, "dense_test": 400},
    "quick": {"train": 300, "val": 100, "test": 200, "pretrain": 400, "dense_train": 200, "dense_val": 50, "dense_test": 100},
}

Sampler = Callable[[np.random.Generator, str, int], Split]


@dataclass(frozen=True)
class TaskSpec:
    """How one micro task is made: names, prompts, a class-free caption and a split sampler."""

    name: str
    analogue: str
    source: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    caption: str
    sample: Sampler


def _rng(seed: int, task_index: int, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, task_index, SPLIT_IDS[split]])


def _procedural(draw: proc.Drawer, num_classes: int) -> Sampler:
    """Balanced labels in random order, one drawn image each."""

    def sample(rng: np.random.Generator, split: str, n: int) -> Split:
        labels = rng.permutation(np.arange(n) % num_classes)
        images = np.stack([draw(rng, int(y), IMAGE_SIZE) for y in labels])
        return Split(to_uint8(images), labels.astype(np.int64))

    return sample


@cache
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images / 16.0, data.target.astype(np.int64)


def _digits(rng: np.random.Generator, split: str, n: int) -> Split:
    """scikit-learn's 8 × 8 handwritten digits, upsampled, jittered in position, white on black.

    The permutation that assigns images to splits is fixed (seed 0 of its own stream), so the
    splits never overlap whatever the task seed; ``pretrain`` reuses the train images.
    """
    images, labels = _sklearn_digits()
    order = np.random.default_rng(0).permutation(len(labels))
    cut_train, cut_val = int(0.6 * len(order)), int(0.7 * len(order))
    part = {"train": order[:cut_train], "pretrain": order[:cut_train], "val": order[cut_train:cut_val], "test": order[cut_val:]}[split][:n]
    out = np.zeros((len(part), IMAGE_SIZE, IMAGE_SIZE, 3))
    for i, k in enumerate(part):
        glyph = resize(images[k], 18) * rng.uniform(0.75, 1.0)
        y, x = rng.integers(1, IMAGE_SIZE - 18, 2)
        out[i, y:y + 18, x:x + 18] = glyph[..., None]
    return Split(to_uint8(out), labels[part])


#: (class name, scikit-image photograph) of the texture task.
TEXTURES = (("brick", "brick"), ("grass", "grass"), ("gravel", "gravel"), ("coins", "coins"), ("printed text", "text"),
            ("book page", "page"), ("lunar craters", "moon"), ("checkerboard", "checkerboard"),
            ("galaxies in deep space", "hubble_deep_field"), ("stained tissue", "immunohistochemistry"),
            ("retina blood vessels", "retina"), ("cells under a microscope", "cell"), ("coffee cup", "coffee"),
            ("cat fur", "chelsea"), ("astronaut", "astronaut"), ("rocket launch", "rocket"), ("color wheel", "colorwheel"),
            ("wall clock", "clock"), ("horse silhouette", "horse"), ("logo graphic", "logo"), ("cameraman", "camera"),
            ("retinal microaneurysms", "microaneurysms"))
#: Horizontal bands of each photograph per split (fractions of its height): disjoint pixels.
_BANDS = {"train": (0.0, 0.6), "pretrain": (0.0, 0.6), "val": (0.6, 0.8), "test": (0.8, 1.0)}


@cache
def _photo(name: str) -> np.ndarray:
    import skimage.data

    image = np.asarray(getattr(skimage.data, name)(), dtype=np.float64)
    image = image / 255.0 if image.max() > 1 else image
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return image[..., :3]


def _textures(rng: np.random.Generator, split: str, n: int) -> Split:
    """Random crops (flipped / rotated) from one horizontal band of each photograph."""
    labels = rng.permutation(np.arange(n) % len(TEXTURES))
    out = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 3))
    lo, hi = _BANDS[split]
    for i, y in enumerate(labels):
        photo = _photo(TEXTURES[y][1])
        h, w = photo.shape[:2]
        top, bottom = int(lo * h), int(hi * h)
        crop = int(min(bottom - top, w, rng.integers(28, 64)))
        y0, x0 = rng.integers(top, bottom - crop + 1), rng.integers(0, w - crop + 1)
        patch = resize(photo[y0:y0 + crop, x0:x0 + crop], IMAGE_SIZE)
        out[i] = np.rot90(patch[:, ::-1] if rng.random() < 0.5 else patch, k=int(rng.integers(4)))
    return Split(to_uint8(out), labels.astype(np.int64))


DIGIT_NAMES = proc.DIGIT_NAMES

#: The eight micro tasks, in the papers' order of analogues (Cars, DTD, EuroSAT, GTSRB, MNIST, RESISC45, SUN397, SVHN).
TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("vehicles", "Cars", "procedural", tuple(v[0] for v in proc.VEHICLES),
             ("a photo of a {}.", "a photo of a {}, a type of car.", "a side view of a {}."), "a photo of a car",
             _procedural(proc.draw_vehicle, len(proc.VEHICLES))),
    TaskSpec("textures", "DTD", "scikit-image photographs", tuple(t[0] for t in TEXTURES),
             ("a photo of a {} texture.", "a close-up photo of {}.", "a {} pattern."), "a close-up photo of a texture",
             _textures),
    TaskSpec("landcover", "EuroSAT", "procedural", tuple(c[0] for c in proc.LANDCOVER),
             ("a centered satellite photo of {}.", "a satellite photo of {}.", "satellite imagery of {}."), "a satellite photo of land",
             _procedural(proc.draw_landcover, len(proc.LANDCOVER))),
    TaskSpec("signs", "GTSRB", "procedural", tuple(s.name for s in proc.SIGNS),
             ('a zoomed in photo of a "{}" traffic sign.', 'a centered photo of a "{}" traffic sign.', 'a close up photo of a "{}" traffic sign.'),
             "a photo of a traffic sign", _procedural(proc.draw_sign, len(proc.SIGNS))),
    TaskSpec("digits", "MNIST", "scikit-learn handwritten digits", DIGIT_NAMES,
             ('a photo of the number: "{}".', "a handwritten digit {}.", "the number {} written by hand."), "a handwritten digit",
             _digits),
    TaskSpec("aerial", "RESISC45", "procedural", tuple(a[0] for a in proc.AERIAL),
             ("satellite imagery of a {}.", "an aerial photograph of a {}.", "a satellite photo of a {}."), "an aerial photograph",
             _procedural(proc.draw_aerial, len(proc.AERIAL))),
    TaskSpec("scenes", "SUN397", "procedural", tuple(s[0] for s in scenes.SCENES),
             ("a photo of a {}.", "a picture of a {}.", "a landscape photo of a {}."), "a photo of a landscape",
             _procedural(scenes.draw_scene, len(scenes.SCENES))),
    TaskSpec("housenumbers", "SVHN", "procedural", DIGIT_NAMES,
             ('a photo of the house number: "{}".', "a street address with the number {}.", "the number {} on a house."),
             "a photo of a house number", _procedural(proc.draw_house_number, 10)),
)}


def _sizes(profile: str) -> dict[str, int]:
    if profile not in PROFILES:
        raise InputError(f"unknown micro profile {profile!r}; choose one of {sorted(PROFILES)}")
    return PROFILES[profile]


def micro_tasks(seed: int = 0, profile: str = "full", names: tuple[str, ...] | None = None) -> dict[str, ClassificationTask]:
    """The micro tasks (all eight by default), splits generated lazily and deterministically."""
    sizes = _sizes(profile)
    names = tuple(TASKS) if names is None else names
    unknown = sorted(set(names) - set(TASKS))
    if unknown:
        raise InputError(f"unknown micro task(s) {unknown}; choose from {list(TASKS)}")
    out = {}
    for name in names:
        spec, index = TASKS[name], list(TASKS).index(name)

        def make(split: str, spec: TaskSpec = spec, index: int = index) -> Split:
            if split not in SPLIT_IDS:
                raise InputError(f"unknown split {split!r}; choose one of {list(SPLIT_IDS)}")
            return spec.sample(_rng(seed, index, split), split, sizes[split])

        out[name] = ClassificationTask(name, spec.classnames, spec.templates, make, source=spec.source,
                                       analogue=spec.analogue, caption=spec.caption)
    return out


_SYLLABLES = tuple(c + v for c in "bdfgklmnprstvz" for v in "aeiou")


def aliases(num_classes: int, rng: np.random.Generator) -> tuple[str, ...]:
    """Distinct made-up words (two or three syllables), one per class: the pre-training corpus's own names."""
    out: list[str] = []
    while len(out) < num_classes:
        word = "".join(_SYLLABLES[i] for i in rng.integers(len(_SYLLABLES), size=int(rng.integers(2, 4))))
        if word not in out:
            out.append(word)
    return tuple(out)


def pretrain_captions(task: ClassificationTask, labels: np.ndarray, seen: np.ndarray, alias: Sequence[str],
                      rng: np.random.Generator, name_prob: float) -> list[str]:
    """Captions for pre-training images: a prompt naming the class, or the task's class-free caption.

    With probability ``name_prob`` a caption names the class: by its class name when the class is
    ``seen``, otherwise by its ``alias``, a made-up word never used by the evaluation prompts (a
    long-tail class the web calls something else). So the image features learn to tell every class
    apart, while zero-shot heads built from the class names only know the seen ones, which keeps
    zero-shot accuracy well below fine-tuned accuracy, as for CLIP on the papers' tasks.
    """
    captions = []
    for y in labels:
        if rng.random() < name_prob:
            name = task.classnames[y] if seen[y] else alias[y]
            captions.append(task.templates[int(rng.integers(len(task.templates)))].format(name))
        else:
            captions.append(task.caption)
    return captions


# Dense suite --------------------------------------------------------------------------------------

#: (task name, kind, target key, number of outputs) of the heterogeneous dense suite.
DENSE_TASKS: tuple[tuple[str, str, str, int], ...] = (
    ("segmentation", "segmentation", "segmentation", 3),
    ("depth", "depth", "depth", 1),
    ("keypoint", "keypoint", "keypoint", 2),
    ("shape", "classification", "shape", len(scenes.DENSE_SHAPES)),
)


def _per_patch(values: np.ndarray, patch: int) -> np.ndarray:
    """``(S, S[, K])`` -> ``(L, [K])`` means over non-overlapping ``patch × patch`` cells, row-major."""
    g = values.shape[0] // patch
    cells = values.reshape(g, patch, g, patch, *values.shape[2:]).mean(axis=(1, 3))
    return cells.reshape(g * g, *values.shape[2:])


@cache
def _dense_split(seed: int, profile: str, split: str) -> Split:
    sizes = _sizes(profile)
    rng = _rng(seed, len(TASKS), split)
    images, seg, depth, keypoint, shape = [], [], [], [], []
    for _ in range(sizes[f"dense_{split}"]):
        image, targets = scenes.dense_scene(rng, IMAGE_SIZE)
        images.append(image)
        onehot = np.eye(3)[targets["segmentation"]] * np.array([1.0, 1.0, 2.5])  # objects win a patch at >= 2/7 cover
        seg.append(_per_patch(onehot, PATCH).argmax(-1))
        depth.append(_per_patch(targets["depth"], PATCH))
        keypoint.append(targets["keypoint"])
        shape.append(targets["shape"])
    labels = {"segmentation": np.stack(seg).astype(np.int64), "depth": np.stack(depth).astype(np.float32),
              "keypoint": np.stack(keypoint).astype(np.float32), "shape": np.array(shape, dtype=np.int64)}
    return Split(to_uint8(np.stack(images)), labels)


def dense_suite(seed: int = 0, profile: str = "full") -> dict[str, DenseTask]:
    """The four dense tasks on one shared image stream (splits ``train`` / ``val`` / ``test``)."""
    _sizes(profile)
    return {name: DenseTask(name, kind, target, n, lambda split: _dense_split(seed, profile, split))
            for name, kind, target, n in DENSE_TASKS}


# Loading the built benchmark ------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Micro:
    """The built micro benchmark: backbone, tasks, adapter directories, dense checkpoints, manifest."""

    root: Path
    backbone: Any
    tasks: dict[str, ClassificationTask]
    adapters: dict[int | str, dict[str, Path]]
    dense: dict[str, DenseTask]
    dense_checkpoints: dict[str, Path]
    manifest: Mapping[str, Any]

    @property
    def default_rank(self) -> int:
        """The rank of the default adapter set (4 since the v2 build; 16 in older builds)."""
        return int(self.manifest.get("default_rank", 16))

    def adapter_paths(self, rank: int | str | None = None) -> list[Path]:
        """The adapter directories of one set: a rank, ``"mixed"`` or (``None``) the default rank."""
        rank = self.default_rank if rank is None else rank
        if rank not in self.adapters:
            raise InputError(f"no {rank!r} adapter set in {self.root}; built sets: {', '.join(map(str, self.adapters))}")
        return [self.adapters[rank][t] for t in self.tasks]

    def taskset(self, rank: int | str | None = None) -> TaskSet:
        """The tasks' adapters of one set (a rank, ``"mixed"``, or the default) as a TaskSet against the
        backbone's encoder weights."""
        from mergelab.checkpoints import load_taskset

        return load_taskset(self.backbone.base_state(), list(zip(self.tasks, self.adapter_paths(rank))))


def micro_root() -> Path:
    """The shipped micro benchmark's folder: ``data/micro`` under the working directory, else the one
    of the checkout this package runs from (an editable install)."""
    here = Path("data/micro")
    checkout = Path(__file__).resolve().parents[3] / "data" / "micro"
    return here if here.is_dir() or not checkout.is_dir() else checkout


def load_micro(root: str | Path = "data/micro") -> Micro:
    """Load a built micro benchmark (``mergelab build-micro``) from ``root``.

    The backbone is the pre-trained tiny open_clip CLIP with its closed-vocabulary tokenizer; the
    tasks are regenerated from the manifest's seed and profile. Adapters load with
    ``mergelab.checkpoints.load_taskset(micro.backbone.base_state(), micro.adapter_paths())`` (the
    default set; ``adapter_paths(16)`` or ``adapter_paths("mixed")`` for the others).
    """
    from mergelab.micro.artifacts import read_backbone

    root = Path(root)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise InputError(f"{root} holds no micro benchmark (no manifest.json); run `mergelab build-micro --out {root}`")
    manifest = json.loads(manifest_path.read_text())
    backbone = read_backbone(root / manifest["base"]["dir"])
    tasks = micro_tasks(manifest["seed"], manifest["profile"])
    adapters = {(int(r) if r.isdigit() else r): {t: root / p for t, p in paths.items()} for r, paths in manifest["adapters"].items()}
    dense = dense_suite(manifest["seed"], manifest["profile"])
    checkpoints = {t: root / info["dir"] for t, info in manifest["dense"].items()}
    return Micro(root, backbone, tasks, adapters, dense, checkpoints, manifest)
