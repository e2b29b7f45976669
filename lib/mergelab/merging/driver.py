"""``merge(taskset, method, space, **hp)``: run any registered method in any space.

Per module: the space projects the tasks' updates (:meth:`Space.project`), the method's stages
run on the projections, the space reconstructs the merged update. What a stage receives is
read off its registry entry (:mod:`mergelab.merging.registry`):

* ``inputs="tensors"`` in a space with ``scope="model"``: one vector per task, the
  concatenation of every matrix module's projection (e.g. the KnOTS paper's global trim);
* ``inputs="tensors"`` / ``"matrices"`` otherwise: the projected matrices of one module;
* ``inputs="factors"``: the tasks' LoRA factors in the space's coordinates;
* ``side``: the side inputs, mapped by the space (RegMean: ``Qᵀ G_t Q``).

Non-matrix parameters (Dense updates with ``ndim != 2``) are not projected; each stage applies
its ``nonmatrix`` rule. A method with a ``seed`` gets, per module, the seed
``derive_seed(seed, module)`` (``"<model>"`` for a model-wide call), so that same-shape
modules do not share one DARE mask; the inputs are never modified.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mergelab.checkpoints import peft_template
from mergelab.errors import InputError
from mergelab.merging.registry import Composition, MergeMethod
from mergelab.merging.regmean import check_grams
from mergelab.spaces import Context, Space, get_space
from mergelab.taskset import Dense, LowRank, MergedUpdate, TaskSet, Update

__all__ = ["derive_seed", "merge"]

MODEL = "<model>"


def derive_seed(seed: int, key: str) -> int:
    """A 32-bit seed from a user seed and a module name (stable across runs and machines; 32 bits
    because scikit-learn's random_state takes no more)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _call(method: MergeMethod, args: tuple, hp: Mapping[str, Any], key: str) -> Tensor | LowRank:
    if "seed" in method.params:
        hp = {**hp, "seed": derive_seed(hp["seed"], key)}
    return method.fn(*args, **hp)


def _as_matrix(x: Tensor | LowRank) -> Tensor:
    return x.dense() if isinstance(x, LowRank) else x


def _model_wide(method: MergeMethod, per_module: Mapping[str, list[Tensor]], hp: Mapping[str, Any]) -> dict[str, Tensor]:
    """Run an element-wise method once on every task's concatenated, flattened projections."""
    modules = list(per_module)
    n_tasks = len(per_module[modules[0]])
    vectors = [torch.cat([per_module[m][t].reshape(-1) for m in modules]) for t in range(n_tasks)]
    merged = _call(method, (vectors,), hp, MODEL)
    pieces = merged.split([per_module[m][0].numel() for m in modules])
    return {m: piece.reshape(per_module[m][0].shape) for m, piece in zip(modules, pieces, strict=True)}


def _side_inputs(spec: MergeMethod | Composition, taskset: TaskSet, modules: Sequence[str],
                 side_inputs: Mapping[str, Any] | None) -> dict[str, dict[str, list[Tensor]]]:
    """``{side name: {module: [per-task tensor]}}``, checked against what the method declares."""
    given = dict(side_inputs or {})
    extra = sorted(set(given) - set(spec.side))
    if extra:
        wanted = ", ".join(spec.side) or "none"
        raise InputError(f"method {spec.name!r} takes no side input {', '.join(map(repr, extra))} (it takes: {wanted})")
    out: dict[str, dict[str, list[Tensor]]] = {}
    for name in spec.side:
        if name not in given:
            raise InputError(f"method {spec.name!r} needs side input {name!r}: a mapping task -> module -> tensor "
                             "(for 'grams' collect them with mergelab.merging.collect_input_grams; CLI: --grams FILE)")
        per_task = given[name]
        missing = [(t, m) for t in taskset.names for m in modules if m not in (per_task.get(t) or {})]
        if missing:
            raise InputError(f"side input {name!r} lacks {len(missing)} (task, module) entries, e.g. {missing[0]}; "
                             "provide one per task and matrix module, or restrict the task set's modules")
        if name == "grams":
            shapes = {m: taskset.tasks[0].modules[m].shape for m in modules}
            for t in taskset.names:
                check_grams({m: per_task[t][m] for m in modules}, shapes)
        out[name] = {m: [per_task[t][m] for t in taskset.names] for m in modules}
    return out


def _merge_matrices(spec: MergeMethod | Composition, values: Mapping[str, Any], sp: Space, taskset: TaskSet,
                    modules: Sequence[str], side: Mapping[str, Mapping[str, list[Tensor]]]) -> dict[str, Update]:
    projected: dict[str, tuple[list[Tensor], Context]] = {}
    for m in modules:
        try:
            projected[m] = sp.project(taskset.updates(m))
        except InputError as err:
            raise InputError(f"module {m!r}: {err}") from None
    results: dict[str, Tensor | LowRank] = {}
    for i, (stage_name, stage) in enumerate(spec.stages):
        hp = spec.stage_values(values, stage_name)
        if i == 0:
            per_module = {m: projected[m][0] for m in modules}
        else:
            per_module = {m: [_as_matrix(results[m])] for m in modules}
        if stage.inputs == "tensors" and sp.scope == "model":
            results = dict(_model_wide(stage, per_module, hp))
            continue
        for m in modules:
            ctx = projected[m][1]
            if stage.inputs == "factors":
                try:
                    first = sp.factors(taskset.updates(m), ctx)
                except InputError as err:
                    raise InputError(f"method {spec.name!r} merges LoRA factors; module {m!r}: {err}") from None
            else:
                first = per_module[m]
            side_args = tuple([sp.gram(g, ctx) for g in side[name][m]] for name in stage.side) if i == 0 else ()
            results[m] = _call(stage, (first, *side_args), hp, m)
    return {m: sp.reconstruct(results[m], projected[m][1]) for m in modules}


def _merge_nonmatrix(spec: MergeMethod | Composition, values: Mapping[str, Any], updates: Sequence[Update],
                     module: str) -> Dense:
    current = [u.dense(torch.float64) for u in updates]
    for stage_name, stage in spec.stages:
        hp = spec.stage_values(values, stage_name)
        if stage.nonmatrix == "self":
            merged = _call(stage, (current,), hp, module)
        else:
            stacked = torch.stack(current)
            merged = hp["alpha"] * (stacked.mean(dim=0) if stage.nonmatrix == "mean" else stacked.sum(dim=0))
        current = [merged]
    dtype = torch.float32
    for u in updates:
        dtype = torch.promote_types(dtype, u.dtype)
    return Dense(current[0].to(dtype))


def merge(taskset: TaskSet, method: str, space: str | Space = "full", *, space_options: Mapping[str, Any] | None = None,
          side_inputs: Mapping[str, Any] | None = None, **hp: Any) -> MergedUpdate:
    """Merge a task set with a registered method (or ``a+b`` composition) in a space.

    Args:
        taskset: the tasks; matrix modules go through the space, non-matrix ones through the
            method's ``nonmatrix`` rule.
        method: a key of :data:`~mergelab.merging.METHODS` or a ``+`` composition.
        space: ``"full"``, ``"knots"``, ``"core"`` (or a configured :class:`Space`).
        space_options: options of the space (``{"naive": True}``, ``{"variant": "per_layer"}``).
        side_inputs: per-task, per-module side inputs a method declares
            (``{"grams": {task: {module: G}}}`` for RegMean).
        **hp: hyper-parameters; unknown names or bad values raise InputError naming the allowed.

    Returns:
        A :class:`MergedUpdate` whose ``meta`` records method, space (+ options),
        hyper-parameters, task names and the PEFT layout, so ``save_merged(..., format="peft")``
        writes a loadable adapter when the result is low rank (knots, core; factor methods).
    """
    spec = _lookup(method)
    values = spec.resolve(hp)
    sp = get_space(space, **(space_options or {}))
    first = taskset.tasks[0].modules
    matrix_modules = [m for m in taskset.module_names if len(first[m].shape) == 2]
    other_modules = [m for m in taskset.module_names if len(first[m].shape) != 2]
    side = _side_inputs(spec, taskset, matrix_modules, side_inputs)
    merged: dict[str, Update] = {}
    if matrix_modules:
        merged.update(_merge_matrices(spec, values, sp, taskset, matrix_modules, side))
    for m in other_modules:
        merged[m] = _merge_nonmatrix(spec, values, taskset.updates(m), m)
    meta = {
        "method": spec.name,
        "space": sp.name,
        "space_options": sp.options(),
        "hyper_parameters": values,
        "nonmatrix": {stage_name: stage.nonmatrix for stage_name, stage in spec.stages},
        "tasks": list(taskset.names),
        "peft": peft_template(taskset),
    }
    return MergedUpdate({m: merged[m] for m in taskset.module_names}, taskset.base, meta)


def _lookup(method: str) -> MergeMethod | Composition:
    from mergelab.merging import METHODS

    if not isinstance(method, str):
        raise InputError(f"method must be a name, got {type(method).__name__}")
    return METHODS[method]
