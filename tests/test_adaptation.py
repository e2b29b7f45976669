"""Test-time adaptation: the functional merged model, parameterisations, STE, STCH, one step."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from mergelab.adaptation import ADAPTERS, Forward, Schedule, adapt, build
from mergelab.adaptation.loop import objective_losses
from mergelab.adaptation.models import straight_through_mask
from mergelab.adaptation.objectives import SCALARIZATIONS, smooth_tchebycheff, validate_preference, weighted_sum
from mergelab.checkpoints import load_taskset
from mergelab.errors import InputError
from mergelab.taskset import MergedUpdate


@pytest.fixture(scope="module")
def setting(tiny_vit, vit_adapters):
    """The tiny ViT, its three adapters, random per-task heads and fixed image batches."""
    vit = copy.deepcopy(tiny_vit).eval()
    taskset = load_taskset(vit, vit_adapters)
    g = torch.Generator().manual_seed(0)
    heads = [F.normalize(torch.randn(5, 32, generator=g), dim=-1) for _ in taskset.names]
    images = [torch.randn(8, 3, 16, 16, generator=g) for _ in taskset.names]
    base = {k: v.detach() for k, v in vit.state_dict().items()}

    def logits(t, x, params):
        return 20 * F.normalize(functional_call(vit, params, (x,)), dim=-1) @ heads[t].T

    forward = Forward(base={m: base[m] for m in taskset.module_names}, logits=logits)
    return vit, taskset, forward, images, base


def _streams(images):
    return [itertools.repeat(x) for x in images]


def test_adamerging_at_ta_values_reproduces_the_task_arithmetic_model(setting):
    vit, taskset, forward, images, base = setting
    model = build("adamerging", taskset, granularity="task", init=0.3)
    ta = MergedUpdate({m: _sum(taskset, m, 0.3) for m in taskset.module_names})
    merged_vit = copy.deepcopy(vit)
    merged_vit.load_state_dict(ta.apply(base))
    with torch.no_grad():
        expected = 20 * F.normalize(merged_vit(images[0]), dim=-1) @ torch.eye(32)[:5].T
        got = 20 * F.normalize(functional_call(vit, model.weights(forward.base), (images[0],)), dim=-1) @ torch.eye(32)[:5].T
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _sum(taskset, module, scale=1.0):
    from mergelab.taskset import Dense

    return Dense(scale * sum(u.dense() for u in taskset.updates(module)))


@pytest.mark.parametrize("method", ["tara_a", "tara_b"])
def test_tara_with_unit_phi_reproduces_the_plain_sum_of_adapters(setting, method):
    _, taskset, _, _, _ = setting
    model = build(method, taskset, init=1.0)
    for m, delta in model.deltas().items():
        torch.testing.assert_close(delta, _sum(taskset, m).delta, atol=1e-5, rtol=1e-4)
    merged = model.merged_update()
    assert merged.is_low_rank
    for m, update in merged.modules.items():
        torch.testing.assert_close(update.dense(), _sum(taskset, m).delta, atol=1e-5, rtol=1e-4)


def test_tara_b_truncated_rank_keeps_R_directions_per_task(setting):
    _, taskset, _, _, _ = setting
    model = build("tara_b", taskset, rank=3)
    assert all(bank.size == 3 * len(taskset) for bank in model.banks)


def test_adarank_ta_init_is_task_arithmetic_and_cart_init_keeps_top_k(setting):
    _, taskset, _, _, _ = setting
    ta = build("adarank", taskset, origin="ta")
    for m, delta in ta.deltas().items():
        torch.testing.assert_close(delta, _sum(taskset, m, 0.3).delta, atol=1e-5, rtol=1e-4)
    cart = build("adarank", taskset, origin="cart", lam=1.0, rank_ratio=0.1)  # k = ⌈0.1 · 32⌉ = 4 per task
    for mask, bank in zip(cart.masks(), cart.banks):
        assert set(mask.detach().tolist()) <= {0.0, 1.0}
        assert [int(mask[bank.owner == t].sum()) for t in range(3)] == [4, 4, 4]
    # all components on: mean + 1.0 · Σ (ΔW_i − mean) = Σ ΔW_i − (T−1)·mean ... check one module numerically
    m = taskset.module_names[0]
    full = build("adarank", taskset, origin="cart", lam=1.0, rank_ratio=1.0)
    dense = [u.dense() for u in taskset.updates(m)]
    mean = sum(dense) / 3
    torch.testing.assert_close(full.deltas()[m], mean + sum(d - mean for d in dense), atol=1e-5, rtol=1e-4)


def test_straight_through_mask_is_hard_forward_with_sigmoid_gradients():
    x = torch.tensor([-0.3, -0.01, 0.02, 2.0], requires_grad=True)
    mask = straight_through_mask(x, temperature=10.0)
    assert mask.tolist() == [0.0, 0.0, 1.0, 1.0]
    (mask * torch.arange(1.0, 5.0)).sum().backward()
    p = torch.sigmoid(x.detach() / 10)
    torch.testing.assert_close(x.grad, torch.arange(1.0, 5.0) * p * (1 - p) / 10)
    assert (x.grad != 0).all()


def test_smooth_tchebycheff_limits():
    f = torch.tensor([0.9, 0.2, 0.5])
    z = torch.tensor([0.1, 0.1, 0.1])
    rho = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    terms = rho.float() * (f - z).abs()
    assert abs(float(smooth_tchebycheff(f, rho, z, alpha=1e-4)) - float(terms.max())) < 1e-3
    big = 1e4
    softened = float(smooth_tchebycheff(f, rho, z, alpha=big)) - big * torch.log(torch.tensor(3.0)).item()
    assert abs(softened - float(terms.mean())) < 1e-2
    assert float(weighted_sum(f, rho)) == pytest.approx(float((rho.float() * f).sum()))


@pytest.mark.parametrize(("name", "below_anchor_moves"), [("stch", "up"), ("stch_signed", "down")])
def test_stch_sign_is_a_setting(name, below_anchor_moves):
    """001 Eq. 10 as printed (|f − z|) pushes a task below its anchor back up to it; the signed form of
    TARA's code lets it go lower. Above the anchor both descend alike and give the same Ψ."""
    z = torch.tensor([0.5, 0.5])
    rho = torch.tensor([0.5, 0.5], dtype=torch.float64)
    f = torch.tensor([0.2, 0.9], requires_grad=True)  # task 0 below its anchor, task 1 above
    SCALARIZATIONS[name].fn(f, rho, z, 1.0).backward()
    assert (f.grad[0] < 0) == (below_anchor_moves == "up")  # gradient descent moves f_0 against the gradient
    assert f.grad[1] > 0
    above = torch.tensor([0.7, 0.9])
    assert float(SCALARIZATIONS[name].fn(above, rho, z, 1.0)) == pytest.approx(float(smooth_tchebycheff(above, rho, z)))


def test_signed_stch_adaptation_measures_anchors(setting):
    _, taskset, forward, images, _ = setting
    result = adapt("tara_a", taskset, forward, _streams(images), Schedule(iters=2, scalarization="stch_signed"))
    assert result.history.attrs["scalarization"] == "stch_signed" and len(result.history.attrs["anchors"]) == 3


@pytest.mark.parametrize("granularity", ["module_task", "layer"])
def test_adarank_learns_lambda_per_module_and_task_or_per_layer_as_printed(setting, granularity):
    """The official code learns λ per module × task; 002 Eq. 5 prints one λ^l per layer, shared by its
    modules and every task (``lambda_granularity="layer"``)."""
    from mergelab.naming import module_layer

    _, taskset, forward, images, _ = setting
    result = adapt("adarank", taskset, forward, _streams(images), Schedule(iters=3, lr=0.05), lambda_granularity=granularity)
    lam = result.history["lambda"].isel(record=-1).values  # (module, task)
    layers = np.array([module_layer(m) for m in taskset.module_names])
    shared = all(np.ptp(lam[layers == layer]) == 0 for layer in set(layers))
    assert not np.allclose(lam, 0.3) and shared == (granularity == "layer")
    assert result.history["coef_lam"].shape[1:] == ((len(set(layers)), 1) if granularity == "layer" else lam.shape)


@pytest.mark.parametrize("bad", [[0.5, 0.6, -0.1], [0.5, 0.5], [0.3, 0.3, 0.3], [float("nan"), 0.5, 0.5]])
def test_preference_must_lie_on_the_simplex(bad):
    with pytest.raises(InputError, match="preference"):
        validate_preference(bad, 3)


@pytest.mark.parametrize("method", sorted(ADAPTERS))
def test_one_step_lowers_the_objective_on_a_fixed_batch(setting, method):
    vit, taskset, forward, images, base = setting
    spec = ADAPTERS[method]
    if spec.objective == "tas":
        token_vit = copy.deepcopy(vit)
        token_vit.output_tokens = True  # open_clip returns (pooled, patch tokens)
        forward = Forward(forward.base, forward.logits, tokens=lambda x, params: functional_call(token_vit, params, (x,))[1])
    kwargs = {} if method != "adarank" else {"origin": "ta"}
    result = adapt(method, taskset, forward, _streams(images), Schedule(iters=1, lr=0.01, scalarization="sum"), **kwargs)
    model = build(method, taskset, **({"origin": "ta"} if method == "adarank" else {}))
    before = objective_losses(spec.objective, forward, model.weights(forward.base), images,
                              _alignment(spec, taskset, forward)).sum()
    after_weights = {m: forward.base[m] + u.dense() for m, u in result.merged.modules.items()}
    after = objective_losses(spec.objective, forward, after_weights, images, _alignment(spec, taskset, forward)).sum()
    assert float(after) < float(before)
    assert result.history["loss"].shape == (1, 3)


def _alignment(spec, taskset, forward):
    from mergelab.adaptation.loop import _Alignment, task_weights

    if spec.objective != "tas":
        return None
    return _Alignment([task_weights(taskset, forward.base, t) for t in range(len(taskset))])


def test_stch_adaptation_records_measured_anchors_and_trajectories(setting):
    _, taskset, forward, images, _ = setting
    result = adapt("tara_a", taskset, forward, _streams(images), Schedule(iters=4, preference=(0.2, 0.3, 0.5)), record_every=2)
    anchors = result.history.attrs["anchors"]
    expected = [float(objective_losses("entropy", forward, _task_only(taskset, forward, t), images)[t]) for t in range(3)]
    assert anchors == pytest.approx(expected, rel=1e-5)
    assert list(result.history["record"].values) == [0, 2, 4]
    assert result.history.attrs["preference"] == pytest.approx([0.2, 0.3, 0.5])


def _task_only(taskset, forward, t):
    from mergelab.adaptation.loop import task_weights

    return task_weights(taskset, forward.base, t)


def _recording_forward(forward, seen):
    """``forward`` whose logits record the first pixel of every batch the loop evaluates with grad."""

    def logits(t, x, params):
        if torch.is_grad_enabled():
            seen.append((t, float(x[0, 0, 0, 0])))
        return forward.logits(t, x, params)

    return Forward(base=forward.base, logits=logits)


def test_every_adaptive_method_steps_on_the_same_batches_in_the_same_order(setting):
    """Common random numbers: the STCH anchors of TARA read the first batches without taking them
    from the loop, so TARA and AdaMerging see one sequence (issue 12)."""
    _, taskset, forward, _, _ = setting
    g = torch.Generator().manual_seed(1)
    pools = [torch.randn(6, 8, 3, 16, 16, generator=g) for _ in taskset.names]
    sequences = {}
    for method in ("adamerging", "tara_a"):
        seen: list = []
        adapt(method, taskset, _recording_forward(forward, seen), [iter(p) for p in pools], Schedule(iters=3))
        sequences[method] = seen
    assert sequences["adamerging"] == sequences["tara_a"]
    assert [v for t, v in sequences["adamerging"] if t == 0] == [float(pools[0][i, 0, 0, 0, 0]) for i in range(3)]


def test_peek_puts_the_items_back():
    from mergelab.adaptation.loop import peek

    heads, streams = peek([iter(range(5)), iter("abc")], 2)
    assert heads == [[0, 1], ["a", "b"]]
    assert list(streams[0]) == [0, 1, 2, 3, 4] and list(streams[1]) == ["a", "b", "c"]


def test_history_reports_how_far_the_coefficients_moved(setting):
    _, taskset, forward, images, _ = setting
    still = adapt("adamerging", taskset, forward, _streams(images), Schedule(iters=2, lr=0.0))
    moved = adapt("adamerging", taskset, forward, _streams(images), Schedule(iters=2, lr=0.1), granularity="task")
    assert still.history.attrs["mean_abs_delta_coef"] == 0.0
    first = {k: moved.history[k].isel(record=0).values for k in moved.history.data_vars if k.startswith("coef_")}
    last = {k: moved.history[k].isel(record=-1).values for k in first}
    expected = float(np.concatenate([np.abs(last[k] - first[k]).ravel() for k in first]).mean())
    assert moved.history.attrs["mean_abs_delta_coef"] == pytest.approx(expected) and expected > 0.05


def test_a_study_starts_every_adaptive_method_from_its_adaptive_init():
    from mergelab.config import load_study
    from mergelab.study import adapt_jobs

    adaptive = [{"method": "adamerging"}, {"method": "adamerging_tas"}, {"method": "tara_a"}, {"method": "tara_b"},
                {"method": "adarank"}, {"method": "adarank", "label": "cart", "hp": {"origin": "cart"}},
                {"method": "tara_a", "label": "own", "hp": {"init": 0.5}}]
    hps = {j.spec.name: j.spec.hp for j in adapt_jobs(load_study({"name": "s", "adaptive": adaptive, "adaptive_init": 0.2}))}
    assert hps == {"adamerging": {"init": 0.2}, "adamerging_tas": {"init": 0.2}, "tara_a": {"init": 0.2}, "tara_b": {"init": 0.2},
                   "adarank": {"lam": 0.2}, "cart": {"origin": "cart"}, "own": {"init": 0.5}}
    unset = {j.spec.name: j.spec.hp for j in adapt_jobs(load_study({"name": "s", "adaptive": adaptive}))}
    assert unset["adamerging"] == {} and unset["own"] == {"init": 0.5}


def _mixed_taskset():
    """LoRA attention / MLP matrices plus the dense parameters AdaRank never masks."""
    from mergelab.synthetic import random_lowrank
    from mergelab.taskset import Dense, TaskSet, TaskUpdate

    g = torch.Generator().manual_seed(1)
    tasks = []
    for t in range(3):
        tasks.append(TaskUpdate(f"task{t}", {
            "transformer.resblocks.0.attn.out_proj.weight": random_lowrank(6, 6, 2, g),
            "transformer.resblocks.0.mlp.c_fc.weight": random_lowrank(8, 6, 2, g),
            "positional_embedding": Dense(torch.randn(4, 6, generator=g)),
            "conv1.weight": Dense(torch.randn(6, 3, 2, 2, generator=g)),
            "ln_post.bias": Dense(torch.randn(6, generator=g)),
        }))
    return TaskSet(tuple(tasks))


def test_adarank_masks_attention_and_mlp_matrices_only():
    taskset = _mixed_taskset()
    unmasked = ["positional_embedding", "conv1.weight", "ln_post.bias"]
    cart = build("adarank", taskset, origin="cart", lam=0.7, rank_ratio=0.5)
    deltas = cart.deltas()
    for m in unmasked:  # CART's rule outside the masked matrices: the weight average, whatever λ
        torch.testing.assert_close(deltas[m], sum(u.dense() for u in taskset.updates(m)) / 3)
    ta = build("adarank", taskset, lam=0.4)
    deltas = ta.deltas()
    for m, logits in zip(ta.module_names, ta.logits, strict=True):
        assert logits.requires_grad == (m not in unmasked)
        if m in unmasked:  # task arithmetic with the learned λ
            torch.testing.assert_close(deltas[m], 0.4 * sum(u.dense() for u in taskset.updates(m)))


def test_each_adaptive_method_uses_its_papers_optimiser(setting):
    _, taskset, forward, images, _ = setting
    assert {name: a.optimizer for name, a in ADAPTERS.items()} == {
        "adamerging": "adam", "tara_a": "adamw", "tara_b": "adamw", "adarank": "adam", "adamerging_tas": "adam"}
    result = adapt("tara_a", taskset, forward, _streams(images), Schedule(iters=1), anchor_batches=1)
    assert result.history.attrs["optimizer"] == "adamw"
    result = adapt("tara_a", taskset, forward, _streams(images), Schedule(iters=1, optimizer="adam"), anchor_batches=1)
    assert result.history.attrs["optimizer"] == "adam"


def test_adamerging_clamps_lambda_to_the_unit_interval_unless_told_otherwise(setting):
    _, taskset, _, _, _ = setting
    assert set(build("adamerging", taskset, init=1.5).lambdas().flatten().tolist()) == {1.0}
    assert set(build("adamerging", taskset, init=1.5, clamp=None).lambdas().flatten().tolist()) == {1.5}


def test_adarank_cart_starts_from_the_lambda_and_rank_ratio_chosen_on_val(monkeypatch):
    from types import SimpleNamespace

    from mergelab.study import nodes as study
    from mergelab.adaptation import LAMBDA_CART, RANK_RATIO_CART
    from mergelab.adaptive_spec import AdaptiveSpec

    taskset = _mixed_taskset()
    module = "transformer.resblocks.0.attn.out_proj.weight"
    target = build("adarank", taskset, origin="cart", lam=0.7, rank_ratio=0.08).merged_update().modules[module].dense()
    ctx = SimpleNamespace(taskset=taskset, session=SimpleNamespace(weights=lambda merged: merged))
    seen = []

    def criterion(_, merged):  # best where the start is that of λ = 0.7 and 8 % of the components (002 App. A)
        seen.append(merged)
        return -float((merged.modules[module].dense() - target).norm())

    monkeypatch.setattr(study, "_val_criterion", criterion)
    hp, chosen = study._start(ctx, AdaptiveSpec(method="adarank", hp={"origin": "cart"}), None)
    assert chosen == {"lam": 0.7, "rank_ratio": 0.08} and hp == {"origin": "cart", **chosen}
    assert len(seen) == len(LAMBDA_CART) * len(RANK_RATIO_CART) == 30 * 4 and RANK_RATIO_CART == (0.08, 0.12, 0.16, 0.32)
    hp, chosen = study._start(ctx, AdaptiveSpec(method="adarank", hp={"origin": "cart", "rank_ratio": 0.16},
                                                start_grid={"lam": [0.5, 2.0]}), None)
    assert chosen == {"lam": 0.5} and hp["rank_ratio"] == 0.16
    assert study._start(ctx, AdaptiveSpec(method="adarank"), None) == ({}, {})  # the TA origin starts at adaptive_init


def test_a_schedule_is_one_value_from_the_study_to_the_loop():
    """The study's adaptive entry gives its schedule whole; the method's paper settings fill what it leaves
    open; a misspelt setting is one line."""
    from mergelab.adaptive_spec import AdaptiveSpec

    spec = AdaptiveSpec(method="tara_b", iters=7, lr=0.02, batch_size=3, alpha=0.5, preference=[0.25, 0.75], scalarization="stch")
    schedule = spec.schedule
    assert schedule == Schedule(iters=7, lr=0.02, batch_size=3, scalarization="stch", alpha=0.5, preference=(0.25, 0.75))
    resolved = schedule.for_method(ADAPTERS["tara_b"])
    assert (resolved.objective, resolved.scalarization, resolved.optimizer) == ("entropy", "stch", ADAPTERS["tara_b"].optimizer)
    assert Schedule(optimizer="adam").for_method(ADAPTERS["tara_a"]).optimizer == "adam"  # a setting given is kept
    with pytest.raises(InputError, match="unknown optimizer 'sgd'; choose one of adam, adamw"):
        Schedule(optimizer="sgd")
    with pytest.raises(InputError, match="iters >= 0 and batch_size >= 1"):
        Schedule(batch_size=0)


def test_the_loop_runs_what_the_schedule_says(setting):
    _, taskset, forward, images, _ = setting
    result = adapt("tara_a", taskset, forward, _streams(images), Schedule(iters=3, lr=0.02, optimizer="adam", alpha=0.7,
                                                                           scalarization="stch", preference=(0.2, 0.3, 0.5)))
    attrs = result.history.attrs
    assert (attrs["iters"], attrs["lr"], attrs["optimizer"], attrs["alpha"], attrs["scalarization"]) == (3, 0.02, "adam", 0.7, "stch")
    assert attrs["preference"] == pytest.approx([0.2, 0.3, 0.5]) and result.history.sizes["iteration"] == 3
