"""Merge methods: hand-checked semantics, single-task identities, projections, the registry (every method's conformance: tests/test_conformance.py)."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mergelab.errors import InputError
from mergelab.merging import METHODS, collect_input_grams, merge, project
from mergelab.merging.arithmetic import metagpt, normavg
from mergelab.merging.consensus import consensus, tall_masks
from mergelab.merging.lora import linear, lora_lego
from mergelab.merging.regmean import regmean
from mergelab.merging.sparsify import breadcrumbs, dare_linear, ties
from mergelab.merging.spectral import cart, cart_rank, iso_c, iso_cts, star, svd_of_sum, tsv, tsv_components
from mergelab.linalg import polar
from mergelab.synthetic import random_lowrank, random_taskset
from mergelab.taskset import Dense, LowRank, TaskSet, TaskUpdate

T64 = torch.float64


def vec(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=T64)


def lowrank_sum(n_tasks: int, shape=(12, 10), rank=2, seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [random_lowrank(*shape, rank, g, dtype=T64).dense() for _ in range(n_tasks)]


# TIES ---------------------------------------------------------------------------------------------

TAUS = [vec(3, -1, 2, 0), vec(-2, -4, 1, 5), vec(1, 2, -6, 1)]


def test_ties_elects_the_sign_of_the_sum_and_takes_the_disjoint_mean():
    # sums (2, -3, -3, 6) elect (+, -, -, +); agreeing non-zero entries are averaged
    torch.testing.assert_close(ties(TAUS, density=1.0), vec(2.0, -2.5, -6.0, 3.0))
    # sign by count: entry 2 has two positive signs against one negative
    torch.testing.assert_close(ties(TAUS, density=1.0, sign="count"), vec(2.0, -2.5, 1.5, 3.0))


def test_ties_trims_each_task_to_its_top_density_fraction_before_electing():
    # top-2 per task: (3,0,2,0), (0,-4,0,5), (0,2,-6,0); sums (3,-2,-4,5)
    torch.testing.assert_close(ties(TAUS, density=0.5, alpha=2.0), 2.0 * vec(3.0, -4.0, -6.0, 5.0))


def test_ties_zero_total_elects_plus_and_an_entry_nobody_keeps_stays_zero():
    torch.testing.assert_close(ties([vec(1.0, 0.0), vec(-1.0, 0.0)], density=1.0), vec(1.0, 0.0))


# DARE ---------------------------------------------------------------------------------------------


def test_dare_rescales_survivors_and_preserves_the_expectation():
    delta = torch.linspace(-2, 3, 60, dtype=T64)
    p, n = 0.6, 600
    samples = torch.stack([dare_linear([delta], p=p, alpha=1.0, seed=s) for s in range(n)])
    kept = samples != 0
    torch.testing.assert_close(samples[kept], (delta / (1 - p)).expand_as(samples)[kept])
    assert abs(float(kept.double().mean()) - (1 - p)) < 0.02
    # E[x] = delta; the standard error of the mean is |delta| sqrt(p/(1-p)/n)
    bound = 5 * delta.abs() * (p / (1 - p) / n) ** 0.5 + 1e-12
    assert bool(((samples.mean(dim=0) - delta).abs() <= bound).all())


def test_dare_keeps_the_requested_share_in_half_precision():
    from mergelab.merging.sparsify import random_drop

    delta = torch.ones(1_000_000, dtype=torch.bfloat16)
    kept = float((random_drop(delta, 0.1, torch.Generator().manual_seed(0)) != 0).float().mean())
    assert kept == pytest.approx(0.9, abs=5e-4)  # a bf16 probability (0.8984) keeps 0.8985 here


# Spectral methods -----------------------------------------------------------------------------------


def test_iso_c_is_the_original_by_default_and_the_guard_keeps_the_null_space_empty():
    deltas = lowrank_sum(3, rank=2)  # the sum has rank 6 of min(12, 10) = 10
    total_s = torch.linalg.svdvals(sum(deltas))
    original = torch.linalg.svdvals(iso_c(deltas))  # Marczak et al.: every singular value -> the mean of all 10
    torch.testing.assert_close(original, total_s.mean().expand(10))
    guarded = torch.linalg.svdvals(iso_c(deltas, support="nonzero"))
    torch.testing.assert_close(guarded[:6], total_s[:6].mean().expand(6))
    assert float(guarded[6:].max()) < 1e-10  # the null space stays empty


def test_the_guard_finds_the_rank_of_a_dense_update_with_float32_rounding_noise():
    g = torch.Generator().manual_seed(3)
    W0 = 0.02 * torch.randn(128, 128, generator=g)
    delta = random_lowrank(128, 128, 32, g).dense()
    delta = delta * (0.002 * W0.norm() / delta.norm())  # ‖ΔW‖ = 0.2 % of ‖W_0‖
    noisy = ((W0 + delta) - W0).to(T64)  # a full fine-tune's update: float32 rounding at eps32 · |W0|
    assert int(torch.linalg.matrix_rank(noisy)) == 128  # the noise is not zero at float64 precision
    s = torch.linalg.svdvals(iso_c([noisy], support="nonzero"))
    assert int((s > 1e-3 * s[0]).sum()) == 32
    U, _, _ = tsv_components([noisy])
    assert U.shape[1] == 32


def _tsv_reference(deltas: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """TSV-M from Gargiulo et al. (2025) Sec. 4, in numpy: per task the top ⌊min(m, n)/T⌋ triplets,
    concatenated, U and V replaced by their nearest orthogonal matrices (U_u V_uᵀ of their SVDs)."""
    import numpy as np

    k = min(deltas[0].shape) // len(deltas)
    parts = [np.linalg.svd(d.numpy(), full_matrices=False) for d in deltas]
    U = np.concatenate([u[:, :k] for u, _, _ in parts], axis=1)
    s = np.concatenate([x[:k] for _, x, _ in parts])
    V = np.concatenate([vh[:k].T for _, _, vh in parts], axis=1)
    orth = lambda M: (lambda u, _, vh: u @ vh)(*np.linalg.svd(M, full_matrices=False))  # noqa: E731
    return torch.from_numpy(alpha * orth(U) @ np.diag(s) @ orth(V).T)


def test_tsv_matches_a_reference_written_from_the_paper_on_lora_inputs():
    deltas = lowrank_sum(3, shape=(14, 9), rank=3, seed=4)  # k = ⌊9/3⌋ = 3 = each task's rank
    torch.testing.assert_close(tsv(deltas, alpha=0.7), _tsv_reference(deltas, 0.7))


def test_tsv_with_more_tasks_than_dimensions_falls_back_to_the_mean_with_a_warning():
    deltas = lowrank_sum(5, shape=(4, 6), rank=1, seed=8)  # ⌊4/5⌋ = 0 components per task
    with pytest.warns(UserWarning, match="0 singular components per task"):
        out = tsv(deltas, alpha=2.0)
    torch.testing.assert_close(out, 2.0 * sum(deltas) / 5)


def test_iso_cts_original_is_isotropic_on_every_singular_value():
    deltas = lowrank_sum(3, shape=(20, 16), rank=3, seed=1)
    s = torch.linalg.svdvals(iso_cts(deltas, common_fraction=0.5))
    torch.testing.assert_close(s, s[0].expand(16))


def test_iso_cts_is_isotropic_on_common_plus_task_subspaces():
    deltas = lowrank_sum(3, shape=(20, 16), rank=3, seed=1)
    s = torch.linalg.svdvals(iso_cts(deltas, common_fraction=0.5, support="nonzero"))
    d = 9  # numerical rank of the sum
    torch.testing.assert_close(s[:d], s[0].expand(d))
    assert float(s[d:].max()) < 1e-10


def test_tsv_whitens_the_concatenated_singular_vectors():
    deltas = lowrank_sum(3, shape=(16, 14), rank=3, seed=2)
    U, s, Vh = tsv_components(deltas)
    assert U.shape[1] == 9  # ⌊14/3⌋ = 4 per task, but each task has only 3 non-zero singular values
    U_perp, V_perp = polar(U), polar(Vh)
    torch.testing.assert_close(U_perp.T @ U_perp, torch.eye(9, dtype=T64))
    torch.testing.assert_close(V_perp @ V_perp.T, torch.eye(9, dtype=T64))
    merged_s = torch.linalg.svdvals(tsv(deltas))  # orthonormal factors: the spectrum is the concatenated s
    torch.testing.assert_close(merged_s[:9], s.sort(descending=True).values)


def test_star_truncates_by_nuclear_norm_share_and_preserves_the_nuclear_norm():
    delta = torch.diag(vec(4, 3, 2, 1))  # nuclear norm 10
    torch.testing.assert_close(star([delta], eta=40), torch.diag(vec(10, 0, 0, 0)))
    torch.testing.assert_close(star([delta], eta=50), torch.diag(vec(40 / 7, 30 / 7, 0, 0)))
    deltas = lowrank_sum(2, rank=3, seed=5)
    for d in deltas:
        torch.testing.assert_close(torch.linalg.svdvals(star([d], eta=60)).sum(), torch.linalg.svdvals(d).sum())


def test_cart_keeps_the_mean_plus_low_rank_centred_task_vectors():
    deltas = lowrank_sum(3, rank=2, seed=6)
    mean = sum(deltas) / 3
    torch.testing.assert_close(cart(deltas, rank_ratio=1.0, lam=5.0), mean)  # Σ_t (τ_t − τ̄) = 0
    residual = (cart(deltas, rank_ratio=0.1, lam=1.0, alpha=1.0) - mean)  # k = 1 per task
    assert int(torch.linalg.matrix_rank(residual)) <= 3


def test_cart_rank_rounds_up_as_the_core_space_code():
    assert cart_rank(0.16, (96, 96)) == 16  # ⌈15.36⌉; the CART code's int() gives 15
    assert cart_rank(0.1, (30, 40)) == 3  # 0.1 · 30 is 3.0000000000000004 in floating point
    assert cart_rank(0.001, (8, 8)) == 1


def test_svd_of_sum_is_the_best_low_rank_approximation_of_the_scaled_sum():
    deltas = lowrank_sum(3, rank=2, seed=7)
    out = svd_of_sum(deltas, alpha=0.5)
    assert isinstance(out, LowRank) and out.rank == 2
    U, s, Vh = torch.linalg.svd(0.5 * sum(deltas))
    torch.testing.assert_close(out.dense(), U[:, :2] @ torch.diag(s[:2]) @ Vh[:2])


# Factor methods -------------------------------------------------------------------------------------


def test_linear_is_task_arithmetic_on_the_factors_with_cross_terms():
    g = torch.Generator().manual_seed(0)
    f1, f2 = random_lowrank(6, 5, 2, g, dtype=T64), random_lowrank(6, 5, 3, g, dtype=T64)
    out = linear([f1, f2], alpha=0.5)
    B = torch.cat([f1.B, torch.zeros(6, 1, dtype=T64)], 1) + f2.B
    A = torch.cat([f1.A, torch.zeros(1, 5, dtype=T64)], 0) + f2.A
    torch.testing.assert_close(out.dense(), 0.5 * B @ A)
    torch.testing.assert_close(linear([f1, f2], alpha=-0.5).dense(), -0.5 * B @ A)


def test_lora_lego_returns_the_unit_of_a_cluster_of_identical_units():
    g = torch.Generator().manual_seed(1)
    lora = random_lowrank(8, 6, 3, g, dtype=T64)
    out = lora_lego([lora, lora, lora])  # k = r = 3 clusters of three identical units each
    assert out.rank == 3
    torch.testing.assert_close(out.dense(), lora.dense())


def test_lora_lego_reweights_centroids_and_outputs():
    a, b = vec(1, 0), vec(0, 2)
    f1 = LowRank(b[:, None], a[None, :])  # unit [a, b], ‖u‖ = √5
    f2 = LowRank(-b[:, None], -a[None, :])  # the sign-flipped copy: its raw centroid with f1 is 0
    assert float(lora_lego([f1, f2], k=1).dense().abs().max()) == 0.0
    g = LowRank(2 * b[:, None], 2 * a[None, :])  # ‖u‖ = 2√5: centroid 1.5 u, reweighted to norm 1.5 √5 (no change)
    plain = lora_lego([f1, g], k=1, param_reweight=False, output_reweight=False)
    torch.testing.assert_close(plain.dense(), 2.25 * f1.dense())
    h = LowRank(b[:, None], -a[None, :])  # centroid (0, b): norm 2 → reweighted to mean norm √5
    reweighted = lora_lego([f1, h], k=1, output_reweight=False)
    assert float(reweighted.dense().abs().max()) == 0.0  # ā = 0 whatever the scale
    out = lora_lego([f1, g], k=1, output_reweight=True)  # √r/√k = 1 here (r = 1)
    torch.testing.assert_close(out.dense(), plain.dense())


# Element-wise data-free methods ------------------------------------------------------------------


def test_consensus_keeps_entries_selected_by_at_least_k_tall_masks():
    t1, t2 = vec(1.0, 0.1, 0.0), vec(1.0, -0.1, 2.0)
    assert tall_masks([t1, t2], 0.5).tolist() == [[True, True, False], [True, True, True]]
    torch.testing.assert_close(consensus([t1, t2], lam=0.5, k=2, alpha=0.5), vec(1.0, 0.0, 0.0))


def test_metagpt_and_normavg_weigh_by_norms():
    t1, t2 = vec(3.0, 0.0), vec(0.0, 4.0)
    torch.testing.assert_close(metagpt([t1, t2]), vec(27 / 25, 64 / 25))
    torch.testing.assert_close(metagpt([t1, t2], power=1.0), vec(9 / 7, 16 / 7))
    torch.testing.assert_close(normavg([t1, t2]), vec(1.5, 1.5))


SPACES = [("full", {}), ("knots", {"variant": "paper"}), ("knots", {"variant": "per_layer"}), ("core", {})]


@pytest.mark.parametrize("method", ["metagpt", "normavg"])
@pytest.mark.parametrize("group", ["layer", "tensor", "model"])
def test_norm_weighted_merges_are_the_same_in_every_space(method, group):
    taskset = random_taskset({"resblocks.0.attn.w": (9, 8), "resblocks.0.mlp.w": (9, 8), "resblocks.1.mlp.w": (9, 8)}, 3,
                             rank=2, seed=3)
    merged = [merge(taskset, method, space, space_options=options, group=group) for space, options in SPACES]
    for other in merged[1:]:
        for m in taskset.module_names:
            torch.testing.assert_close(other.modules[m].dense(T64), merged[0].modules[m].dense(T64))


@pytest.mark.parametrize("method", ["iso_c", "tsv+iso_c", "ties+iso_c"])
def test_isotropic_merges_are_isotropic_in_every_space(method):
    taskset = random_taskset({"w": (12, 10)}, 3, rank=2, seed=5)
    for space, options in SPACES:
        delta = merge(taskset, method, space, space_options=options).modules["w"].dense(T64)
        s = torch.linalg.svdvals(delta)
        k = int((s > 1e-9 * s[0]).sum())
        assert k >= 6
        torch.testing.assert_close(s[:k], s[0].expand(k), msg=f"{method} in {space} {options}")


def test_svd_of_the_sum_is_the_best_low_rank_approximation_in_every_space():
    taskset = random_taskset({"w": (12, 10)}, 3, rank=2, seed=6)
    total = sum(u.dense(T64) for u in taskset.updates("w"))
    U, s, Vh = torch.linalg.svd(0.5 * total)
    best = U[:, :2] @ torch.diag(s[:2]) @ Vh[:2]
    for space, options in SPACES:
        torch.testing.assert_close(merge(taskset, "svd", space, space_options=options, alpha=0.5, rank=2).modules["w"].dense(T64), best)


def test_metagpt_per_layer_weighs_a_whole_block_by_its_norm():
    taskset = random_taskset({"resblocks.0.attn.w": (6, 5), "resblocks.0.mlp.w": (6, 5), "ln_post.w": (6, 5)}, 2, rank=1, seed=4)
    sq = {m: torch.tensor([u.norm() ** 2 for u in taskset.updates(m)], dtype=T64) for m in taskset.module_names}
    block = sq["resblocks.0.attn.w"] + sq["resblocks.0.mlp.w"]  # 004 Eq. 4: every parameter of layer 0 together
    for group, norms in (("layer", block), ("tensor", sq["resblocks.0.attn.w"])):
        weights = norms / norms.sum()  # power 2: squared norms
        out = merge(taskset, "metagpt", group=group).modules["resblocks.0.attn.w"].dense(T64)
        expected = sum(w * u.dense(T64) for w, u in zip(weights, taskset.updates("resblocks.0.attn.w"), strict=True))
        torch.testing.assert_close(out, expected)
    ln = merge(taskset, "metagpt", power=1.0).modules["ln_post.w"].dense(T64)  # outside the blocks: its own layer
    norms = sq["ln_post.w"].sqrt()
    torch.testing.assert_close(ln, sum(w * u.dense(T64) for w, u in zip(norms / norms.sum(), taskset.updates("ln_post.w"), strict=True)))


def test_normavg_ignores_a_task_that_left_the_layer_unchanged():
    t1, t2, zero = vec(3.0, 4.0), vec(0.0, 10.0), vec(0.0, 0.0)
    torch.testing.assert_close(normavg([t1, t2, zero]), (t1 + vec(0.0, 5.0)) / 3)


def test_breadcrumbs_drops_outliers_and_small_entries():
    delta = torch.arange(1, 101, dtype=T64)
    out = breadcrumbs([delta], density=0.9, gamma=0.05, alpha=1.0)
    assert out.nonzero().flatten().tolist() == list(range(5, 95))  # keeps 6 … 95


def test_regmean_solves_the_per_layer_least_squares():
    g = torch.Generator().manual_seed(2)
    deltas = [torch.randn(5, 4, generator=g, dtype=T64) for _ in range(3)]
    Xs = [torch.randn(30, 4, generator=g, dtype=T64) for _ in range(3)]
    grams = [X.T @ X / 30 for X in Xs]
    merged = regmean(deltas, grams, nondiag=1.0)
    gradient = sum((merged - d) @ G for d, G in zip(deltas, grams, strict=True))  # Σ_t (W − W_t) G_t = 0
    torch.testing.assert_close(gradient, torch.zeros_like(gradient), atol=1e-10, rtol=0)
    eye = [torch.eye(4, dtype=T64)] * 3
    torch.testing.assert_close(regmean(deltas, eye), sum(deltas) / 3)
    with pytest.raises(InputError, match="singular"):
        regmean(deltas, [torch.zeros(4, 4, dtype=T64)] * 3)


def test_collect_input_grams_hooks_linear_and_self_attention_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    batches = [torch.randn(5, 4) for _ in range(3)]
    grams = collect_input_grams(model, model, batches, ["0.weight", "2.weight"])
    X = torch.cat(batches).double()
    H = torch.relu(model[0](torch.cat(batches))).double()
    torch.testing.assert_close(grams["0.weight"], X.T @ X / 15)
    torch.testing.assert_close(grams["2.weight"], H.T @ H / 15)
    attention = nn.MultiheadAttention(4, 2, batch_first=True)
    x = torch.randn(2, 3, 4)
    G = collect_input_grams(attention, lambda b: attention(b, b, b), [x], ["in_proj_weight"])["in_proj_weight"]
    rows = x.reshape(-1, 4).double()
    torch.testing.assert_close(G, rows.T @ rows / 6)
    with pytest.raises(InputError, match="never ran"):
        collect_input_grams(attention, lambda b: attention(b, b, b), [x], ["out_proj.weight"])
    with pytest.raises(InputError, match="not the weight of an nn.Linear"):
        collect_input_grams(model, model, batches, ["0.bias"])


# Single-task identities, projections ----------------------------------------------------------------
# Every registered method's purity, seed determinism and declared single-task identity (MergeMethod.identity)
# in every registered space are tests/test_conformance.py's; here the identity over shapes and ranks in
# the KnOTS per-layer variant, whose left map is no isometry.


@settings(max_examples=12, deadline=None)
@given(st.integers(1, 4), st.integers(2, 9), st.integers(2, 9), st.integers(0, 1000))
def test_merging_a_single_task_returns_it_in_the_knots_per_layer_variant(rank, n_out, n_in, seed):
    rank = min(rank, n_out, n_in)
    taskset = random_taskset({"w": (n_out, n_in)}, ["only"], rank=rank, seed=seed, dtype=T64)
    grams = {"grams": {"only": {"w": torch.eye(n_in, dtype=T64)}}}
    expected = taskset.updates("w")[0].dense()
    for name, method in METHODS.items():
        if method.identity is None:
            continue
        side = grams if method.side == ("grams",) else None
        out = merge(taskset, name, "knots", space_options={"variant": "per_layer"}, side_inputs=side, **method.identity).modules["w"]
        torch.testing.assert_close(out.dense(T64), expected, atol=1e-9, rtol=1e-7, msg=name)


def test_a_projection_is_reused_across_merges_without_being_modified():
    taskset = random_taskset({"a.weight": (9, 7), "b.weight": (6, 6)}, 3, rank=2, seed=4)
    projection = project(taskset, "knots", naive=True)
    snapshot = {m: [x.clone() for x in xs] for m, xs in projection.matrices.items()}
    for method, hp in (("dare_ties", {"p": 0.5}), ("ties", {"density": 0.3}), ("dare_ties", {"p": 0.5}), ("tsv+iso_c", {})):
        reused = merge(projection, method, **hp)
        fresh = merge(taskset, method, "knots", space_options={"naive": True}, **hp)
        for m in taskset.module_names:
            torch.testing.assert_close(reused.modules[m].dense(), fresh.modules[m].dense(), atol=0, rtol=0)
        assert reused.meta["space_options"]["naive"] is True
    for m, xs in projection.matrices.items():
        assert all(torch.equal(x, y) for x, y in zip(xs, snapshot[m], strict=True))
    with pytest.raises(InputError, match="project again to merge in another space"):
        merge(projection, "ties", "core")
    merge(projection, "ties", "knots", space_options={"naive": True})  # the same space is fine


# Non-matrix parameters, compositions, validation ---------------------------------------------------


def test_non_matrix_parameters_follow_each_methods_rule():
    taskset = random_taskset({"w": (4, 3)}, 2, rank=1, seed=0)
    biases = [vec(1.0, -2.0), vec(3.0, 2.0)]
    taskset = TaskSet(tuple(TaskUpdate(t.name, {**t.modules, "b": Dense(b)}) for t, b in zip(taskset, biases, strict=True)))
    bias = lambda name, **hp: merge(taskset, name, "core", **hp).modules["b"].delta  # noqa: E731
    torch.testing.assert_close(bias("task_arithmetic", alpha=0.5), vec(2.0, 0.0))  # sum × alpha
    torch.testing.assert_close(bias("tsv", alpha=2.0), vec(4.0, 0.0))  # mean × alpha, as TSV-M / Iso
    torch.testing.assert_close(bias("ties", density=1.0), vec(2.0, 2.0))  # TIES itself
    torch.testing.assert_close(bias("linear", alpha=0.5), vec(2.0, 0.0))  # sum × alpha
    torch.testing.assert_close(bias("ties+iso_c", density=1.0, alpha=3.0), vec(6.0, 6.0))  # TIES, then mean of one × α
    assert merge(taskset, "tsv", "core").meta["nonmatrix"] == {"tsv": "mean"}


def test_compositions_post_process_the_merged_matrix():
    deltas = lowrank_sum(3, rank=2, seed=9)
    composed = METHODS["tsv+iso_c"]
    torch.testing.assert_close(composed.fn(deltas, alpha=2.0), iso_c([tsv(deltas)], alpha=2.0))
    assert set(composed.params) == {"tsv.alpha", "tsv.rank_rtol", "iso_c.alpha", "iso_c.support", "iso_c.rank_rtol"}
    assert composed.resolve({"alpha": 2.0})["iso_c.alpha"] == 2.0  # unprefixed -> last stage
    assert composed.resolve({"tsv.alpha": 0.5})["tsv.alpha"] == 0.5
    assert "tsv.alpha" not in composed.grid and "iso_c.alpha" in composed.grid
    taskset = random_taskset({"w": (9, 8)}, 3, rank=2, seed=1)
    core = merge(taskset, "ties+iso_c", "core", density=0.5).modules["w"].dense(T64)
    s = torch.linalg.svdvals(core)
    torch.testing.assert_close(s[:6], s[0].expand(6))  # isotropic on the core's (full) rank
    with pytest.raises(InputError, match="'linear' needs LoRA factors and cannot post-process"):
        METHODS["tsv+linear"]
    with pytest.raises(InputError, match="'regmean' needs side inputs"):
        METHODS["ties+regmean"]


@pytest.mark.parametrize("inner", ["task_arithmetic", "dare_linear", "magnitude_prune", "breadcrumbs", "consensus", "svd"])
def test_a_composition_has_one_scaling_the_outer_alpha(inner):
    deltas = lowrank_sum(3, rank=2, seed=9)
    composed = METHODS[f"{inner}+iso_c"]
    assert composed.params[f"{inner}.alpha"].default == 1.0
    inner_alone = METHODS[inner]
    hp = {"p": 0.0} if inner == "dare_linear" else {"density": 1.0} if inner in ("magnitude_prune",) else {}
    once = inner_alone.fn(deltas, **{**hp, "alpha": 1.0})
    once = once.dense() if isinstance(once, LowRank) else once
    torch.testing.assert_close(composed.fn(deltas, alpha=0.7, **{f"{inner}.{k}": v for k, v in hp.items()}),
                               iso_c([once], alpha=0.7))
    if inner == "task_arithmetic":  # isotropizing the sum is Iso-C itself, at the same norm
        torch.testing.assert_close(composed.fn(deltas, alpha=0.7), iso_c(deltas, alpha=0.7))


@pytest.mark.parametrize("post", ["consensus", "cart", "normavg", "metagpt", "average", "task_arithmetic", "tsv"])
def test_post_processors_that_do_nothing_to_one_matrix_are_refused(post):
    reason = "needs side inputs \\(norms\\)" if post in ("normavg", "metagpt") else \
        "leaves a single merged matrix unchanged, rescaled or zero.*post-processors: ties"
    with pytest.raises(InputError, match=f"'{post}' {reason}"):
        METHODS[f"ties+{post}"]


@pytest.mark.parametrize(("method", "hp", "message"), [
    ("ties", {"densty": 0.2}, "method 'ties' has no option 'densty'; allowed: density (float in (0, 1]), alpha"),
    ("ties", {"density": 0.0}, "density=0.0 is invalid; expected float in (0, 1]"),
    ("ties", {"sign": "vote"}, "sign='vote' is invalid; expected one of 'sum', 'count'"),
    ("dare_linear", {"p": 1.0}, "p=1.0 is invalid; expected float in [0, 1)"),
    ("lora_lego", {"k": 2.5}, "k=2.5 is invalid; expected int in [1, inf] or None"),
    ("tsv", {"alpha": "x"}, "alpha='x' is invalid; expected float"),
    ("nope", {}, "unknown merge method 'nope'; allowed: average, task_arithmetic"),
    ("tsv+nope", {}, "unknown merge method 'nope'"),
])
def test_bad_hyper_parameters_name_the_allowed_ones(method, hp, message):
    taskset = random_taskset({"w": (4, 3)}, 2, rank=1, seed=0)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        merge(taskset, method, "full", **hp)


def test_side_inputs_are_required_checked_and_not_silently_ignored():
    taskset = random_taskset({"w": (4, 3)}, 2, rank=1, seed=0)
    with pytest.raises(InputError, match="needs side input 'grams'"):
        merge(taskset, "regmean")
    with pytest.raises(InputError, match=r"lacks 1 \(task, module\) entries"):
        merge(taskset, "regmean", side_inputs={"grams": {"task0": {"w": torch.eye(3)}, "task1": {}}})
    with pytest.raises(InputError, match=r"has shape \(4, 4\), expected \(3, 3\)"):
        merge(taskset, "regmean", side_inputs={"grams": {t: {"w": torch.eye(4)} for t in taskset.names}})
    with pytest.raises(InputError, match="takes no side input 'grams'"):
        merge(taskset, "ties", side_inputs={"grams": {}})


def test_registry_grids_are_valid_and_every_method_documents_its_paper():
    for name, method in METHODS.items():
        assert method.name == name
        for key, values in method.grid.items():
            assert values and all(method.params[key].coerce(v, name) == v for v in values)
        assert re.search(r"\b20[12]\d\b", method.fn.__doc__ or ""), f"{name}: the docstring cites no paper"
