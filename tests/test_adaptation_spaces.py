"""Core-space variants of TARA-B and AdaRank (003 Sec. 4 directions lifted back), and the test-split guard."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mergelab.adaptation import ADAPTERS, Schedule, adapt, build
from mergelab.bench import MicroSpec, load_bench
from mergelab.errors import InputError
from mergelab.bench import BenchSession
from mergelab.taskset import Dense, TaskSet, TaskUpdate

pytestmark = pytest.mark.usefixtures("one_thread")

PAIR = ("signs", "housenumbers")
VARIANTS = [("tara_b", {}), ("adarank", {"origin": "ta"}), ("adarank", {"origin": "cart"})]


@pytest.fixture(scope="module")
def pair(micro):
    session = BenchSession(load_bench(MicroSpec(root=micro.root, rank=4), PAIR))
    return session.taskset, session, session.forward()


def _close(a, b, rtol=1e-5):
    return float((a - b).abs().max()) <= rtol * float(b.abs().max())


@pytest.mark.parametrize(("method", "hp"), VARIANTS)
def test_core_and_full_variants_start_from_the_same_merged_update(pair, method, hp):
    taskset, _, _ = pair
    full, core = build(method, taskset, space="full", **hp), build(method, taskset, space="core", **hp)
    assert (full.space, core.space) == ("full", "core")
    assert [b.size for b in core.banks] == [b.size for b in full.banks]
    full_deltas, core_deltas = full.deltas(), core.deltas()
    for m in taskset.module_names:
        assert _close(core_deltas[m].detach(), full_deltas[m].detach())
    r_total = sum(u.rank for u in taskset.updates(taskset.module_names[0]))
    merged = core.merged_update()
    for m, update in merged.modules.items():
        assert update.rank <= r_total  # LowRank(U_B M*, V_Aᵀ): rank d_V ≤ Σ r_t
        assert _close(update.dense(), full_deltas[m].detach())


def test_core_tara_b_directions_are_the_full_shared_singular_directions(pair):
    """σ_k u_k v_kiᵀ of 001 Eq. 9 from [M_1 … M_N] equal those of [ΔW_1 … ΔW_N] up to sign."""
    taskset, _, _ = pair
    full, core = build("tara_b", taskset, space="full"), build("tara_b", taskset, space="core")
    fb, cb = full.banks[0], core.banks[0]
    (core_B, core_A), (full_B, full_A) = cb.factors(), fb.factors()
    lifted_B, lifted_A = cb.left @ core_B, core_A @ cb.right  # (out, K), (K, in)
    for k in range(fb.size):
        direction = torch.outer(full_B[:, k], full_A[k])
        assert _close(torch.outer(lifted_B[:, k], lifted_A[k]), direction, rtol=1e-4)


@pytest.mark.parametrize("space", ["full", "core"])
def test_tied_tara_b_bank_forms_the_same_update_and_gradient_as_its_directions(pair, space):
    """B (Σ_i diag(φ_i) A_i) = Σ_{i,k} φ_ik B[:, k] A[iR + k]: the tied product is only a cheaper order."""
    taskset, _, _ = pair
    bank = build("tara_b", taskset, space=space).banks[0]
    assert bank.tied and bank.B.shape[1] * len(taskset) == bank.size
    B, A = bank.factors()
    c = torch.rand(bank.size, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).float().requires_grad_()
    tied = bank._inner(c)
    (grad,) = torch.autograd.grad(tied.square().sum(), c)
    c_ref = c.detach().clone().requires_grad_()
    untied = (B * c_ref) @ A
    (grad_ref,) = torch.autograd.grad(untied.square().sum(), c_ref)
    assert _close(tied.detach(), untied.detach(), rtol=1e-5) and _close(grad, grad_ref, rtol=1e-4)


@pytest.mark.parametrize(("method", "hp"), VARIANTS[:2])
def test_core_and_full_adaptation_follow_the_same_trajectory(pair, method, hp):
    taskset, session, forward = pair
    results = {space: adapt(method, taskset, forward, session.val_streams(PAIR, batch_size=8, seed=1),
                            Schedule(iters=3, lr=0.01), record_every=1, space=space, **hp) for space in ("full", "core")}
    for space, result in results.items():
        assert result.merged.meta["space"] == space
        assert result.history.attrs["space"] == space
    full, core = (results[s].merged.modules for s in ("full", "core"))
    moved = False
    init = build(method, taskset, **hp).deltas()
    for m in taskset.module_names:
        assert _close(core[m].dense(), full[m].dense(), rtol=1e-4)
        moved |= not _close(full[m].dense(), init[m].detach(), rtol=1e-4)
    assert moved  # the runs took real steps, so agreement is not that of two initial models
    hf, hc = results["full"].history, results["core"].history
    torch.testing.assert_close(torch.tensor(hc["loss"].values), torch.tensor(hf["loss"].values), rtol=1e-4, atol=1e-5)
    assert hf["coefficient_mean"].dims == ("record", "module", "task")


def test_space_is_validated_per_method(pair):
    taskset, _, _ = pair
    with pytest.raises(InputError, match="core-space variants exist for tara_b and adarank"):
        build("adamerging", taskset, space="core")
    with pytest.raises(InputError, match="not 'knots'"):
        build("tara_b", taskset, space="knots")
    dense = TaskSet(tuple(TaskUpdate(t.name, {m: Dense(u.dense()) for m, u in t.modules.items()}) for t in taskset))
    with pytest.raises(InputError, match="core space is built from LoRA factors"):
        build("adarank", dense, space="core")


class _TestSplitRead(AssertionError):
    pass


def _guarded(task):
    def make_split(split):
        if split == "test":
            raise _TestSplitRead(f"{task.name}: the test split was read during adaptation")
        return task.make_split(split)

    return dataclasses.replace(task, make_split=make_split, _cache={})


@pytest.mark.parametrize("method", sorted(ADAPTERS))
def test_no_adaptation_path_reads_the_test_split(micro, method):
    bench = load_bench(MicroSpec(root=micro.root, rank=4), PAIR)
    session = BenchSession(dataclasses.replace(bench, tasks={n: _guarded(t) for n, t in bench.tasks.items()}))
    with pytest.raises(_TestSplitRead):
        session.bench.tasks[PAIR[0]].tensors("test")  # the guard is live
    taskset, forward = session.taskset, session.forward()
    for space in ADAPTERS[method].spaces:
        result = adapt(method, taskset, forward, session.val_streams(PAIR, batch_size=4, seed=0),
                       Schedule(iters=2, scalarization="stch"), anchor_batches=1, space=space)
        assert result.history.sizes["iteration"] == 2


def test_an_adaptive_run_trains_its_coefficients_only_and_leaves_no_gradient_on_the_encoder(pair):
    taskset, session, forward = pair
    result = adapt("adamerging", taskset, forward, session.val_streams(PAIR, batch_size=4, seed=0), Schedule(iters=2))
    assert result.history.attrs["mean_abs_delta_coef"] > 0  # the coefficients moved
    assert not any(p.requires_grad or p.grad is not None for p in session.backbone.vision.parameters())
