"""One-off jobs with the user's adapters, outside a study: merging (with hyper-parameter selection) and adaptation.

:func:`merge_adapters` is what ``mergelab merge`` runs (check the options, load, optionally select
on a benchmark, merge, cap the rank, write, record the configuration in the store);
:func:`adapt_adapters` what ``mergelab adapt`` runs. The selection and the adaptive run are
one-method studies on a benchmark (:mod:`mergelab.study.one_method`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_type_hints

from torch import Tensor

from mergelab.bench import Bench
from mergelab.cards import SCORE_METRICS, inputs_of
from mergelab.checkpoints.writing import DEFAULT_SHARD_SIZE
from mergelab.adaptive_spec import AdaptiveSpec, check_labels_allowed
from mergelab.config import checked_spec
from mergelab.errors import InputError
from mergelab.merging import METHODS, merge
from mergelab.merging.registry import check_feasible
from mergelab.selection import SELECTION_RULES
from mergelab.study import NodeResult
from mergelab.study.one_method import Adapted, Selection, adapt_on_bench, evaluation_bench, select_hyper_parameters, swept_grid

if TYPE_CHECKING:
    from mergelab.merging.registry import Composition, MergeMethod
    from mergelab.serving import RankCap
    from mergelab.spaces import Space
    from mergelab.store import Store
    from mergelab.store_format import Key
    from mergelab.taskset import MergedUpdate, TaskSet

__all__ = ["Merged", "adapt_adapters", "check_output", "gives_dense", "merge_adapters"]


@dataclass(frozen=True)
class Merged:
    """What :func:`merge_adapters` wrote: the output, the stored configuration, the selection."""

    written: Path
    key: str
    store: str
    record: dict[str, Any]
    selection: Selection | None
    capped: dict[str, float]


def gives_dense(spec: MergeMethod | Composition, space: Space) -> bool:
    """Whether ``spec`` in ``space`` merges every matrix module into a dense update, known before it runs:
    the full space has no maps that carry a merged matrix back to factors, so a last stage that returns
    a matrix (annotated ``-> Tensor``) gives dense modules, which no LoRA adapter holds; stages that return
    factors (``-> LowRank``: svd, linear, lora_lego) stay low rank. The other spaces reconstruct factors,
    except where a stage completes the spectrum in the full space (KnOTS' ``spectral="update"``), which
    only the merge shows (:func:`~mergelab.checkpoints.save_merged` refuses it then)."""
    from mergelab.spaces.full import FullSpace

    _, last = spec.stages[-1]
    return isinstance(space, FullSpace) and get_type_hints(last.fn).get("return") is Tensor


@dataclass(frozen=True)
class _Request:
    """:func:`merge_adapters`' arguments as given (``on_selection`` aside), read by its steps."""

    sources: Sequence[str]
    base: str
    method: str
    space: str
    out: Path
    fixed: Mapping[str, str] | None
    space_options: Mapping[str, str] | None
    fmt: str
    max_rank: int | str | None
    grams: Path | None
    modules: Sequence[str] | None
    force: bool
    select: str | None
    grid: Mapping[str, Sequence[Any]] | None
    bench: str
    store: str | None
    base_module: str | None
    shard_size: int | str
    command: str | None


@dataclass(frozen=True)
class _Plan:
    """What :func:`merge_adapters`' options read as once checked: the rank cap, the shard size, the store,
    the method with its fixed and resolved hyper-parameters, the space."""

    cap: RankCap | None
    size: int
    store: Store
    spec: MergeMethod | Composition
    fixed: dict[str, str]
    hyper_parameters: dict[str, Any]
    space: Space


def merge_adapters(sources: Sequence[str], base: str, method: str, space: str = "full", *, out: Path,
                   fixed: Mapping[str, str] | None = None, space_options: Mapping[str, str] | None = None, fmt: str = "peft",
                   max_rank: int | str | None = None, grams: Path | None = None, modules: Sequence[str] | None = None,
                   force: bool = False, select: str | None = None, grid: Mapping[str, Sequence[Any]] | None = None,
                   bench: str = "micro", store: str | None = None, base_module: str | None = None,
                   shard_size: int | str = DEFAULT_SHARD_SIZE, command: str | None = None,
                   on_selection: Callable[[str, str, Bench, Callable[..., Selection]], Selection] | None = None) -> Merged:
    """Merge ``sources`` with ``method`` in ``space``; write a PEFT adapter or merged weights to ``out``.

    The configuration (method, space, hyper-parameters with defaults filled in, task hashes) and
    the result's provenance go to the store as a ``merge.config`` JSON artifact. With ``select``
    (a rule of :data:`~mergelab.selection.SELECTION_RULES`) every configuration of the method's grid (``grid`` replacing some
    values, ``fixed`` left out) is merged and evaluated on ``bench``'s val split first
    (:func:`select_hyper_parameters`); ``on_selection(method, space, bench, run)`` may wrap that
    run (the CLI shows progress: ``run(progress=…)``). ``max_rank`` is ``--max-rank`` (an integer, or a
    serving engine's set: :func:`~mergelab.serving.parse_max_rank`); ``shard_size`` bounds a weights file
    (:func:`~mergelab.checkpoints.writing.parse_size`); ``command`` (the CLI's invocation) goes to the record
    and the card. Every argument is checked before anything loads.

    It takes 20 parameters because it is the library face of ``mergelab merge``: each is one of the command's options
    (gathered at once into a ``_Request`` and checked), but ``command`` and the CLI's ``on_selection`` hook.
    """
    from mergelab.checkpoints import cap_rank, load_grams, load_taskset, save_merged, task_heads
    from mergelab.checkpoints.writing import merged_rank

    request = _Request(sources=sources, base=base, method=method, space=space, out=out, fixed=fixed, space_options=space_options,
                       fmt=fmt, max_rank=max_rank, grams=grams, modules=modules, force=force, select=select, grid=grid, bench=bench,
                       store=store, base_module=base_module, shard_size=shard_size, command=command)
    plan = _checked_options(request)
    taskset = load_taskset(base, sources, modules=modules, base_module=base_module)
    if select is None:  # a selection's study checks every candidate once the adapters are staged
        check_feasible(plan.spec, taskset, plan.hyper_parameters)
    if plan.cap is not None:
        plan.cap.check_binds(taskset)
    side_inputs = {"grams": load_grams(grams, taskset)} if grams is not None else None
    evaluation = evaluation_bench(bench, taskset, base) if select is not None else None
    _check_low_rank_output(fmt, plan)  # after the inputs' own checks: an adapter no merge can read is the first thing to fix
    selection, hyper_parameters = None, plan.hyper_parameters
    if evaluation is not None:
        bench_spec, evaluating = evaluation
        run = functools.partial(select_hyper_parameters, evaluating, bench_spec, plan.spec.name, plan.space.name, select, plan.fixed,
                                plan.store.url, grid=grid)
        selection = on_selection(plan.spec.name, plan.space.name, evaluating, run) if on_selection is not None else run()
        hyper_parameters = plan.spec.resolve({**plan.fixed, **selection.config})
    start = time.perf_counter()
    merged = merge(taskset, plan.spec.name, plan.space, side_inputs=side_inputs, **hyper_parameters)
    merge_time = time.perf_counter() - start
    merged, capped = cap_rank(merged, plan.cap.resolve(merged_rank(merged))) if plan.cap is not None else (merged, {})
    key, record = _merge_record(request, plan, taskset, merged, merge_time, selection)
    if not plan.store.exists(key):  # the small record first: a store that cannot take it leaves no output behind
        plan.store.put_json(key, record)
    written = save_merged(merged, out, format=fmt, base=base, overwrite=force, heads=task_heads(taskset), record=record,  # type: ignore[arg-type]
                          shard_size=plan.size)
    return Merged(written, str(key), plan.store.url, record, selection, capped)


def _checked_options(request: _Request) -> _Plan:
    """Step 1 of :func:`merge_adapters`: every option checked, and read, before anything loads."""
    from mergelab.checkpoints.writing import parse_size
    from mergelab.serving import parse_max_rank
    from mergelab.spaces import get_space
    from mergelab.store import Store

    r = request
    if not r.sources:
        raise InputError("no adapters given; pass --adapters DIR [DIR ...]")
    if r.max_rank is not None and r.fmt != "peft":
        raise InputError(f"--max-rank {r.max_rank} caps a PEFT adapter's rank; use it with --format peft")
    cap = parse_max_rank(r.max_rank, warn=False) if r.max_rank is not None else None  # warns once the cap is known to bind
    size = parse_size(r.shard_size)
    s = Store(r.store)
    check_output(r.fmt, r.out, r.force, store=s, sources=r.sources, base=r.base, shard_size=size, grams=r.grams,
                 bench=None if r.bench == "micro" else r.bench)
    spec, fixed = METHODS[r.method], dict(r.fixed or {})
    hyper_parameters = spec.resolve(fixed)
    sp = get_space(r.space, **dict(r.space_options or {}))
    _check_selection_options(r, spec.name, fixed)
    return _Plan(cap, size, s, spec, fixed, hyper_parameters, sp)


def _check_selection_options(request: _Request, method: str, fixed: Mapping[str, str]) -> None:
    """Step 1 of :func:`merge_adapters`, continued: ``--select``, ``--grid`` and ``--bench`` agree, and the grid is not too large."""
    r = request
    if r.grid and r.select is None:
        raise InputError("--grid lists values to select from; add --select val or --select tas")
    if r.bench != "micro" and r.select is None:
        raise InputError(f"--bench {r.bench} names the benchmark --select evaluates on; add --select val or --select tas, or drop --bench")
    if r.select is not None:
        SELECTION_RULES.require(r.select)
    if r.select is not None and (r.grams or r.modules or r.space_options):
        raise InputError("--select evaluates whole models merged with default space options; drop --grams, --modules and --space-option")
    if r.select is not None:
        swept_grid(method, fixed, r.grid)  # a too-large grid fails before the benchmark loads


def _check_low_rank_output(fmt: str, plan: _Plan) -> None:
    """Step 2 of :func:`merge_adapters`, once the adapters are loaded and checked: a PEFT output (with no rank cap) from a method and
    space that give low-rank modules."""
    spec, sp = plan.spec, plan.space
    if fmt == "peft" and plan.cap is None and gives_dense(spec, sp):
        raise InputError(f"{spec.name} in the {sp.name} space gives a dense update of every module, not a LoRA adapter; save with "
                         "format='weights' (CLI: --format weights), cap its rank (--max-rank: a truncated SVD per module) or "
                         "merge in a low-rank space (knots, core)")


def _merge_record(request: _Request, plan: _Plan, taskset: TaskSet, merged: MergedUpdate, merge_time: float,
                  selection: Selection | None) -> tuple[Key, dict[str, Any]]:
    """The last step of :func:`merge_adapters`: the ``merge.config`` key and the record (``merge.json``, the store's artifact)."""
    import os

    from mergelab.provenance import merge_reproducibility

    cap, sp, select = plan.cap, plan.space, request.select
    config = {"method": plan.spec.name, "space": sp.name, "space_options": sp.options(),
              "hyper_parameters": merged.meta["hyper_parameters"], **({"max_rank": merged.meta["max_rank"]} if cap is not None else {})}
    key = plan.store.key("merge.config", "1", taskset=taskset, **config, **({"selection": select} if select else {}))
    record = {**config, "tasks": inputs_of(taskset), "base": taskset.base.__dict__, "result_content_hash": merged.content_hash,
              "output": str(Path(request.out).resolve()), "format": request.fmt,
              "ranks": {m: getattr(u, "rank", None) for m, u in merged.modules.items()},
              "merge_time_s": round(merge_time, 4), "reproducibility": merge_reproducibility(merged),
              **({"max_rank_rule": cap.describe()} if cap is not None else {}),
              **({"serving": {"engine": cap.engine, "max_lora_rank": merged.meta["max_rank"]}} if cap is not None and cap.engine else {}),
              **({"command": request.command, "cwd": os.getcwd()} if request.command is not None else {})}
    if selection is not None:
        record["selection"] = {"rule": selection.rule, "chosen": selection.label, "results": str(selection.results),
                               "ref": f"studies/{selection.name}/results",
                               "criterion": dict(zip(map(str, selection.criterion.config.values), map(float, selection.criterion.values)))}
        record["scores"], record["intervals"] = selection.scores, selection.intervals
    return key, record


def adapt_adapters(sources: Sequence[str], base: str, adaptive: Mapping[str, Any], *, out: Path, fmt: str = "peft",
                   force: bool = False, seed: int = 0, allow_labels: bool = False, bench: str = "micro",
                   store: str | None = None, base_module: str | None = None, shard_size: int | str = DEFAULT_SHARD_SIZE,
                   command: str | None = None,
                   progress: Callable[[int, float], None] | None = None,
                   start_progress: Callable[[int, int], None] | None = None,
                   on_node: Callable[[NodeResult], None] | None = None) -> tuple[Adapted, Path, str]:
    """Adapt ``adaptive`` (an ``adaptive:`` entry of a study) for ``sources`` on ``bench``'s unlabeled
    val images (:func:`adapt_on_bench`, which the three callbacks go to) and write the merge to
    ``out`` with its scores and ``command`` in the record and card (``shard_size`` as :func:`merge_adapters`);
    returns the run, the written path and the store URL. Options are validated before anything loads.

    It takes 16 parameters because it is the library face of ``mergelab adapt``: up to ``command`` each is one of the
    command's options, the last three are the CLI's progress callbacks, passed on to :func:`adapt_on_bench`."""
    import os

    from mergelab.adaptation.objectives import validate_preference
    from mergelab.checkpoints import load_taskset, save_merged, task_heads
    from mergelab.checkpoints.writing import parse_size
    from mergelab.store import Store

    if not sources:
        raise InputError("no adapters given; pass --adapters DIR [DIR ...]")
    size = parse_size(shard_size)
    check_output(fmt, out, force, store=Store(store), sources=sources, base=base, shard_size=size,
                 bench=None if bench == "micro" else bench)
    entry = checked_spec(AdaptiveSpec, "adaptive", **adaptive)  # bad options fail here, before anything loads
    check_labels_allowed([entry], allow_labels)
    validate_preference(entry.preference, len(sources))
    taskset = load_taskset(base, sources, base_module=base_module)
    bench_spec, evaluating = evaluation_bench(bench, taskset, base)
    url = Store(store).url
    result = adapt_on_bench(evaluating, bench_spec, taskset, entry, url, seed=seed, allow_labels=allow_labels, progress=progress,
                            start_progress=start_progress, on_node=on_node)
    scores = {str(task): {m: float(result.scores.sel(task=task, metric=m)) for m in SCORE_METRICS if m in result.scores.metric.values}
              for task in result.scores.task.values}
    record = {"tasks": inputs_of(taskset), "adaptive": dict(adaptive), "scores": scores, "study": result.name,
              **({"command": command, "cwd": os.getcwd()} if command is not None else {})}
    written = save_merged(result.merged, out, format=fmt, base=base, overwrite=force, heads=task_heads(taskset), record=record,
                          shard_size=size)
    return result, written, url


def check_output(fmt: str, out: Path, force: bool, *, store: Store, sources: Sequence[str], base: str,
                 shard_size: int = DEFAULT_SHARD_SIZE, **inputs: str | Path | None) -> None:
    """``--format``, ``--shard-size`` (a bound of ``--format weights`` only: another one with ``peft`` is
    refused, as it would change nothing) and ``--out`` checked before any work (``save_merged`` checks again when writing):
    an existing ``--out`` needs ``--force`` and must be replaceable (:func:`~mergelab.outputs.check_replaceable`:
    a previous output, not the working directory, apart from ``store``, the ``sources``, the ``base``
    and the other named ``inputs`` such as ``grams=``).

    It takes 8 parameters because it checks the output options ``merge`` and ``adapt`` share (format, out, force, shard
    size) against all that ``--out`` must not replace (the store, the sources, the base and the other named ``inputs``)."""
    from mergelab.checkpoints.files import named_sources
    from mergelab.errors import check_writable
    from mergelab.outputs import check_apart, check_replaceable

    if fmt not in ("peft", "weights"):
        raise InputError(f"--format {fmt!r} is not one of peft, weights")
    if fmt != "weights" and shard_size != DEFAULT_SHARD_SIZE:
        raise InputError(f"--shard-size ({shard_size} bytes) bounds a weights file; use it with --format weights (a PEFT adapter is one "
                         "file)")
    guarded = {f"adapter {name!r}": path for name, path in named_sources(sources, None)}
    guarded |= {"base model": base, **{f"--{k}": v for k, v in inputs.items() if v is not None}}
    if out.exists() or out.is_symlink():
        if not force:
            raise InputError(f"output {out} already exists; choose another path or pass --force")
        check_replaceable(out, store=store.local_root, inputs=guarded)
    else:
        check_apart(out, store=store.local_root, inputs=guarded)
    check_writable(out, "--out")