"""The micro tasks: deterministic generators, class spaces, joint labels, pre-training captions, folders."""

from __future__ import annotations

import numpy as np
import pytest

from mergelab.data.folder import folder_task
from mergelab.micro.benchmark import DENSE_TASKS, TASKS, aliases, dense_suite, micro_tasks, pretrain_captions
from mergelab.data.tasks import joint_label_space
from mergelab.errors import InputError


def test_eight_tasks_with_natural_class_names_and_10_to_40_classes():
    tasks = micro_tasks(0, "quick")
    assert list(tasks) == list(TASKS) and len(tasks) == 8
    assert {t.analogue for t in tasks.values()} == {"Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SUN397", "SVHN"}
    for task in tasks.values():
        assert 10 <= task.num_classes <= 40
        assert all(any(ch.isalpha() for ch in name) for name in task.classnames)  # words, not ids
        assert len(task.prompts(task.classnames[0])) == len(task.templates) >= 3
    assert tasks["digits"].classnames == tasks["housenumbers"].classnames
    assert {"scikit-learn handwritten digits", "scikit-image photographs"} <= {t.source for t in tasks.values()}


@pytest.mark.parametrize("name", list(TASKS))
def test_generators_are_deterministic_from_the_seed(name):
    a, b = micro_tasks(0, "quick", (name,))[name], micro_tasks(0, "quick", (name,))[name]
    for split in ("train", "test"):
        assert np.array_equal(a.split(split).images, b.split(split).images)
        assert np.array_equal(a.split(split).labels, b.split(split).labels)
    other = micro_tasks(1, "quick", (name,))[name]
    assert not np.array_equal(a.split("test").images, other.split("test").images)
    test = a.split("test")
    assert test.images.dtype == np.uint8 and test.images.shape[1:] == (24, 24, 3)
    assert set(np.unique(test.labels)) == set(range(a.num_classes))  # every class is represented
    assert not np.array_equal(a.split("train").images[:50], a.split("test").images[:50])


def test_digits_splits_partition_the_real_images():
    digits = micro_tasks(0, "full", ("digits",))["digits"]
    sizes = {s: len(digits.split(s)) for s in ("train", "val", "test", "pretrain")}
    assert sizes == {"train": 1078, "val": 179, "test": 500, "pretrain": 1078}


def test_joint_label_space_deduplicates_the_shared_digit_names():
    tasks = list(micro_tasks(0, "quick").values())
    joint = joint_label_space(tasks)
    assert len(joint.classnames) == sum(t.num_classes for t in tasks) - 10
    assert joint.local_to_joint["digits"] == joint.local_to_joint["housenumbers"]
    assert len(set(joint.classnames)) == len(joint.classnames)
    other = [i for t in tasks if t.name not in ("digits", "housenumbers") for i in joint.local_to_joint[t.name]]
    assert len(other) == len(set(other))


def test_pretrain_captions_name_held_out_classes_only_by_their_aliases():
    task = micro_tasks(0, "quick", ("signs",))["signs"]
    labels = np.arange(task.num_classes).repeat(20)
    seen = np.arange(task.num_classes) % 2 == 0
    alias = aliases(task.num_classes, np.random.default_rng(0))
    assert len(set(alias)) == task.num_classes and not set(alias) & {w for n in task.classnames for w in n.split()}
    captions = pretrain_captions(task, labels, seen, alias, np.random.default_rng(0), name_prob=0.8)
    for y, caption in zip(labels, captions):
        if caption == task.caption:
            continue
        assert (f'"{task.classnames[y]}"' in caption) == bool(seen[y])
        assert (f'"{alias[y]}"' in caption) == (not seen[y])
    named = np.mean([c != task.caption for c in captions])
    assert 0.7 < named < 0.9


def test_dense_suite_targets_share_one_image_stream():
    suite = dense_suite(0, "quick")
    assert [t[0] for t in DENSE_TASKS] == list(suite) and len({t.kind for t in suite.values()}) == 4
    images = [suite[n].split("train").images for n in suite]
    assert all(img is images[0] for img in images)
    x, seg = suite["segmentation"].tensors("train")
    _, depth = suite["depth"].tensors("train")
    _, keypoint = suite["keypoint"].tensors("train")
    _, shape = suite["shape"].tensors("train")
    assert seg.shape == depth.shape == (len(x), 16) and seg.dtype.is_floating_point is False
    assert set(seg.unique().tolist()) == {0, 1, 2}
    assert keypoint.shape == (len(x), 2) and float(keypoint.min()) > 0 and float(keypoint.max()) < 1
    assert depth[seg == 0].mean() > depth[seg == 1].mean()  # the sky is farther than the ground
    assert shape.max() < suite["shape"].num_outputs


def test_folder_task_reads_imagefolder_layout_and_carves_val(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("test", 2)):
        for cls in ("cat_face", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    task = folder_task(tmp_path, name="pets", image_size=8, val_fraction=0.2, seed=0)
    assert task.classnames == ("cat face", "dog")
    assert len(task.split("train")) == 8 and len(task.split("val")) == 2 and len(task.split("test")) == 4
    assert task.split("test").images.shape == (4, 8, 8, 3)
    train = {im.tobytes() for im in task.split("train").images}
    assert not any(im.tobytes() in train for im in task.split("val").images)
    with pytest.raises(InputError, match="lacks the split"):
        folder_task(tmp_path / "train")


def test_unknown_names_raise_input_errors():
    with pytest.raises(InputError, match="unknown micro task"):
        micro_tasks(0, "quick", ("imagenet",))
    with pytest.raises(InputError, match="unknown micro profile"):
        micro_tasks(0, "huge")


def test_consistency_loss_measures_how_far_embeddings_moved_and_ignores_their_scale():
    import torch

    from mergelab.micro.training import consistency_loss

    x = torch.randn(6, 8)
    assert float(consistency_loss(3 * x, x)) == pytest.approx(0.0, abs=1e-6)
    y = torch.randn(6, 8)
    expected = (torch.nn.functional.normalize(y, dim=-1) - torch.nn.functional.normalize(x, dim=-1)).pow(2).sum(-1).mean()
    assert float(consistency_loss(y, x)) == pytest.approx(float(expected))


def test_lora_with_consistency_needs_images_outside_the_task():
    from mergelab.micro.training import LoraConfig, finetune_lora

    with pytest.raises(ValueError, match="outside"):
        finetune_lora(None, None, None, LoraConfig(consistency=1.0))


@pytest.mark.parametrize("arch", [b"{nope", b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe\x00binary", b"[1]", b'{"vision_cfg": 3}'])
def test_a_broken_arch_json_is_one_input_error(tmp_path, arch):
    """The micro model's arch.json garbage, nested too deep, binary or not an object (issue 30 probe cases
    308-311 put it in a --base folder, where merge never reads it; a bench root's is read here)."""
    import shutil

    from mergelab.micro.artifacts import read_backbone
    from mergelab.micro.benchmark import micro_root

    shutil.copytree(micro_root() / "base", tmp_path / "base")
    (tmp_path / "base" / "arch.json").write_bytes(arch)
    with pytest.raises(InputError, match=r"arch\.json"):
        read_backbone(tmp_path / "base")
