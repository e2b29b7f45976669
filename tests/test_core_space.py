"""Core Space analyses (003 Sec. 5.2, App. C.2): truncation, SAR per space, reference bases, merged rank."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergelab.analysis import basis_ablation as ba
from mergelab.analysis import core_space as cs
from mergelab.analysis.spectra import pairwise_sar, sar
from mergelab.merging import merge
from mergelab.spaces import SPACES
from mergelab.spaces.core import reference_bases
from mergelab.synthetic import random_taskset
from mergelab.taskset import BaseRef, LowRank, TaskSet, TaskUpdate

SHAPES = {"blocks.0.attn.q_proj.weight": (20, 16), "blocks.1.mlp.fc1.weight": (14, 24)}


@pytest.fixture(scope="module")
def taskset():
    return random_taskset(SHAPES, ["digits", "textures", "signs"], rank=[2, 3, 2], seed=5, dtype=torch.float64)


def _taskset(modules_per_task: dict[str, dict[str, LowRank]]) -> TaskSet:
    return TaskSet(tuple(TaskUpdate(name, mods) for name, mods in modules_per_task.items()), BaseRef("hand-made"))


# --- truncation ----------------------------------------------------------------------------------


def test_kept_rank_follows_the_papers_rule():
    assert cs.kept_rank(768, 0.8) == 153  # σ_i = 0 for i > (1 − p)·dim(Σ): ⌊0.2 · 768⌋
    assert cs.kept_rank(128, 0.0) == 128
    assert cs.kept_rank(10, 0.9) == 1  # (1 − 0.9)·10 is 0.999… in floating point
    assert cs.kept_rank(10, 0.7) == 3
    assert cs.kept_rank(10, 1.0) == 0
    with pytest.raises(ValueError):
        cs.kept_rank(10, 1.5)


def test_truncation_error_curve_known_values():
    curve = cs.truncation_error_curve(np.array([3.0, 2.0, 1.0]), dim=5)  # energies 9, 4, 1 of 14, then two zeros
    np.testing.assert_allclose(curve, [1.0, math.sqrt(5 / 14), math.sqrt(1 / 14), 0.0, 0.0, 0.0])
    assert np.isnan(cs.truncation_error_curve(np.zeros(2), dim=3)).all()


def test_truncation_at_full_rank_is_exact_in_both_spaces(taskset):
    ds = cs.truncation_curves(taskset)
    assert ds.truncation_error.dims == ("space", "module", "fraction")
    assert (ds.truncation_error.sel(fraction=0.0) == 0.0).all()
    assert (ds.kept_rank.sel(fraction=0.0) == ds.dim_sigma).all()
    for space in ("full", "core"):
        exact = merge(taskset, "task_arithmetic", space)
        truncated = cs.truncated_merge(taskset, 0.0, space=space)
        for m in taskset.module_names:
            torch.testing.assert_close(truncated.modules[m].dense(torch.float64), exact.modules[m].dense(torch.float64),
                                       rtol=1e-10, atol=1e-12)


def _truncate(matrix: torch.Tensor, k: int) -> torch.Tensor:
    U, s, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return U[:, :k] @ torch.diag(s[:k]) @ Vh[:k]


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.8, 0.95])
def test_truncation_matches_an_explicit_svd_of_the_merged_matrix(taskset, fraction):
    """Full space: SVD of ΔW_merged; Core space: SVD of M_merged, mapped back with the reference bases (003 Sec. 5.2)."""
    ds = cs.truncation_curves(taskset, fractions=[fraction])
    for j, m in enumerate(taskset.module_names):
        updates = taskset.updates(m)
        delta = 0.3 * sum(u.dense(torch.float64) for u in updates)  # TA with the registry's default α = 0.3
        U_B, V_A = reference_bases(updates)
        core = U_B.T @ delta @ V_A  # M_merged = Σ_t α M_t (003 Eqs. 8, 11)
        expected = {"full": (delta, lambda X: X), "core": (core, lambda X: U_B @ X @ V_A.T)}
        for space, (X, back) in expected.items():
            k = cs.kept_rank(min(X.shape), fraction)
            reference = back(_truncate(X, k))
            error = float((delta - reference).norm() / delta.norm())
            assert math.isclose(float(ds.truncation_error.sel(space=space, fraction=fraction)[j]), error, rel_tol=1e-7, abs_tol=1e-9)
            got = cs.truncated_merge(taskset, fraction, space=space).modules[m]
            assert isinstance(got, LowRank)
            torch.testing.assert_close(got.dense(torch.float64), reference, rtol=1e-8, atol=1e-10)


def test_core_space_is_dense_and_full_space_is_not(taskset):
    """The Task Arithmetic merge has the same non-zero spectrum in both spaces (the core maps are
    isometries), so by kept rank the curves coincide; by fraction p only the core loses at once."""
    ds = cs.truncation_curves(taskset)
    total_rank = 7  # T·r = 2 + 3 + 2
    assert ds.dim_sigma.sel(space="core").values.tolist() == [total_rank, total_rank]
    assert ds.dim_sigma.sel(space="full").values.tolist() == [16, 14]
    for j in range(2):
        full = ds.relative_error.sel(space="full").values[j]
        core = ds.relative_error.sel(space="core").values[j]
        np.testing.assert_allclose(full[: total_rank + 1], core[: total_rank + 1], rtol=1e-8, atol=1e-10)
        assert np.nanmax(np.abs(full[total_rank:])) < 1e-10  # the full space's remaining components are zero
    p = 0.5  # full keeps ⌊8⌋ and ⌊7⌋ ≥ T·r components, the core ⌊3.5⌋ = 3 of 7
    assert (ds.truncation_error.sel(space="full", fraction=p) < 1e-10).all()
    assert (ds.truncation_error.sel(space="core", fraction=p) > 0.05).all()
    np.testing.assert_allclose(ds.retained_energy, 1 - ds.truncation_error**2)
    np.testing.assert_allclose(ds.truncation_error_mean, ds.truncation_error.mean("module"))


def test_truncation_of_a_trimmed_merge_differs_between_spaces(taskset):
    """TIES in full space trims the dense ΔW, which destroys its low rank (003 App. C.2): components beyond T·r carry energy."""
    ds = cs.truncation_curves(taskset, method="ties", hyper_parameters={"density": 0.3})
    assert ds.attrs["method"] == "ties" and ds.attrs["hyper_parameters"]["density"] == 0.3
    full_tail = ds.relative_error.sel(space="full", rank=7)
    assert (full_tail > 1e-3).all()
    assert (ds.relative_error.sel(space="core", rank=7) == 0.0).all()


# --- SAR per space -------------------------------------------------------------------------------


def test_sar_by_space_stacks_full_and_core(taskset):
    ds = cs.sar_by_space(taskset, retained=0.9)
    assert ds.sar.dims == ("space", "task", "reference", "module") and ds.sizes["space"] == 2
    full = pairwise_sar(taskset, retained=0.9)
    np.testing.assert_allclose(ds.sar.sel(space="full").values, full.sar.values)
    for j, m in enumerate(taskset.module_names):
        cores = [M.dense() for M in SPACES["core"].project(taskset.updates(m))[0]]  # M_t from its factors
        for t in range(3):
            for r in range(3):
                assert math.isclose(float(ds.sar.sel(space="core")[t, r, j]), sar(cores[t], cores[r], retained=0.9), rel_tol=1e-9)
    assert ds.sar_offdiag_mean.dims == ("space",)
    assert ds.attrs["spaces"] == ["full", "core"] and "space" not in ds.attrs


def test_sar_of_a_core_matrix_with_itself_is_one(taskset):
    ds = cs.sar_by_space(taskset, retained=1.0)
    for space in ("full", "core"):
        diagonal = np.einsum("ttm->tm", ds.sar.sel(space=space).values)
        np.testing.assert_allclose(diagonal, 1.0, rtol=1e-9)


@given(st.integers(6, 12), st.integers(6, 12), st.lists(st.integers(1, 3), min_size=2, max_size=4), st.integers(0, 2**16),
       st.sampled_from([0.5, 0.95, 1.0]))
@settings(max_examples=25, deadline=None)
def test_sar_is_the_same_in_core_and_full_space(out, inp, ranks, seed, retained):
    """The Core maps are isometries on the tasks' spans, so ‖Π_k ΔW_t‖ / ‖ΔW_t‖ = ‖Π_k M_t‖ / ‖M_t‖ exactly."""
    ts = random_taskset({"w": (out, inp)}, len(ranks), rank=ranks, seed=seed, dtype=torch.float64)
    ds = cs.sar_by_space(ts, retained=retained)
    np.testing.assert_allclose(ds.sar.sel(space="core").values, ds.sar.sel(space="full").values, rtol=1e-7, atol=1e-9)


# --- reference-basis ablation --------------------------------------------------------------------


def test_reference_basis_ablation_known_answers(taskset):
    ds = ba.reference_basis_ablation(taskset, seed=3)
    assert ds.eps_U.dims == ("basis", "task", "module") and list(ds.basis.values) == list(ba.BASES)
    concat = ds.sel(basis="concatenation")
    for var in ("eps_U", "eps_V", "roundtrip_error", "ta_roundtrip_error"):
        assert float(abs(concat[var]).max()) < 1e-9, var  # 003 Sec. 4.2: lossless, zero alignment error
    first = ds.sel(basis="first_task")
    assert float(abs(first.eps_U.sel(task="digits")).max()) < 1e-9  # the first task is aligned with its own basis
    assert (first.eps_U.sel(task=["textures", "signs"]) > 0.1).all()  # the others are not (tasks differ)
    assert (first.roundtrip_error.sel(task=["textures", "signs"]) > 0.1).all() and (first.ta_roundtrip_error > 0.1).all()
    assert first.basis_dim_U.values.tolist() == [2, 2] and concat.basis_dim_U.values.tolist() == [7, 7]
    random = ds.sel(basis="random_orthonormal")
    assert random.basis_dim_U.values.tolist() == [7, 7] and random.basis_dim_V.values.tolist() == [7, 7]
    ranks = np.array([2, 3, 2])[:, None]
    assert ((random.eps_U > 0.1) & (random.eps_U <= ranks + 1e-9)).all()
    np.testing.assert_allclose(ds.eps_U_mean, ds.eps_U.mean(("task", "module")))


def test_reference_basis_ablation_orthogonal_tasks_by_hand():
    """Two rank-2 tasks on orthogonal coordinate planes: the first task's basis misses all of the second."""
    e = torch.eye(6, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    a = LowRank(e[:, :2] @ torch.randn(2, 2, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g, dtype=torch.float64))
    b = LowRank(e[:, 2:4] @ torch.randn(2, 2, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g, dtype=torch.float64))
    ds = ba.reference_basis_ablation(_taskset({"a": {"w": a}, "b": {"w": b}}))
    first = ds.sel(basis="first_task", module="w")
    assert math.isclose(float(first.eps_U.sel(task="b")), 2.0, rel_tol=1e-12)  # r − ‖U_bᵀ U_a‖² = 2 − 0
    assert math.isclose(float(first.roundtrip_error.sel(task="b")), 1.0, rel_tol=1e-12)  # nothing of ΔW_b survives
    assert float(first.eps_U.sel(task="a")) < 1e-12
    concat = ds.sel(basis="concatenation", module="w")
    assert float(abs(concat.eps_U).max()) < 1e-12 and float(concat.roundtrip_error.max()) < 1e-12
    assert int(concat.basis_dim_V) == 4 and int(concat.basis_dim_U) == 4  # 2·2 directions, both within 5 and 6 dims


def test_reference_basis_ablation_identical_tasks_and_overfull_rank():
    g = torch.Generator().manual_seed(1)
    same = LowRank(torch.randn(9, 3, generator=g, dtype=torch.float64), torch.randn(3, 8, generator=g, dtype=torch.float64))
    ds = ba.reference_basis_ablation(_taskset({"a": {"w": same}, "b": {"w": same}}))
    assert float(abs(ds.eps_U.sel(basis="first_task")).max()) < 1e-9  # identical tasks share the first task's basis
    # T·r = 9 > min(out, in) = 5 (003 App. A.4): the concatenation is still exact
    wide = random_taskset({"w": (5, 6)}, 3, rank=3, seed=2, dtype=torch.float64)
    concat = ba.reference_basis_ablation(wide).sel(basis="concatenation")
    assert float(abs(concat.eps_U).max()) < 1e-9 and float(concat.roundtrip_error.max()) < 1e-9
    assert concat.basis_dim_U.values.tolist() == [5] and concat.basis_dim_V.values.tolist() == [6]


def test_random_basis_is_seeded(taskset):
    a = ba.reference_basis_ablation(taskset, seed=0).eps_U.sel(basis="random_orthonormal")
    b = ba.reference_basis_ablation(taskset, seed=0).eps_U.sel(basis="random_orthonormal")
    c = ba.reference_basis_ablation(taskset, seed=1).eps_U.sel(basis="random_orthonormal")
    np.testing.assert_array_equal(a.values, b.values)
    assert not np.allclose(a.values, c.values)


# --- rank of the merged update -------------------------------------------------------------------


def test_merged_rank_grid_known_bounds(taskset):
    ds = cs.merged_rank_grid(taskset)
    assert ds.merged_rank.dims == ("merge_method", "space", "module")
    assert list(ds.merge_method.values) == list(cs.TABLE6_METHODS) and list(ds.space.values) == list(cs.TABLE6_SPACES)
    assert ds.total_lora_rank.values.tolist() == [7, 7] and ds.max_rank.values.tolist() == [16, 14]
    T_r = ds.total_lora_rank
    assert (ds.merged_rank.sel(merge_method="task_arithmetic") == T_r).all()  # generic tasks: TA has rank T·r in every space
    assert (ds.merged_rank.sel(space=["core", "knots"]) <= T_r).all()  # Core and KnOTS stay in a T·r-dimensional space
    assert (ds.merged_rank.sel(merge_method="ties", space="full") > T_r).all()  # trimming the dense ΔW destroys the low rank
    np.testing.assert_allclose(ds.merged_rank_mean, ds.merged_rank.mean("module"))
    assert ds.attrs["hyper_parameters"]["task_arithmetic"] == {"alpha": 0.3}


def test_merged_rank_grid_takes_hyper_parameters_and_compositions(taskset):
    ds = cs.merged_rank_grid(taskset, methods=["ties", "tsv+iso_c"], spaces=["core"], hyper_parameters={"ties": {"density": 0.5}})
    assert ds.attrs["hyper_parameters"]["ties"]["density"] == 0.5
    assert (ds.merged_rank.sel(merge_method="tsv+iso_c") <= ds.total_lora_rank).all()


def test_analyses_skip_dense_modules_and_reject_tasksets_without_lora():
    from mergelab.errors import InputError
    from mergelab.taskset import Dense

    g = torch.Generator().manual_seed(0)
    tasks = {n: {"w": LowRank(torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g)),
                 "emb": Dense(torch.randn(6, 5, generator=g)), "ln.bias": Dense(torch.randn(6, generator=g))} for n in "ab"}
    ds = ba.reference_basis_ablation(_taskset(tasks))
    assert list(ds.module.values) == ["w"]
    with pytest.raises(InputError, match="no LoRA"):
        cs.truncation_curves(_taskset({n: {"emb": t["emb"]} for n, t in tasks.items()}))
