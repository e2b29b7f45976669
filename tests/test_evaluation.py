"""Evaluation metrics on hand-computed cases, with a tiny fake backbone whose features are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from mergelab.data.tasks import ClassificationTask, DenseTask, Split
from mergelab.errors import InputError
from mergelab.evaluation import (evaluate_task, hits_at_k, joint_hits, normalized_accuracy, normalized_performance, task_head,
                                 top1_accuracy, zero_shot_head)
from mergelab.evaluation.dense import KINDS, refit_score
from mergelab.model.base import run_functional


class FakeBackbone:
    """Images (N, 3, 2, 2) -> identity-initialised linear features; texts -> fixed vectors."""

    name, logit_scale, image_size = "fake", 10.0, 2

    def __init__(self, text_vectors: dict[str, torch.Tensor]) -> None:
        self.vision = nn.Linear(12, 12, bias=False)
        nn.init.eye_(self.vision.weight)
        self.text_vectors = text_vectors

    def base_state(self):
        return {k: v.detach().clone() for k, v in self.vision.state_dict().items()}

    def lora_targets(self):
        return []

    def encode_image(self, images, params=None):
        return run_functional(self.vision, params, images.flatten(1))

    def image_tokens(self, images, params=None):
        return run_functional(self.vision, params, images.flatten(1)).view(-1, 4, 3)

    def encode_text(self, texts):
        return torch.stack([self.text_vectors[t] for t in texts])


def _task(name: str, classnames, images: np.ndarray, labels) -> ClassificationTask:
    split = Split(images, np.asarray(labels, dtype=np.int64))
    return ClassificationTask(name, tuple(classnames), ("a {}.", "the {}."), lambda _s: split)


def _prototypes(n: int) -> np.ndarray:
    """n distinct uint8 images whose normalised tensors are far apart."""
    out = np.full((n, 2, 2, 3), 128, dtype=np.uint8)
    for i in range(n):
        out[i].reshape(-1)[i] = 255
    return out


def _embedding(image: np.ndarray) -> torch.Tensor:
    from mergelab.data.tasks import to_tensor

    return to_tensor(image[None]).flatten(1)[0]


def test_top1_and_hits_at_k_on_a_hand_case():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.3], [0.8, 0.1, 0.05, 0.2], [0.0, 0.1, 0.2, 0.3]])
    labels = torch.tensor([1, 3, 0])
    assert top1_accuracy(logits, labels) == pytest.approx(1 / 3)
    # ranks of the labels: row 0 -> 1st, row 1 -> 2nd, row 2 -> 4th
    assert hits_at_k(logits, labels, ks=(1, 2, 3, 4)) == {1: 1, 2: 2, 3: 2, 4: 3}


def test_normalised_accuracy_and_performance():
    assert normalized_accuracy(0.45, 0.9) == pytest.approx(0.5)
    assert normalized_performance(0.6, 0.8, higher_is_better=True) == pytest.approx(0.75)
    assert normalized_performance(2.0, 1.0, higher_is_better=False) == pytest.approx(0.5)  # 1/metric: RMSE doubled -> half
    with pytest.raises(InputError):
        normalized_accuracy(0.5, 0.0)
    with pytest.raises(InputError):
        normalized_performance(0.0, 1.0, higher_is_better=False)


def test_zero_shot_head_averages_normalised_template_embeddings():
    vectors = {"a cat.": torch.tensor([3.0, 0.0]), "the cat.": torch.tensor([0.0, 1.0]),
               "a dog.": torch.tensor([-2.0, 0.0]), "the dog.": torch.tensor([-5.0, 0.0])}
    backbone = FakeBackbone(vectors)
    head = zero_shot_head(backbone, ["cat", "dog"], ["a {}.", "the {}."])
    # cat: mean of (1, 0) and (0, 1) = (.5, .5) -> renormalised (1/√2, 1/√2); dog: (-1, 0); times the logit scale 10
    torch.testing.assert_close(head, torch.tensor([[10 / math.sqrt(2), 10 / math.sqrt(2)], [-10.0, 0.0]]))


def test_evaluate_task_uses_params_as_the_model():
    protos = _prototypes(3)
    vectors = {f"{a} c{i}.": _embedding(protos[i]) for i in range(3) for a in ("a", "the")}
    backbone = FakeBackbone(vectors)
    task = _task("t", ["c0", "c1", "c2"], protos[[0, 1, 2, 1]], [0, 1, 2, 0])
    assert evaluate_task(backbone, task) == pytest.approx(0.75)  # the last image is labelled wrongly
    clean = _task("clean", ["c0", "c1", "c2"], protos[[0, 1, 2]], [0, 1, 2])
    negated = {"weight": -torch.eye(12)}  # embeddings flip: every image is farthest from its own class
    assert evaluate_task(backbone, clean) == pytest.approx(1.0)
    assert evaluate_task(backbone, clean, negated) == pytest.approx(0.0)
    head = task_head(backbone, task)
    assert head.norm(dim=-1).allclose(torch.full((3,), 10.0))


def test_joint_hits_is_a_micro_average_over_the_deduplicated_union():
    protos = _prototypes(4)
    # task A: classes x, y (prototypes 0, 1); task B: y, z (prototypes 1, 2) -> joint {x, y, z}
    vectors = {f"{a} {c}.": _embedding(protos[i]) for c, i in (("x", 0), ("y", 1), ("z", 2)) for a in ("a", "the")}
    backbone = FakeBackbone(vectors)
    task_a = _task("A", ["x", "y"], protos[[0, 1, 1]], [0, 1, 0])  # 2 of 3 right at top-1
    task_b = _task("B", ["y", "z"], protos[[1, 2, 0]], [0, 1, 1])  # 2 of 3 right (the last looks like x)
    result = joint_hits(backbone, [task_a, task_b], ks=(1, 3))
    assert result["hits@1"] == pytest.approx(4 / 6)
    assert result["hits@3"] == pytest.approx(1.0)  # 3 joint classes: everything is in the top 3


def test_dense_metrics_on_hand_cases():
    pred = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [0.0, 3.0]]])  # argmax classes 0, 1, 1
    target = torch.tensor([[0, 1, 0]])
    # class 0: inter 1, union 2 -> 0.5; class 1: inter 1, union 2 -> 0.5
    assert KINDS["segmentation"].metric(pred, target) == pytest.approx(0.5)
    assert KINDS["depth"].metric(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 4.0]])) == pytest.approx(math.sqrt(2.0))
    assert KINDS["keypoint"].metric(torch.tensor([[0.0, 0.0], [1.0, 1.0]]), torch.tensor([[3.0, 4.0], [1.0, 1.0]])) == pytest.approx(2.5)
    assert not KINDS["depth"].higher_is_better and KINDS["segmentation"].higher_is_better


def test_refit_decoder_on_a_frozen_encoder_learns_a_separable_task():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    pattern = np.array([[[200] * 3, [60] * 3], [[60] * 3, [200] * 3]], dtype=np.uint8)  # (2, 2, 3): a diagonal
    images = np.where(labels[:, None, None, None] == 1, pattern, pattern[::-1]) + rng.integers(0, 20, (200, 2, 2, 3)).astype(np.uint8)
    split = Split(images, {"cls": labels})
    task = DenseTask("cls", "classification", "cls", 2, lambda _s: split)
    backbone = FakeBackbone({})
    assert refit_score(backbone, task, steps=60, lr=0.05) == pytest.approx(1.0)
    zeroed = {"weight": torch.zeros(12, 12)}  # a collapsed encoder carries no information
    assert refit_score(backbone, task, zeroed, steps=60, lr=0.05) < 0.7


def test_a_thread_session_shares_the_weights_and_scores_what_the_session_scores(micro_pair):
    """``for_thread`` copies the encoder's modules, not its weights (a second copy of a 1B-parameter
    model's weights would not fit beside the first), and the base state is the module's own storage."""
    from concurrent.futures import ThreadPoolExecutor

    from mergelab.merging import merge

    thread = micro_pair.for_thread()
    own, copied = dict(micro_pair.backbone.vision.named_parameters()), dict(thread.backbone.vision.named_parameters())
    assert thread.backbone.vision is not micro_pair.backbone.vision
    assert all(copied[k].data_ptr() == own[k].data_ptr() for k in own)
    assert all(micro_pair.base[k].data_ptr() == own[k].data_ptr() for k in own if k in micro_pair.base)
    params = micro_pair.weights(merge(micro_pair.taskset, "task_arithmetic", "full", alpha=0.3))
    before = {k: micro_pair.base[k].clone() for k in params}
    expected = micro_pair.accuracy("digits", "val", params)[0]
    with ThreadPoolExecutor(2) as pool:  # two threads swap parameters in their own module copies at once
        scores = list(pool.map(lambda s: s.accuracy("digits", "val", params)[0], [thread, micro_pair.for_thread()]))
    assert scores == [expected, expected]
    for k, weight in before.items():  # nothing wrote the shared weights in place
        assert torch.equal(micro_pair.base[k], weight)


def test_an_evaluation_forms_one_blocks_merged_weights_at_a_time_and_leaves_the_base_bit_identical(micro_pair, monkeypatch):
    """``weights`` forms ``W_0 + ΔW`` a repeated block at a time while a forward runs (issue 31 item 4): the
    features of the weights formed up front bit for bit, the base never written, and (counted) one block's
    merged matrices alive at a time, not a copy of every adapted matrix."""
    import weakref

    import mergelab.bench.session
    from mergelab.merging import merge
    from mergelab.taskset import add_updates

    merged = merge(micro_pair.taskset, "task_arithmetic", "full", alpha=0.3)
    base = {k: (v, v.clone()) for k, v in micro_pair.base.items()}
    up_front = add_updates(micro_pair.base, merged.modules)
    expected = micro_pair.features("digits", "val", up_front)
    alive, most = [0], [0]

    def counted(base, updates, scale=1.0):
        out = add_updates(base, updates, scale)
        for t in out.values():
            alive[0] += t.nbytes
            most[0] = max(most[0], alive[0])
            weakref.finalize(t, lambda n=t.nbytes: alive.__setitem__(0, alive[0] - n))
        return out

    monkeypatch.setattr(mergelab.bench.session, "add_updates", counted)
    assert torch.equal(micro_pair.features("digits", "val", micro_pair.weights(merged)), expected)
    blocks = {}
    for name, t in up_front.items():
        block = name.split(".resblocks.")[1].split(".")[0]
        blocks[block] = blocks.get(block, 0) + t.nbytes
    assert len(blocks) > 1 and most[0] == max(blocks.values()) and alive[0] == 0
    assert all(micro_pair.base[k] is v and torch.equal(v, copy) for k, (v, copy) in base.items())
