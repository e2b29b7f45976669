"""The study as a graph: which nodes run in which order, run here or by an orchestrator, and probing."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from mergelab.config import StudySpec
from mergelab.errors import InputError
from mergelab.study.run import Run, MergeJob, Node, NodeResult, adapt_jobs, merge_jobs
from mergelab.merging import METHODS
from mergelab.merging.registry import check_feasible
from mergelab.study.nodes import ADAPT, ADAPTATION_STUDY, ANALYSIS, EVALUATE, MERGE, REFERENCE, STAGE, hyper_parameters
from mergelab.study.results import RESULTS, adapt_row, merge_row, selected_merges

# The graph -----------------------------------------------------------------------------------------

#: Node kind -> its :class:`~mergelab.study.run.Node` (called ``(ctx, *args) -> NodeResult``);
#: ``flows/`` wraps each in a Prefect task.
NODES: dict[str, Node] = {n.kind: n for n in (STAGE, REFERENCE, MERGE, ADAPT, EVALUATE, RESULTS, ANALYSIS, ADAPTATION_STUDY)}

#: Runs a batch of nodes of one kind, ``submit(kind, [args, ...])``, and returns their results in order.
Submit = Callable[[str, Sequence[tuple[Any, ...]]], list[NodeResult]]


#: The phases of a study, in the order they run, and the phases each needs before it.
PHASES: dict[str, tuple[str, ...]] = {
    "stage": (), "reference": ("stage",), "merge": ("stage",), "adapt": ("stage",), "evaluate": ("reference", "merge", "adapt"),
    "results": ("evaluate",), "analysis": ("results",), "adaptation_study": ("stage",),
}


def _with_needs(phases: Iterable[str]) -> set[str]:
    wanted, todo = set(), list(phases)
    while todo:
        phase = todo.pop()
        if phase not in PHASES:
            raise InputError(f"unknown study phase {phase!r}; phases: {', '.join(PHASES)}")
        if phase not in wanted:
            wanted.add(phase)
            todo += PHASES[phase]
    return wanted


def run_graph(ctx: Run, submit: Submit, phases: Iterable[str] | None = None) -> tuple[list[NodeResult], NodeResult | None]:
    """The study's nodes in dependency order; returns them all and the results node.

    Stage, references, merges, adaptive runs, their evaluations, the results (selection), the
    analyses (those of merged models take the selected merges) and the adaptation studies, or
    only the named ``phases`` (:data:`PHASES`) and the phases they need. A study without merges
    (only analyses or adaptation studies) has no results node (``None``).
    """
    spec, want = ctx.spec, _with_needs(PHASES if phases is None else phases)

    def run(kind: str, batch: Sequence[tuple[Any, ...]]) -> list[NodeResult]:
        return submit(kind, batch) if kind in want else []

    merges, adapts = merge_jobs(spec), adapt_jobs(spec)
    if "analysis" in want:
        _check_analyses_fit(ctx, spec.analyses)
    if "merge" in want:
        for job in merges:  # bounds that depend on the adapters (module sizes, summed ranks)
            check_feasible(METHODS[job.method], ctx.taskset, hyper_parameters(job))
    staged = run("stage", [()])
    references = run("reference", [(name,) for name in [None, *ctx.eval_session.names]]) if merges or adapts else []
    merged = run("merge", [(job,) for job in merges])
    ctx.release_bases()
    adapted = run("adapt", [(job,) for job in adapts])
    evaluated = run("evaluate", [(produced,) for produced in merged + adapted])
    rows = [merge_row(j, p, e, spec.seeds[0]) for j, p, e in zip(merges, merged, evaluated[:len(merged)], strict=True)] \
        if "results" in want else []
    rows += [adapt_row(ctx, j, p, e) for j, p, e in zip(adapts, adapted, evaluated[len(merged):], strict=True)] \
        if "results" in want else []
    done = run("results", [(rows, references)])[0] if rows else None
    selected = selected_merges(ctx, done, merges, merged) if done is not None and merges else []
    analyses = run("analysis", [(name, selected) for name in spec.analyses])
    studies = run("adaptation_study", [(name,) for name in spec.adaptation_studies])
    return staged + references + merged + adapted + evaluated + ([done] if done else []) + analyses + studies, done


def analysis_graph(ctx: Run, submit: Submit, names: Sequence[str],
                   selected: Sequence[tuple[MergeJob, NodeResult]]) -> list[NodeResult]:
    """The stage node and the named analyses, on their own (``mergelab analyze``); analyses of
    merged models take ``selected`` (:func:`selected_for_analyses`)."""
    from mergelab.experiments.registry import ANALYSES

    batch = [(name, list(selected) if ANALYSES[name].needs == "merged" else []) for name in names]
    _check_analyses_fit(ctx, names)
    return submit("stage", [()]) + submit("analysis", batch)


def _check_analyses_fit(ctx: Run, names: Sequence[str]) -> None:
    """Settings that depend on the adapters (the blocks they change), checked on the task set before any
    node runs: the stage node's key reads the task set anyway, so a cached rerun's probe
    (:func:`up_to_date`) and ``mergelab run`` refuse them before Prefect starts."""
    from mergelab.experiments.registry import check_analysis_fits

    for name in names:
        check_analysis_fits(name, ctx.spec.analysis_settings.get(name), ctx.taskset)


def analyses_up_to_date(spec: StudySpec, store_url: str, names: Sequence[str]) -> list[NodeResult] | None:
    """:func:`analysis_graph`'s nodes when every one is already in the store, else ``None``
    (probed here, nothing computed: a cached ``mergelab analyze`` needs no orchestrator)."""
    from mergelab.experiments.registry import ANALYSES

    selected = selected_for_analyses(spec, store_url) if any(ANALYSES[n].needs == "merged" for n in names) else []
    ctx = Run(spec, store_url)
    return _probed(ctx, lambda submit: analysis_graph(ctx, submit, names, selected))


class _Missing(Exception):
    """A probed node's artifact is not in the store (ends the walk: later keys need its result)."""


def _probed(ctx: Run, walk: Callable[[Submit], Any]) -> Any:
    """``walk(submit)`` with a :data:`Submit` that only probes (:meth:`Node.probe`): its value when
    every node is in the store, with their refs set then, else ``None``."""
    found: list[tuple[Node, NodeResult, tuple[Any, ...]]] = []

    def submit(kind: str, batch: Sequence[tuple[Any, ...]]) -> list[NodeResult]:
        results = [NODES[kind].probe(ctx, *args) for args in batch]
        if any(r is None for r in results):
            raise _Missing(kind)
        found.extend((NODES[kind], r, args) for r, args in zip(results, batch, strict=True))
        return results

    try:
        value = walk(submit)
    except _Missing:
        return None
    for node, result, args in found:
        node.name(ctx, result.key, *args)
    return value


def selected_for_analyses(spec: StudySpec, store_url: str) -> list[tuple[MergeJob, NodeResult]]:
    """The study's selected static merges, for analyses of merged models run on their own.

    Needs every merge, evaluation and the results of the study in the store (``mergelab run``);
    otherwise an :class:`InputError` says so.
    """
    core = spec.model_copy(update={"analyses": [], "adaptation_studies": {}})
    found = up_to_date(core, store_url) if spec.methods else None
    if found is None or found[1] is None:
        raise InputError(f"study {spec.name}: analyses of merged models need the study's selected merges; "
                         "run `mergelab run` on the study first")
    produced, done = found
    return selected_merges(Run(core, store_url), done, merge_jobs(spec), [n for n in produced if n.node == "merge"])


def local_submit(ctx: Run, on_node: Callable[[NodeResult], None] | None = None,
                 adapt_progress: Callable[[int, float], None] | None = None,
                 start_progress: Callable[[int, int], None] | None = None) -> Submit:
    """A :data:`Submit` that runs every node here, one after another (no orchestrator).

    ``on_node`` hears of each result; ``adapt_progress(iteration, loss)`` of every adaptation step and
    ``start_progress(scored, total)`` of every starting point scored before step 1.
    """
    def submit(kind: str, batch: Sequence[tuple[Any, ...]]) -> list[NodeResult]:
        options = {"progress": adapt_progress, "start_progress": start_progress} if kind == "adapt" else {}
        results = []
        for args in batch:
            results.append(NODES[kind](ctx, *args, **options))
            if on_node is not None:
                on_node(results[-1])
        return results

    return submit


def up_to_date(spec: StudySpec, store_url: str) -> tuple[list[NodeResult], NodeResult | None] | None:
    """The study's nodes and results node when every artifact is already in the store, else ``None``.

    Walks :func:`run_graph` in this process probing each node's key: nothing is computed or
    loaded but the checkpoints' hashes, so an unchanged study is confirmed without starting an
    orchestrator.
    """
    ctx = Run(spec, store_url)
    return _probed(ctx, lambda submit: run_graph(ctx, submit))
