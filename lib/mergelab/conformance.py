"""Conformance suites: the checks every registered entry of a registry passes, as scikit-learn's
``check_estimator`` / ``parametrize_with_checks`` do for estimators.

``checks_for_method(name)`` (``_space``, ``_adaptive``, ``_bench``) yields the named :class:`Check` s of
one entry, :func:`registered_checks` those of every entry registered now (``@parametrize_with_checks()``
checks a new registration with no test edit). A check runs on a tiny seeded synthetic task set (a
bench kind's on its example, loaded once per process) and raises :class:`ConformanceError`.

What each suite checks, and which declarations of an entry choose checks:

- merge methods: finite full-space shapes and dtype; inputs (the tasks' tensors, side inputs) never
  mutated; the same seed gives the same merge, another seed another where ``MergeMethod.stochastic``;
  one task gives that task where ``identity`` is declared; a ``linear`` merge is the same in every
  lossless space;
- spaces: project / reconstruct gives each task and its factors back where ``Space.lossless``;
  projecting mutates nothing and repeats; every method run through it returns full-space shapes;
- adaptive methods: a few steps on a tiny model give finite coefficients, one per bank direction,
  and a merged update of the tasks' shapes in each of ``Adapter.spaces``; the same seeded batches
  give the same merge; neither the task set nor the base weights are mutated;
- bench kinds: the default settings validate, an unknown or another kind's setting is refused;
  ``BenchKind.example`` loads a Bench whose adapters fit its backbone's base state and whose layout
  knows the adapted projections.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mergelab.synthetic import random_lowrank
from mergelab.taskset import Dense, LowRank, MergedUpdate, TaskSet, TaskUpdate, Update

if TYPE_CHECKING:
    from mergelab.merging.registry import Composition, MergeMethod

__all__ = ["SUITES", "Check", "ConformanceError", "checks_for_adaptive", "checks_for_bench", "checks_for_method", "checks_for_space",
           "example_bench", "parametrize_with_checks", "registered_checks"]

T64 = torch.float64


class ConformanceError(AssertionError):
    """A registered entry fails a conformance check."""


@dataclass(frozen=True)
class Check:
    """One named check of one registry entry; calling it runs it (``ConformanceError`` on failure)."""

    registry: str
    entry: str
    name: str
    run: Callable[[], None]

    def __call__(self) -> None:
        self.run()

    def __str__(self) -> str:
        return f"{self.registry}:{self.entry}:{self.name}"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConformanceError(message)


def _close(got: Tensor, expected: Tensor, what: str, rtol: float = 1e-7) -> None:
    scale = max(float(expected.abs().max()) if expected.numel() else 0.0, 1.0)
    try:
        torch.testing.assert_close(got.to(T64), expected.to(T64), atol=rtol * scale, rtol=0)
    except AssertionError as err:
        raise ConformanceError(f"{what}: {err}") from None


# Tiny task sets -------------------------------------------------------------------------------------

#: Matrix modules (attention and MLP of one block, names the generic layout knows) and a bias.
SHAPES = {"layers.0.attn.q_proj.weight": (7, 5), "layers.0.mlp.fc1.weight": (4, 6)}
BIAS = "layers.0.mlp.fc1.bias"


def _taskset(tasks: int = 3, *, dense: bool = False, seed: int = 0, dtype: torch.dtype = T64) -> TaskSet:
    """``tasks`` LoRA updates (rank 2; ``dense``: as Dense matrices) of :data:`SHAPES` plus a Dense bias."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(tasks):
        modules: dict[str, Update] = {}
        for name, (n_out, n_in) in SHAPES.items():
            factors = random_lowrank(n_out, n_in, 2, g, dtype=dtype)
            modules[name] = Dense(factors.dense()) if dense else factors
        modules[BIAS] = Dense(torch.randn(SHAPES["layers.0.mlp.fc1.weight"][0], generator=g, dtype=dtype))
        out.append(TaskUpdate(f"task{t}", modules))
    return TaskSet(tuple(out))


def _tensors(taskset: TaskSet, side: Mapping[str, Any] | None = None) -> list[Tensor]:
    """Every tensor a merge reads: the updates' (Dense delta, LoRA B and A) and the side inputs'."""
    found = [x for task in taskset for u in task.modules.values() for x in ((u.B, u.A) if isinstance(u, LowRank) else (u.delta,))]
    return found + [x for per_task in (side or {}).values() for per_module in per_task.values() for x in per_module.values()]


def _side_inputs(method: Any, taskset: TaskSet) -> dict[str, Any] | None:
    """Sample user-given side inputs of what ``method`` declares (``grams``: SPD per task and matrix module)."""
    from mergelab.merging.registry import SIDE_INPUTS

    given = [name for name in method.side if SIDE_INPUTS[name].derive is None]
    if not given:
        return None
    unknown = [name for name in given if name != "grams"]
    _require(not unknown, f"the conformance suite has no sample of side input {unknown[:1]}; add one to conformance._side_inputs")
    g = torch.Generator().manual_seed(1)
    grams = {}
    for t in taskset.names:
        per_module = {}
        for m, (_, n_in) in SHAPES.items():
            X = torch.randn(3 * n_in, n_in, generator=g, dtype=T64)
            per_module[m] = X.T @ X / (3 * n_in)
        grams[t] = per_module
    return {"grams": grams}


# Merge methods ---------------------------------------------------------------------------------------


def checks_for_method(name: str) -> Iterator[Check]:
    """The checks of merge method ``name`` (module docstring's table)."""
    from mergelab.merging import METHODS, merge

    method = METHODS[name]

    def run(taskset: TaskSet, space: str = "full", **hp: Any):
        return merge(taskset, name, space, side_inputs=_side_inputs(method, taskset), **hp)

    yield from _method_contract_checks(name, method, run)
    yield from _declared_method_checks(name, method, run)


def _method_contract_checks(name: str, method: MergeMethod | Composition, run: Callable[..., MergedUpdate]) -> Iterator[Check]:
    """The checks of every merge method (``run`` merges with it): full-space shapes, finite float64; inputs untouched; seeded."""
    from mergelab.merging import merge

    def shapes() -> None:
        merged = run(taskset := _taskset(dense=method.inputs != "factors"))
        for m in taskset.module_names:
            u, shape = merged.modules[m], tuple(taskset.tasks[0].modules[m].shape)
            _require(tuple(u.shape) == shape, f"module {m!r}: merged shape {tuple(u.shape)}, the tasks' {shape}")
            _require(u.dtype == T64, f"module {m!r}: float64 tasks merged to {u.dtype}")
            _require(bool(torch.isfinite(u.dense()).all()), f"module {m!r}: the merge is not finite")

    def pure() -> None:
        side = _side_inputs(method, taskset := _taskset(dense=method.inputs != "factors"))  # the full space passes these very tensors
        before = [x.clone() for x in _tensors(taskset, side)]
        merge(taskset, name, "full", side_inputs=side)
        changed = sum(not torch.equal(x, y) for x, y in zip(_tensors(taskset, side), before, strict=True))
        _require(changed == 0, f"merging modified {changed} of the {len(before)} input tensors in place")

    def seeded() -> None:
        taskset = _taskset()
        hp = {"seed": 3} if "seed" in method.params else {}
        first, second = run(taskset, **hp), run(taskset, **hp)
        for m in taskset.module_names:
            _require(torch.equal(first.modules[m].dense(), second.modules[m].dense()), f"module {m!r}: the same inputs and seed merge "
                     "differently (a random draw that does not come from the seed?)")
        if method.stochastic:
            other = run(taskset, seed=4)
            _require(any(not torch.equal(first.modules[m].dense(), other.modules[m].dense()) for m in SHAPES),
                     "declared stochastic, but seeds 3 and 4 give the same merge (is the seed ignored?)")

    yield Check("method", name, "returns_finite_full_space_shapes", shapes)
    yield Check("method", name, "never_mutates_its_inputs", pure)
    yield Check("method", name, "same_seed_same_merge", seeded)


def _declared_method_checks(name: str, method: MergeMethod | Composition, run: Callable[..., MergedUpdate]) -> Iterator[Check]:
    """The checks of what a merge method declares (``run`` merges with it): its identity hyper-parameters, its linearity."""
    from mergelab.spaces import SPACES

    def identity() -> None:
        taskset = _taskset(1)
        for space in [s for s, sp in SPACES.items() if sp.lossless]:
            merged = run(taskset, space, **method.identity)
            for m in taskset.module_names:
                _close(merged.modules[m].dense(T64), taskset.tasks[0].modules[m].dense(T64),
                       f"one task merged with {dict(method.identity)} in the {space} space is not that task (module {m!r})", 1e-7)

    def linear() -> None:
        full = run(taskset := _taskset(), alpha=0.7)
        for space, sp in SPACES.items():
            if space == "full" or not sp.lossless:
                continue
            other = run(taskset, space, alpha=0.7)
            for m in taskset.module_names:
                _close(other.modules[m].dense(T64), full.modules[m].dense(T64),
                       f"declared linear, but its merge in the lossless {space} space differs from the full space's (module {m!r})", 1e-9)

    if method.identity is not None:
        yield Check("method", name, "one_task_gives_that_task", identity)
    if method.linear:
        yield Check("method", name, "linear_merge_is_the_same_in_every_lossless_space", linear)


# Spaces ----------------------------------------------------------------------------------------------


def checks_for_space(name: str) -> Iterator[Check]:
    """The checks of space ``name`` (its registered configuration)."""
    from mergelab.merging import METHODS, merge
    from mergelab.spaces import SPACES

    space = SPACES[name]

    def round_trip() -> None:
        for m in SHAPES:
            updates = _taskset().updates(m)
            reps, ctx = space.project(updates)
            for t, (rep, factors, u) in enumerate(zip(reps, space.factors(updates, ctx), updates, strict=True)):
                _close(space.reconstruct(rep, ctx).dense(T64), u.dense(T64), f"task {t} of module {m!r} does not come back", 1e-9)
                _close(space.reconstruct(factors, ctx).dense(T64), u.dense(T64), f"task {t}'s factors in module {m!r} do not come back", 1e-9)

    def pure() -> None:
        taskset = _taskset()
        before = [x.clone() for x in _tensors(taskset)]
        first = [space.project(taskset.updates(m))[0] for m in SHAPES]
        second = [space.project(taskset.updates(m))[0] for m in SHAPES]
        changed = sum(not torch.equal(x, y) for x, y in zip(_tensors(taskset), before, strict=True))
        _require(changed == 0, f"projecting modified {changed} of the {len(before)} update tensors in place")
        for m, xs, ys in zip(SHAPES, first, second, strict=True):
            _require(all(torch.equal(_dense(x), _dense(y)) for x, y in zip(xs, ys, strict=True)), f"module {m!r}: projects differently twice")

    def every_method() -> None:
        for method in METHODS:
            taskset = _taskset()
            merged = merge(taskset, method, name, side_inputs=_side_inputs(METHODS[method], taskset))
            for m in taskset.module_names:
                u, shape = merged.modules[m], tuple(taskset.tasks[0].modules[m].shape)
                _require(tuple(u.shape) == shape, f"{method}: module {m!r} comes back {tuple(u.shape)}, the tasks' {shape}")
                _require(bool(torch.isfinite(u.dense()).all()), f"{method}: module {m!r} is not finite")

    if space.lossless:
        yield Check("space", name, "reconstructs_each_task_and_its_factors", round_trip)
    yield Check("space", name, "projects_without_mutating_and_repeatably", pure)
    yield Check("space", name, "every_method_returns_full_space_shapes", every_method)


def _dense(x: Tensor | LowRank) -> Tensor:
    return x.dense() if isinstance(x, LowRank) else x


# Adaptive methods ------------------------------------------------------------------------------------


def _tiny_model(taskset: TaskSet, seed: int = 0):
    """A two-layer functional model over :data:`SHAPES`' modules (tokens of width 5, per-task heads of 3
    classes) as a :class:`~mergelab.adaptation.Forward`, and seeded token batches (one stream per task)."""
    from mergelab.adaptation import Forward

    g = torch.Generator().manual_seed(seed)
    (q, fc), (n_q, d_in) = list(SHAPES), SHAPES["layers.0.attn.q_proj.weight"]
    n_fc, d_fc = SHAPES["layers.0.mlp.fc1.weight"]
    base = {q: torch.randn(n_q, d_in, generator=g) / d_in ** 0.5, fc: torch.randn(n_fc, d_fc, generator=g) / d_fc ** 0.5,
            BIAS: torch.zeros(n_fc)}
    heads = [torch.randn(3, n_fc, generator=g) for _ in taskset.names]
    project = torch.randn(n_q, d_fc, generator=g) / n_q ** 0.5

    def tokens(x: Tensor, params: Mapping[str, Tensor]) -> Tensor:  # (N, L, n_fc)
        hidden = torch.tanh(x @ params[q].T) @ project  # (N, L, d_fc)
        return torch.tanh(hidden @ params[fc].T + params[BIAS])

    forward = Forward(base=base, logits=lambda t, x, params: tokens(x, params).mean(dim=1) @ heads[t].T, tokens=tokens)
    batches = [[torch.randn(4, 3, d_in, generator=g) for _ in range(4)] for _ in taskset.names]
    return forward, batches


def checks_for_adaptive(name: str) -> Iterator[Check]:
    """The checks of adaptive method ``name``: three Adam steps on :func:`_tiny_model` per declared space."""
    from mergelab.adaptation import ADAPTERS, Schedule, adapt, build

    adapter = ADAPTERS[name]

    def run(taskset: TaskSet, space: str = "full"):
        forward, batches = _tiny_model(taskset)
        hp = {} if space == "full" else {"space": space}
        return adapt(name, taskset, forward, [iter(b) for b in batches], Schedule(iters=3, lr=0.05), record_every=1, **hp), forward

    def shapes() -> None:
        taskset = _taskset(2, dtype=torch.float32)
        for space in adapter.spaces:
            model = build(name, taskset, **({} if space == "full" else {"space": space}))
            coefficients = model.coefficients()
            _require(len(coefficients) == len(model.banks), f"{space}: {len(coefficients)} coefficient vectors for {len(model.banks)} banks")
            for m, c, bank in zip(model.module_names, coefficients, model.banks, strict=True):
                _require(tuple(c.shape) == (bank.size,) and bool(torch.isfinite(c).all()), f"{space}: module {m!r} has coefficients {tuple(c.shape)} for {bank.size} directions, or not finite")
            result, _ = run(taskset, space)
            for m in taskset.module_names:
                u, shape = result.merged.modules[m], tuple(taskset.tasks[0].modules[m].shape)
                _require(tuple(u.shape) == shape, f"{space}: module {m!r} adapts to {tuple(u.shape)}, the tasks' {shape}")
                _require(bool(torch.isfinite(u.dense()).all()), f"{space}: module {m!r} adapts to non-finite weights")
            loss = result.history["loss"]
            _require(loss.shape == (3, len(taskset)) and bool(loss.notnull().all()), f"{space}: the loss history is {loss.shape} or not finite")

    def seeded() -> None:
        (first, _), (second, _) = run(taskset := _taskset(2, dtype=torch.float32)), run(taskset)
        for m in taskset.module_names:
            _require(torch.equal(first.merged.modules[m].dense(), second.merged.modules[m].dense()),
                     f"module {m!r}: the same seeded batches adapt to different merges")

    def pure() -> None:
        taskset = _taskset(2, dtype=torch.float32)
        before = [x.clone() for x in _tensors(taskset)]
        _, forward = run(taskset)
        changed = sum(not torch.equal(x, y) for x, y in zip(_tensors(taskset), before, strict=True))
        _require(changed == 0, f"adapting modified {changed} of the task set's {len(before)} tensors in place")
        fresh, _ = _tiny_model(taskset)
        _require(all(torch.equal(forward.base[k], fresh.base[k]) for k in fresh.base), "adapting modified the base weights in place")

    yield Check("adaptive", name, "adapts_to_finite_coefficients_of_the_bank_shape", shapes)
    yield Check("adaptive", name, "same_batches_same_merge", seeded)
    yield Check("adaptive", name, "never_mutates_the_task_set_or_the_base", pure)


# Bench kinds -----------------------------------------------------------------------------------------


@functools.cache
def example_bench(kind: str):
    """The :class:`~mergelab.bench.Bench` of bench kind ``kind``'s declared example (``BenchKind.example``),
    loaded once per process; its files live in a temporary folder for as long."""
    from mergelab.bench import BENCHES, load_bench

    example = BENCHES[kind].example
    _require(example is not None, f"bench kind {kind!r} declares no example")
    _FOLDERS.append(tempfile.TemporaryDirectory(prefix=f"mergelab-{kind}-"))  # removed at exit
    return load_bench(*example(Path(_FOLDERS[-1].name)))


_FOLDERS: list[tempfile.TemporaryDirectory] = []


def checks_for_bench(name: str) -> Iterator[Check]:
    """The checks of bench kind ``name``: its settings schema, and its example where it declares one."""
    from mergelab.bench import BENCHES, bench_spec
    from mergelab.errors import InputError

    kind = BENCHES[name]

    def settings() -> None:
        _require(bench_spec({"kind": name}) == kind.spec(), "the default settings do not validate to the spec's defaults")
        foreign = [f for other in BENCHES.values() for f in other.spec.model_fields if f not in kind.spec.model_fields]
        for key in ["no_such_setting", *foreign[:1]]:
            try:
                bench_spec({"kind": name, key: 1})
            except (InputError, ValueError) as err:
                _require(key in str(err), f"refusing the unknown setting {key!r} does not name it: {err}")
            else:
                raise ConformanceError(f"the unknown setting {key!r} is accepted")

    def loads() -> None:
        from mergelab.bench import Bench

        bench = example_bench(name)
        _require(isinstance(bench, Bench) and bool(bench.tasks), f"the example loads {type(bench).__name__} with tasks {list(bench.tasks)}")
        _require(list(bench.taskset.names) == list(bench.tasks), f"adapters of {list(bench.taskset.names)} for tasks {list(bench.tasks)}")
        _require(bench.taskset.layout is kind.layout, "the loaded task set does not carry the kind's layout")
        base = bench.backbone.base_state()
        for m in bench.taskset.module_names:
            _require(m in base, f"the adapters update {m!r}, which the backbone's base state lacks")
            _require((shape := tuple(bench.taskset.tasks[0].modules[m].shape)) == tuple(base[m].shape),
                     f"module {m!r}: update {shape}, base weight {tuple(base[m].shape)}")
        targets = [f"{t}.weight" for t in bench.backbone.lora_targets()]
        _require(bool(targets), "the backbone names no LoRA targets")
        for t in targets:
            _require(kind.layout.role(t) != "other" and kind.layout.layer(t) >= 0, f"the layout knows no block or role of {t!r}")
        roles = {kind.layout.role(n) for n, w in base.items() if len(w.shape) == 2}
        _require({"attention", "mlp"} <= roles, f"the layout finds the roles {sorted(roles)} in the backbone, not attention and mlp")

    yield Check("bench", name, "settings_validate_and_refuse_unknown_keys", settings)
    if kind.example is not None:
        yield Check("bench", name, "example_loads_adapters_that_fit_the_backbone", loads)


# Every registry --------------------------------------------------------------------------------------


#: registry -> the checks of one of its entries.
SUITES: dict[str, Callable[[str], Iterator[Check]]] = {"method": checks_for_method, "space": checks_for_space,
                                                       "adaptive": checks_for_adaptive, "bench": checks_for_bench}


def registered_checks(registries: Sequence[str] = tuple(SUITES)) -> list[Check]:
    """Every check of every entry registered now in ``registries`` (``"method"``, ``"space"``,
    ``"adaptive"``, ``"bench"``)."""
    from mergelab.adaptation import ADAPTERS
    from mergelab.bench import BENCHES
    from mergelab.merging import METHODS
    from mergelab.spaces import SPACES

    found = {"method": METHODS, "space": SPACES, "adaptive": ADAPTERS, "bench": BENCHES}
    return [check for registry in registries for entry in found[registry] for check in SUITES[registry](entry)]


def parametrize_with_checks(registries: Sequence[str] = tuple(SUITES)):
    """A pytest ``parametrize`` decorator over :func:`registered_checks` (argument ``check``, ids
    ``registry:entry:check``), as scikit-learn's: ``@parametrize_with_checks() def test_(check): check()``."""
    import pytest

    checks = registered_checks(registries)
    return pytest.mark.parametrize("check", checks, ids=[str(c) for c in checks])
