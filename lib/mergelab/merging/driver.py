"""``merge(taskset, method, space, **hp)``: run any registered method in any space.

Per module: the space projects the tasks' updates (:meth:`Space.project`), the method's stages
run on the projections, the space reconstructs the merged update. What a stage receives is
read off its registry entry (:mod:`mergelab.merging.registry`):

* ``inputs="tensors"`` in a space with ``scope="model"``: one vector per task, the
  concatenation of every matrix module's projection (e.g. the KnOTS paper's global trim);
* ``inputs="tensors"`` / ``"matrices"`` otherwise: the projected matrices of one module;
* ``inputs="factors"``: the tasks' LoRA factors in the space's coordinates;
* ``side``: the side inputs, checked and mapped by the space as :data:`SIDE_INPUTS` says
  (RegMean's Gram matrices: ``Qᵀ G_t Q``), or derived here from the task set (MetaGPT / NormAvg's
  true update norms, Linear's LoRA scalings), so that no space changes what the method sees;
* ``isometric``: in a space whose left map is not an isometry (KnOTS ``per_layer``) the stage runs
  on ``diag(s) X_t``, which has the update's own singular values, and its result is mapped back;
* ``frame``: the stage gets ``frame=``, the identity of the weight's coordinates in the ones it
  sees (:meth:`Context.frame`), to complete null directions alike in every space; where the context
  says ``spectral="update"`` (KnOTS' default, 003's code) such a stage runs on the reconstructed
  ``out × in`` updates over all ``min(out, in)`` singular values and the module continues in the
  full space;
* methods of LoRA factors get them in isometric coordinates (:meth:`Context.isometric`) too;
* ``factored``: where the space represents a task's matrix by its factors (Core: ``M_t`` as
  ``(U_B^refᵀ B_t)(A_t V_A^ref)``, 003 Eq. 8), the stage gets that LowRank (TSV-M takes its per-task
  SVDs from it); every other stage gets the product.

Zero singular directions completed by spectral methods (``support="all"`` on rank-deficient
updates, :mod:`mergelab.merging.completion`) are counted per module into the merge record,
``meta["completed_directions"]``.

Without a model-wide stage the driver streams: per module it projects, merges, reconstructs and
drops the projection, so a full-space merge holds one module's dense updates at a time;
:func:`merge_modules` also hands each module's result on as it is made (a study spools it to its
store), where :func:`merge` collects them into a :class:`MergedUpdate`.
:func:`project` instead keeps every module's projection for reuse across merges (sweeps).

Non-matrix parameters (Dense updates with ``ndim != 2``) are not projected; each stage applies
its ``nonmatrix`` rule. A method with a ``seed`` gets, per module, the seed
``derive_seed(seed, module)`` (``"<model>"`` for a model-wide call), so that same-shape
modules do not share one DARE mask; the inputs are never modified.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mergelab.checkpoints import peft_template
from mergelab.errors import InputError
from mergelab.merging import completion
from mergelab.merging.methods import METHODS
from mergelab.merging.registry import SIDE_INPUTS, Composition, MergeMethod
from mergelab.spaces import Context, Space, get_space
from mergelab.taskset import Dense, LowRank, MergedUpdate, TaskSet, Update

__all__ = ["Emit", "Projection", "derive_seed", "merge", "merge_modules", "project"]

MODEL = "<model>"
#: Where :func:`merge_modules` hands each module's merged update: ``emit(module, update)``.
Emit = Callable[[str, Update], None]


def derive_seed(seed: int, key: str) -> int:
    """A 32-bit seed from a user seed and a module name (stable across runs and machines; 32 bits
    because scikit-learn's random_state takes no more)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _call(method: MergeMethod, args: tuple, hp: Mapping[str, Any], key: str) -> Tensor | LowRank:
    if "seed" in method.params:
        hp = {**hp, "seed": derive_seed(hp["seed"], key)}
    with completion.at(key):
        return method.fn(*args, **hp)


def _as_matrix(x: Tensor | LowRank) -> Tensor:
    return x.dense() if isinstance(x, LowRank) else x


def _model_wide(method: MergeMethod, per_module: Mapping[str, list[Tensor | LowRank]], hp: Mapping[str, Any]) -> dict[str, Tensor]:
    """Run an element-wise method once on every task's concatenated, flattened projections."""
    matrices = {m: [_as_matrix(x) for x in xs] for m, xs in per_module.items()}
    modules = list(matrices)
    n_tasks = len(matrices[modules[0]])
    vectors = [torch.cat([matrices[m][t].reshape(-1) for m in modules]) for t in range(n_tasks)]
    merged = _call(method, (vectors,), hp, MODEL)
    pieces = merged.split([matrices[m][0].numel() for m in modules])
    return {m: piece.reshape(matrices[m][0].shape) for m, piece in zip(modules, pieces, strict=True)}


def _side_inputs(spec: MergeMethod | Composition, values: Mapping[str, Any], taskset: TaskSet, modules: Sequence[str],
                 side_inputs: Mapping[str, Any] | None) -> dict[str, Mapping[str, list[Tensor]]]:
    """``{side name: {module: [per-task tensor]}}``, checked against what the method declares; a
    derived side input (:class:`~mergelab.merging.registry.SideInput`) is computed from the task set."""
    given = dict(side_inputs or {})
    user_side = [name for name in spec.side if SIDE_INPUTS[name].derive is None]
    extra = sorted(set(given) - set(user_side))
    if extra:
        wanted = ", ".join(user_side) or "none"
        raise InputError(f"method {spec.name!r} takes no side input {', '.join(map(repr, extra))} (it takes: {wanted})")
    out: dict[str, Mapping[str, list[Tensor]]] = {}
    stage_values = spec.stage_values(values, spec.stages[0][0])
    for name in spec.side:
        if SIDE_INPUTS[name].derive is not None:
            out[name] = SIDE_INPUTS[name].derive(taskset, stage_values)
            continue
        if name not in given:
            raise InputError(f"method {spec.name!r} needs side input {name!r}: a mapping task -> module -> tensor "
                             "(for 'grams' collect them with mergelab.merging.collect_input_grams; CLI: --grams FILE)")
        per_task = given[name]
        missing = [(t, m) for t in taskset.names for m in modules if m not in (per_task.get(t) or {})]
        if missing:
            raise InputError(f"side input {name!r} lacks {len(missing)} (task, module) entries, e.g. {missing[0]}; "
                             "provide one per task and matrix module, or restrict the task set's modules")
        shapes = {m: taskset.tasks[0].modules[m].shape for m in modules}
        for t in taskset.names:
            SIDE_INPUTS[name].check({m: per_task[t][m] for m in modules}, shapes)
        out[name] = {m: [per_task[t][m] for t in taskset.names] for m in modules}
    return out


@dataclass(frozen=True, eq=False)
class Projection:
    """A task set's matrix modules projected into a space, reusable across merges.

    ``merge(projection, method, **hp)`` skips the projection: a hyper-parameter sweep projects
    once (the expensive step of KnOTS). Merges never modify the projected matrices, so reuse is
    safe (unlike the Core Space code's cached DARE inputs).
    """

    taskset: TaskSet
    space: Space
    matrices: Mapping[str, list[Tensor | LowRank]]
    contexts: Mapping[str, Context]


def _project_module(sp: Space, taskset: TaskSet, module: str, basis: Any = None) -> tuple[list[Tensor | LowRank], Context]:
    try:
        return sp.project(taskset.updates(module), basis)
    except InputError as err:
        raise InputError(f"module {module!r}: {err}") from None


def _matrix_modules(taskset: TaskSet) -> list[str]:
    first = taskset.tasks[0].modules
    return [m for m in taskset.module_names if len(first[m].shape) == 2]


def project(taskset: TaskSet, space: str | Space = "full", *, bases: Mapping[str, Any] | None = None,
            **options: Any) -> Projection:
    """Project every matrix module of ``taskset`` into ``space`` (configured with ``options``).

    ``bases``: ``{module: space.basis(updates)}`` computed earlier for these updates (e.g. read
    from the store, :func:`mergelab.bases.space_bases`); the projection is then built from them
    without decomposing anything, and equals the one computed here bit for bit.
    """
    sp = get_space(space, **options)
    modules = _matrix_modules(taskset)
    if bases is not None:
        missing = [m for m in modules if m not in bases]
        if missing:
            raise InputError(f"bases given for {len(bases)} modules lack {len(missing)} matrix modules of the task set, "
                             f"e.g. {missing[0]!r}; compute them for this task set")
    projected = {m: _project_module(sp, taskset, m, None if bases is None else bases[m]) for m in modules}
    return Projection(taskset, sp, {m: p[0] for m, p in projected.items()}, {m: p[1] for m, p in projected.items()})


@dataclass(frozen=True)
class _Plan:
    """What every stage of one merge reads on every module: the method (or composition), its resolved
    hyper-parameter values, the space, and the side inputs ``{name: {module: [per-task tensor]}}``."""

    spec: MergeMethod | Composition
    values: Mapping[str, Any]
    space: Space
    side: Mapping[str, Mapping[str, list[Tensor]]]

    def stage_values(self, stage_name: str) -> dict[str, Any]:
        """The hyper-parameters of the stage named ``stage_name``."""
        return self.spec.stage_values(self.values, stage_name)


def _apply_stage(plan: _Plan, index: int, module: str, inputs: list[Tensor | LowRank], updates: Sequence[Update],
                 ctx: Context) -> tuple[Tensor | LowRank, Context]:
    """Stage ``index`` of the plan's method on one module: the projections (or, for stage 0, the factors /
    side inputs it declares) in; the merged matrix or factors out, with the context they are in
    (a spectral stage in a ``spectral="update"`` context leaves the module in the full space)."""
    stage_name, stage = plan.spec.stages[index]
    hp = plan.stage_values(stage_name)
    first: list = inputs
    side_args = tuple([SIDE_INPUTS[name].to_space(plan.space, x, ctx) for x in plan.side[name][module]]
                      for name in stage.side) if index == 0 else ()
    if index == 0 and stage.inputs == "factors":
        try:
            first = [ctx.isometric(f) for f in plan.space.factors(updates, ctx)]
        except InputError as err:
            raise InputError(f"method {plan.spec.name!r} merges LoRA factors; module {module!r}: {err}") from None
        return ctx.from_isometric(_call(stage, (first, *side_args), hp, module)), ctx
    if not stage.factored:
        first = [_as_matrix(x) for x in first]
    if stage.frame and ctx.spectral == "update":
        first = [ctx.update(x) for x in first]
        ctx = Context(shape=ctx.shape, dtype=ctx.dtype)
    elif stage.isometric:
        first = [ctx.isometric(x) for x in first]
    if stage.frame:
        hp = {**hp, "frame": ctx.isometric(ctx.frame()) if stage.isometric else ctx.frame()}
    result = _call(stage, (first, *side_args), hp, module)
    return (ctx.from_isometric(result) if stage.isometric else result), ctx


def _merge_matrices(emit: Emit, plan: _Plan, taskset: TaskSet, modules: Sequence[str], projection: Projection | None) -> None:
    """All stages on all matrix modules, each module's result handed to ``emit``. Streams module by module
    (project, merge, reconstruct, emit, drop) unless a stage is model-wide or a projection is given."""
    sp = plan.space
    wide = {i for i, (_, stage) in enumerate(plan.spec.stages) if stage.inputs == "tensors" and sp.scope == "model" and not stage.side}
    if projection is None and not wide:
        for m in modules:
            current, ctx = _project_module(sp, taskset, m)
            for i in range(len(plan.spec.stages)):
                result, ctx = _apply_stage(plan, i, m, current, taskset.updates(m), ctx)
                current = [_as_matrix(result)]
            emit(m, sp.reconstruct(result, ctx))
        return
    projection = projection or project(taskset, sp)
    current_all = {m: list(projection.matrices[m]) for m in modules}
    contexts = dict(projection.contexts)
    results: dict[str, Tensor | LowRank] = {}
    for i, (stage_name, stage) in enumerate(plan.spec.stages):
        if i in wide:
            results = _model_wide(stage, current_all, plan.stage_values(stage_name))
        else:
            for m in modules:
                results[m], contexts[m] = _apply_stage(plan, i, m, current_all[m], taskset.updates(m), contexts[m])
        current_all = {m: [_as_matrix(results[m])] for m in modules}
    for m in modules:
        emit(m, sp.reconstruct(results[m], contexts[m]))


def _merge_nonmatrix(plan: _Plan, updates: Sequence[Update], module: str) -> Dense:
    current = [u.dense(torch.float64) for u in updates]
    for i, (stage_name, stage) in enumerate(plan.spec.stages):
        hp = plan.stage_values(stage_name)
        if stage.nonmatrix == "self":
            side_args = tuple(plan.side[name][module] for name in stage.side) if i == 0 else ()
            merged = _call(stage, (current, *side_args), hp, module)
        else:
            stacked = torch.stack(current)
            merged = hp["alpha"] * (stacked.mean(dim=0) if stage.nonmatrix == "mean" else stacked.sum(dim=0))
        current = [merged]
    dtype = torch.float32
    for u in updates:
        dtype = torch.promote_types(dtype, u.dtype)
    return Dense(current[0].to(dtype))


def merge(taskset: TaskSet | Projection, method: str, space: str | Space | None = None, *,
          space_options: Mapping[str, Any] | None = None, side_inputs: Mapping[str, Any] | None = None,
          **hp: Any) -> MergedUpdate:
    """Merge a task set with a registered method (or ``a+b`` composition) in a space.

    Args:
        taskset: the tasks, or a :class:`Projection` of them (from :func:`project`, reused across
            merges). Matrix modules go through the space, non-matrix ones through the method's
            ``nonmatrix`` rule.
        method: a key of :data:`~mergelab.merging.METHODS` or a ``+`` composition.
        space: ``"full"`` (default), ``"knots"``, ``"core"`` or a configured :class:`Space`; with a
            projection, its space (passing another one is an error).
        space_options: options of the space (``{"naive": True}``, ``{"variant": "per_layer"}``).
        side_inputs: per-task, per-module side inputs a method declares
            (``{"grams": {task: {module: G}}}`` for RegMean).
        **hp: hyper-parameters; unknown names or bad values raise InputError naming the allowed.

    Returns:
        A :class:`MergedUpdate` whose ``meta`` records method, space (+ options),
        hyper-parameters, task names and the PEFT layout, so ``save_merged(..., format="peft")``
        writes a loadable adapter when the result is low rank (knots, core; factor methods), and,
        when a spectral method completed zero singular directions of a rank-deficient module,
        ``completed_directions``: ``{module: count}`` (:mod:`mergelab.merging.completion`).
    """
    merged: dict[str, Update] = {}
    meta = merge_modules(merged.__setitem__, taskset, method, space, space_options=space_options, side_inputs=side_inputs, **hp)
    taskset = taskset.taskset if isinstance(taskset, Projection) else taskset
    return MergedUpdate({m: merged[m] for m in taskset.module_names}, taskset.base, meta)


def merge_modules(emit: Emit, taskset: TaskSet | Projection, method: str, space: str | Space | None = None, *,
                  space_options: Mapping[str, Any] | None = None, side_inputs: Mapping[str, Any] | None = None,
                  **hp: Any) -> dict[str, Any]:
    """:func:`merge` (same arguments after ``emit``), handing each module's merged update to ``emit(module,
    update)`` as soon as it is computed rather than keeping it, and returning the merge's ``meta``: a study
    streams a full-space merge of an LLM to its store this way, never holding it whole beside the model.
    Matrix modules come first (one at a time where :func:`merge` streams), then the non-matrix ones.

    It takes 7 parameters because it is :func:`merge`'s six with the ``emit`` callback in front."""
    spec = _lookup(method)
    values = spec.resolve(hp)
    projection = taskset if isinstance(taskset, Projection) else None
    if projection is not None:
        if (space is not None and get_space(space, **(space_options or {})) != projection.space) or (space is None and space_options):
            raise InputError(f"the projection is in space {projection.space.name!r} {projection.space.options()}; "
                             "project again to merge in another space")
        sp, taskset = projection.space, projection.taskset
    else:
        sp = get_space("full" if space is None else space, **(space_options or {}))
    matrix_modules = _matrix_modules(taskset)
    other_modules = [m for m in taskset.module_names if m not in set(matrix_modules)]
    plan = _Plan(spec, values, sp, _side_inputs(spec, values, taskset, matrix_modules, side_inputs))
    with completion.recording() as completed:
        if matrix_modules:
            _merge_matrices(emit, plan, taskset, matrix_modules, projection)
    for m in other_modules:
        emit(m, _merge_nonmatrix(plan, taskset.updates(m), m))
    return {
        "method": spec.name,
        "space": sp.name,
        "space_options": sp.options(),
        "hyper_parameters": values,
        "nonmatrix": {stage_name: stage.nonmatrix for stage_name, stage in spec.stages},
        "tasks": list(taskset.names),
        "peft": peft_template(taskset),
        **({"completed_directions": dict(completed)} if completed else {}),
    }


def _lookup(method: str) -> MergeMethod | Composition:
    if not isinstance(method, str):
        raise InputError(f"method must be a name, got {type(method).__name__}")
    return METHODS[method]
