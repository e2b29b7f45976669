"""Merge spaces: exact identities over shapes, ranks and T (including T·r > min(out, in))."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergelab.errors import InputError
from mergelab.merging import merge
from mergelab.spaces import SPACES, CoreSpace, KnotsSpace, get_space
from mergelab.spaces.core import alignment_errors, reference_bases
from mergelab.spaces.knots import knots_svd
from mergelab.synthetic import random_taskset
from mergelab.taskset import Dense, LowRank, TaskSet, TaskUpdate

SPACE_CONFIGS = [
    ("full", {}),
    ("full", {"scope": "model"}),
    ("core", {}),
    ("core", {"scope": "model"}),
    ("knots", {}),
    ("knots", {"naive": True}),
    ("knots", {"variant": "per_layer"}),
    ("knots", {"variant": "per_layer", "naive": True}),
]


@st.composite
def tasksets(draw, max_tasks: int = 4, max_dim: int = 10, max_rank: int = 5):
    """Float64 LoRA task sets with 1–2 modules, heterogeneous ranks; T·r often exceeds min(out, in)."""
    n_tasks = draw(st.integers(1, max_tasks))
    shapes = {f"m{i}.weight": (draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim))) for i in range(draw(st.integers(1, 2)))}
    ranks = [draw(st.integers(1, max_rank)) for _ in range(n_tasks)]
    return random_taskset(shapes, n_tasks, rank=ranks, seed=draw(st.integers(0, 2**16)), dtype=torch.float64)


def _dense(update) -> torch.Tensor:
    return update.dense(torch.float64)


def _matrix(x) -> torch.Tensor:
    """A representation ``X_t`` as a matrix (Core gives its cores as factors)."""
    return x.dense(torch.float64) if isinstance(x, LowRank) else x


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-9) -> None:
    scale = max(float(a.abs().max()), float(b.abs().max()), 1.0)
    torch.testing.assert_close(a, b, atol=rtol * scale, rtol=0)


@settings(max_examples=40, deadline=None)
@given(tasksets(), st.sampled_from(SPACE_CONFIGS))
def test_task_arithmetic_is_the_same_in_every_space(taskset, config):
    """003 Eq. (11): a linear merge commutes with the (lossless) projection."""
    name, options = config
    full = merge(taskset, "task_arithmetic", "full", alpha=0.7)
    other = merge(taskset, "task_arithmetic", name, space_options=options, alpha=0.7)
    for module in taskset.module_names:
        expected = 0.7 * sum(_dense(u) for u in taskset.updates(module))
        _close(_dense(full.modules[module]), expected)
        _close(_dense(other.modules[module]), expected)
        if name != "full":
            assert isinstance(other.modules[module], LowRank)


@settings(max_examples=40, deadline=None)
@given(tasksets())
def test_core_projection_is_lossless_and_reconstructs_every_task(taskset):
    space = SPACES["core"]
    for module in taskset.module_names:
        updates = taskset.updates(module)
        cores, ctx = space.project(updates)
        U_B, V_A = ctx.left, ctx.right
        torch.testing.assert_close(U_B.T @ U_B, torch.eye(U_B.shape[1], dtype=torch.float64), atol=1e-10, rtol=0)
        torch.testing.assert_close(V_A.T @ V_A, torch.eye(V_A.shape[1], dtype=torch.float64), atol=1e-10, rtol=0)
        assert all(c.shape == (U_B.shape[1], V_A.shape[1]) for c in cores)
        assert U_B.shape[1] <= min(sum(u.rank for u in updates), U_B.shape[0])
        for eps_U, eps_V in alignment_errors(updates, U_B, V_A):  # 003 Eq. (12)-(13)
            assert abs(eps_U) < 1e-9 and abs(eps_V) < 1e-9
        for core, update in zip(cores, updates, strict=True):
            _close(_dense(space.reconstruct(core, ctx)), _dense(update))


@settings(max_examples=30, deadline=None)
@given(tasksets())
def test_factored_knots_svd_equals_the_naive_svd_of_the_concatenation(taskset):
    for module in taskset.module_names:
        updates = taskset.updates(module)
        U, s, blocks = knots_svd(updates)
        U_n, s_n, blocks_n = knots_svd(updates, naive=True)
        stacked = torch.cat([_dense(u) for u in updates], dim=1)
        torch.testing.assert_close(s, s_n, atol=1e-9 * float(s_n.max()), rtol=0)
        _close(U @ (s[:, None] * torch.cat(blocks, dim=1)), stacked)
        _close(U_n @ (s_n[:, None] * torch.cat(blocks_n, dim=1)), stacked)
        assert s.numel() <= sum(u.rank for u in updates)


@settings(max_examples=25, deadline=None)
@given(tasksets(), st.sampled_from(SPACE_CONFIGS))
def test_every_space_reconstructs_each_task_and_its_factors(taskset, config):
    name, options = config
    space = get_space(name, **options)
    for module in taskset.module_names:
        updates = taskset.updates(module)
        reps, ctx = space.project(updates)
        for rep, factors, update in zip(reps, space.factors(updates, ctx), updates, strict=True):
            _close(_dense(space.reconstruct(rep, ctx)), _dense(update))
            _close(factors.dense(torch.float64), _matrix(rep))  # (P⁺ B_t)(A_t Q) is the representation X_t
            _close(_dense(space.reconstruct(factors, ctx)), _dense(update))


def test_core_space_never_forms_a_dense_update(monkeypatch):
    taskset = random_taskset({"w": (64, 48)}, 3, rank=[2, 4, 3], seed=0)

    product = LowRank.dense

    def forbidden(self, dtype=None):
        assert self.shape != (64, 48), "core space materialised B @ A"
        return product(self, dtype)  # a core M_t (9 × 9) from its factors

    monkeypatch.setattr(LowRank, "dense", forbidden)
    for method in ("task_arithmetic", "ties", "tsv", "iso_c", "dare_ties"):
        out = merge(taskset, method, "core").modules["w"]
        assert isinstance(out, LowRank) and out.rank == 9 and out.shape == (64, 48)


def test_core_bases_drop_null_directions_of_duplicated_adapters():
    """003 App. A.4: the bases have the stacks' intrinsic rank (Listing 1 would keep Tr vectors)."""
    single = random_taskset({"w": (20, 16)}, 1, rank=3, seed=0).tasks[0]
    twice = TaskSet((single, TaskUpdate("copy", single.modules)))
    U_B, V_A = reference_bases(twice.updates("w"))
    assert U_B.shape[1] == V_A.shape[1] == 3
    merged = merge(twice, "iso_c", "core").modules["w"]
    assert torch.linalg.matrix_rank(merged.dense(torch.float64)) == 3


def test_knots_variants_represent_tasks_with_and_without_singular_values():
    taskset = random_taskset({"w": (12, 10)}, 3, rank=2, seed=3)
    updates = taskset.updates("w")
    paper, ctx_p = KnotsSpace().project(updates)
    layer, ctx_l = KnotsSpace(variant="per_layer").project(updates)
    s = ctx_p.info["singular_values"]
    for X_p, X_l in zip(paper, layer, strict=True):
        _close(X_p.double(), s[:, None] * X_l)
    V = torch.cat(layer, dim=1)  # rows of Vᵀ are orthonormal
    torch.testing.assert_close(V @ V.T, torch.eye(V.shape[0], dtype=torch.float64), atol=1e-10, rtol=0)
    assert KnotsSpace().scope == "model" and KnotsSpace(variant="per_layer").scope == "module"
    assert SPACES["knots"].configure(variant="per_layer").scope == "module"
    assert SPACES["knots"].configure(variant="per_layer", scope="model").scope == "model"


def test_knots_paper_variant_trims_globally_across_layers():
    """KnOTS-TIES (the KnOTS code's TIES): one top-k over every layer's diag(s)·V_t."""
    big = random_taskset({"big.weight": (10, 8)}, 2, rank=2, seed=0)
    small = random_taskset({"small.weight": (10, 8)}, 2, rank=2, seed=1)
    tasks = tuple(TaskUpdate(n, {**a.modules, "small.weight": LowRank(b.modules["small.weight"].B * 1e-3,
                                                                    b.modules["small.weight"].A)})
                  for n, a, b in zip(("t0", "t1"), big.tasks, small.tasks, strict=True))
    taskset = TaskSet(tasks)
    global_trim = merge(taskset, "ties", "knots", density=0.3)
    per_layer = merge(taskset, "ties", "knots", space_options={"scope": "module"}, density=0.3)
    assert float(global_trim.modules["small.weight"].dense().abs().max()) == 0.0  # everything small trimmed away
    assert float(per_layer.modules["small.weight"].dense().abs().max()) > 0.0


def test_dense_updates_are_refused_by_factored_spaces_with_a_reason():
    dense = TaskSet((TaskUpdate("a", {"w": Dense(torch.randn(4, 3))}), TaskUpdate("b", {"w": Dense(torch.randn(4, 3))})))
    assert isinstance(merge(dense, "ties", "full").modules["w"], Dense)
    for space in ("core", "knots"):
        with pytest.raises(InputError, match=f"module 'w': the {space} space is built from LoRA factors"):
            merge(dense, "task_arithmetic", space)


def test_space_options_are_validated():
    with pytest.raises(InputError, match="no option 'bogus'; allowed: scope"):
        SPACES["core"].configure(bogus=1)
    with pytest.raises(InputError, match=r"naive='maybe' is invalid; expected bool"):
        SPACES["knots"].configure(naive="maybe")
    with pytest.raises(InputError, match="unknown space 'kernel'; allowed: full, knots, core"):
        get_space("kernel")
    assert get_space("knots", naive="true").naive is True
    assert isinstance(get_space(CoreSpace(rank_rtol=1e-6)), CoreSpace)


@pytest.mark.parametrize(("name", "options"), SPACE_CONFIGS)
def test_an_untrained_module_merges_to_zero_in_every_space(name, options):
    """PEFT initialises lora_B to zero; a module nobody trained has an all-zero stack."""
    from mergelab.merging import METHODS

    taskset = TaskSet(tuple(TaskUpdate(t, {"w": LowRank(torch.zeros(6, 2), torch.randn(2, 5))}) for t in "ab"))
    grams = {"grams": {t: {"w": torch.eye(5)} for t in "ab"}}
    for method in [*METHODS, "tsv+iso_c"]:
        hp = {"k": 1} if method == "lora_lego" else {}
        out = merge(taskset, method, name, space_options=options, side_inputs=grams if method == "regmean" else None, **hp)
        assert float(out.modules["w"].dense().abs().max()) == 0.0, method
