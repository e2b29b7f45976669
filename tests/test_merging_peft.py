"""Equivalence with ``peft.utils.merge_utils`` on shared inputs, and the intended differences.

Intended differences (also in :mod:`mergelab.merging.sparsify`):

* one global ``alpha`` instead of per-task ``weights``: PEFT with every weight equal to
  ``alpha`` is the same function; unequal PEFT weights have no counterpart here;
* DARE takes the drop rate ``p`` (001, 003) where PEFT takes ``density = 1 − p``, and draws its
  masks from an explicit ``torch.Generator`` seeded with ``seed`` (PEFT uses the global RNG):
  seeding PEFT's global RNG identically reproduces the same masks;
* ``dare_ties`` has an optional TIES trim (``density``; PEFT has none): ``density=1`` is PEFT's.
"""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils

from mergelab.merging import METHODS


@pytest.fixture
def task_tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(16, 12, generator=g) for _ in range(4)]


def weights(alpha: float, n: int = 4) -> torch.Tensor:
    return torch.full((n,), alpha)


def test_task_arithmetic_matches_peft(task_tensors):
    ours = METHODS["task_arithmetic"].fn(task_tensors, alpha=0.4)
    torch.testing.assert_close(ours, merge_utils.task_arithmetic(task_tensors, weights(0.4)))


@pytest.mark.parametrize("density", [0.1, 0.35, 0.8])
def test_magnitude_prune_matches_peft(task_tensors, density):
    ours = METHODS["magnitude_prune"].fn(task_tensors, density=density, alpha=0.7)
    torch.testing.assert_close(ours, merge_utils.magnitude_prune(task_tensors, weights(0.7), density))


@pytest.mark.parametrize(("sign", "peft_sign"), [("sum", "total"), ("count", "frequency")])
@pytest.mark.parametrize("density", [0.2, 0.5, 0.9])
def test_ties_matches_peft(task_tensors, density, sign, peft_sign):
    ours = METHODS["ties"].fn(task_tensors, density=density, alpha=1.3, sign=sign)
    theirs = merge_utils.ties(task_tensors, weights(1.3), density, majority_sign_method=peft_sign)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("p", [0.25, 0.5, 0.75])
def test_dare_linear_matches_peft_under_the_same_random_stream(task_tensors, p):
    ours = METHODS["dare_linear"].fn(task_tensors, p=p, alpha=0.6, seed=11)
    torch.manual_seed(11)
    theirs = merge_utils.dare_linear(task_tensors, weights(0.6), 1.0 - p)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize(("sign", "peft_sign"), [("sum", "total"), ("count", "frequency")])
def test_dare_ties_matches_peft_under_the_same_random_stream(task_tensors, sign, peft_sign):
    ours = METHODS["dare_ties"].fn(task_tensors, p=0.5, density=1.0, alpha=0.9, sign=sign, seed=5)
    torch.manual_seed(5)
    theirs = merge_utils.dare_ties(task_tensors, weights(0.9), 0.5, majority_sign_method=peft_sign)
    torch.testing.assert_close(ours, theirs)


def test_intended_differences_are_real(task_tensors):
    """Unequal PEFT weights and a dare_ties trim have no PEFT / mergelab counterpart."""
    unequal = torch.tensor([0.2, 1.0, 0.5, 2.0])
    theirs = merge_utils.ties(task_tensors, unequal, 0.5)
    assert not any(torch.allclose(METHODS["ties"].fn(task_tensors, density=0.5, alpha=a), theirs) for a in unequal.tolist())
    torch.manual_seed(5)
    untrimmed = merge_utils.dare_ties(task_tensors, weights(1.0), 0.5)
    trimmed = METHODS["dare_ties"].fn(task_tensors, p=0.5, density=0.3, alpha=1.0, seed=5)
    assert not torch.allclose(trimmed, untrimmed)
    assert (trimmed != 0).sum() < (untrimmed != 0).sum()


def test_linear_matches_peft_add_weighted_adapter_with_different_lora_alphas(hf_clip_vision, tmp_path):
    """PEFT's ``combination_type="linear"`` puts √(w·α_t/r_t) on each raw factor; with α/r differing
    across tasks this differs from summing the scaled B's (the cross terms are weighted differently)."""
    import copy

    from peft import PeftModel

    from mergelab.checkpoints import load_taskset
    from mergelab.merging import merge
    from mergelab.synthetic import write_peft_adapters

    targets = ["q_proj", "v_proj"]
    paths = [*write_peft_adapters(hf_clip_vision, tmp_path, ["a"], target_modules=targets, rank=2, alpha=4, seed=0),
             *write_peft_adapters(hf_clip_vision, tmp_path, ["b"], target_modules=targets, rank=2, alpha=16, seed=1)]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf_clip_vision), str(paths[0]), adapter_name="a")
    peft_model.load_adapter(str(paths[1]), adapter_name="b")
    peft_model.add_weighted_adapter(["a", "b"], [0.6, 0.6], "merged", combination_type="linear")
    ours = merge(load_taskset(hf_clip_vision, paths), "linear", alpha=0.6)
    layer = peft_model.base_model.model.encoder.layers[0].self_attn.q_proj
    module = next(m for m in ours.modules if m.endswith("layers.0.self_attn.q_proj.weight"))
    torch.testing.assert_close(ours.modules[module].dense(), layer.get_delta_weight("merged"), atol=1e-6, rtol=1e-5)
