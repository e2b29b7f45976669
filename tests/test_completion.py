"""Issue 29: spectral merges of rank-deficient (LoRA) updates are well-defined — the same on every
thread count and factorisation — by the completion of mergelab.merging.completion; KnOTS' spectral
stages act on the reconstructed update as 003's code does; LoRA-LEGO sees isometric factors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mergelab.merging import merge
from mergelab.merging.spectral import iso_c, iso_cts, tsv
from mergelab.spaces import KnotsSpace
from mergelab.synthetic import random_lowrank
from mergelab.taskset import LowRank, MergedUpdate, TaskSet

T64 = torch.float64
MODULE = "transformer.resblocks.0.attn.q_proj.weight"  # 96 × 96; ranks 4 and 16 alternate over 8 tasks: k = 12


@pytest.fixture(scope="module")
def mixed(micro) -> TaskSet:
    return micro.taskset("mixed").restrict([MODULE])


def _refactored(taskset: TaskSet, tasks: tuple[int, ...] = (0, 1)) -> TaskSet:
    """The same updates, with the named tasks' factors written as ``(3B, A/3)``."""
    out = []
    for i, task in enumerate(taskset.tasks):
        modules = {m: LowRank(3 * u.B, u.A / 3) if i in tasks else u for m, u in task.modules.items()}
        out.append(dataclasses.replace(task, modules=modules))
    return TaskSet(tuple(out), taskset.base)


def _dense(merged: MergedUpdate) -> torch.Tensor:
    return merged.modules[MODULE].dense(T64)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("method, space", [("tsv", "full"), ("tsv", "core"), ("tsv+iso_c", "full"), ("tsv+iso_c", "core"),
                                           ("iso_cts", "full"), ("iso_c", "full"), ("iso_c", "knots")])
def test_spectral_merges_of_mixed_ranks_do_not_depend_on_threads_or_factoring(mixed, method, space):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = merge(mixed, method, space)
        torch.set_num_threads(2)
        two = merge(mixed, method, space)
    finally:
        torch.set_num_threads(threads)
    assert one.meta["completed_directions"][MODULE] > 0  # rank-deficient: the completion was used, and recorded
    assert _relative(_dense(two), _dense(one)) <= 1e-6
    assert _relative(_dense(merge(_refactored(mixed), method, space)), _dense(one)) <= 1e-6  # float32 factors: ~5e-8


def test_the_merge_record_counts_completed_directions_only_where_there_were_some(mixed):
    assert merge(mixed, "tsv", "full").meta["completed_directions"] == {MODULE: 4 * (12 - 4)}  # four rank-4 tasks
    assert "completed_directions" not in merge(mixed, "iso_c", "core").meta  # the core sum has full rank
    assert "completed_directions" not in merge(mixed, "iso_c", "full", support="nonzero").meta


def _lowrank(n_tasks: int, shape: tuple[int, int], ranks: list[int], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [random_lowrank(*shape, ranks[t], g, dtype=T64).dense() for t in range(n_tasks)]


def _polar(M: np.ndarray) -> np.ndarray:
    u, _, vh = np.linalg.svd(M, full_matrices=False)
    return u @ vh


def _complement(M: np.ndarray) -> np.ndarray:
    """An orthonormal basis of the orthogonal complement of M's column span (numpy, full SVD)."""
    u, s, _ = np.linalg.svd(M, full_matrices=True)
    return u[:, int((s > 1e-10 * s[0]).sum()):]


def test_tsv_completed_columns_orthogonal_to_every_kept_direction_drop_out():
    """TSV-M as published (k = ⌊min(m, n)/T⌋ slots per task), its zero-σ slots filled with random
    unit directions orthogonal to every task's non-zero ones: the result is tsv's, whatever the fill."""
    deltas = _lowrank(3, (20, 15), [2, 5, 1], seed=3)  # k = 5: tasks 0 and 2 have 3 and 4 zero-σ slots
    parts = [np.linalg.svd(d.numpy(), full_matrices=False) for d in deltas]
    ranks = [2, 5, 1]
    U_a = np.concatenate([u[:, :r] for (u, _, _), r in zip(parts, ranks)], axis=1)
    V_a = np.concatenate([vh[:r].T for (_, _, vh), r in zip(parts, ranks)], axis=1)
    rng = np.random.default_rng(0)
    for _ in range(3):
        fill_U = _complement(U_a) @ np.linalg.qr(rng.standard_normal((20 - 8, 3 + 4)))[0]
        fill_V = _complement(V_a) @ np.linalg.qr(rng.standard_normal((15 - 8, 3 + 4)))[0]
        U = np.concatenate([U_a, fill_U], axis=1)
        V = np.concatenate([V_a, fill_V], axis=1)
        s = np.concatenate([np.concatenate([x[:r] for (_, x, _), r in zip(parts, ranks)]), np.zeros(7)])
        published = _polar(U) @ np.diag(s) @ _polar(V).T
        torch.testing.assert_close(tsv(deltas), torch.from_numpy(published))


def _iso_reference(delta: np.ndarray) -> np.ndarray:
    """Iso-C over all min(m, n) singular values of ``delta``, written from the rule: the flat spectrum
    σ̄ = Σσ / min(m, n) on the non-zero directions plus σ̄ N_L polar(N_Lᵀ E N_R) N_Rᵀ on the null
    spaces (bases from a full SVD), E the rectangular identity."""
    m, n = delta.shape
    U, s, Vh = np.linalg.svd(delta, full_matrices=True)
    rho = int((s > 1e-4 * s[0]).sum())
    N_L, N_R = U[:, rho:], Vh[rho:].T
    null = N_L @ _polar(N_L.T @ np.eye(m, n) @ N_R) @ N_R.T
    return s[:rho].sum() / min(m, n) * (U[:, :rho] @ Vh[:rho] + null)


@pytest.mark.parametrize("shape", [(18, 12), (12, 18)])
def test_iso_c_completes_the_null_spaces_by_the_frame_whatever_their_bases(shape):
    deltas = _lowrank(2, shape, [2, 3], seed=5)
    torch.testing.assert_close(iso_c(deltas), torch.from_numpy(_iso_reference(sum(deltas).numpy())))
    s = torch.linalg.svdvals(iso_c(deltas))
    torch.testing.assert_close(s, s[0].expand(min(shape)))  # isotropic on every singular value, as the original


def test_iso_cts_of_a_lora_sum_whose_rank_fits_the_common_space_is_iso_c():
    deltas = _lowrank(3, (20, 16), [2, 3, 1], seed=1)  # ρ = 6 ≤ k_c = 16 − 3·1
    torch.testing.assert_close(iso_cts(deltas), iso_c(deltas))


def test_knots_iso_c_isotropises_the_reconstructed_update_as_003s_code(mixed):
    reference = _iso_reference(sum(u.dense(T64) for u in mixed.updates(MODULE)).numpy())
    assert _relative(_dense(merge(mixed, "iso_c", "knots")), torch.from_numpy(reference)) <= 1e-6
    ties = _dense(merge(mixed, "ties", "knots"))  # +iso_c's inner alpha is 1, as ties' default
    composed = _dense(merge(mixed, "ties+iso_c", "knots"))
    assert _relative(composed, torch.from_numpy(_iso_reference(ties.numpy()))) <= 1e-6
    represented = _dense(merge(mixed, "iso_c", KnotsSpace(spectral="represented")))  # the k represented directions only
    assert _relative(represented, _dense(merge(mixed, "iso_c", "full", support="nonzero"))) <= 1e-6


def test_lora_lego_per_layer_clusters_on_isometric_factors_like_every_other_space(mixed):
    full = _dense(merge(mixed, "lora_lego", "full"))
    per_layer = _dense(merge(mixed, "lora_lego", "knots", space_options={"variant": "per_layer"}))
    assert _relative(per_layer, full) <= 1e-6
