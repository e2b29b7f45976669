"""The study graph run phase by phase (what the stage / merge_sweep / adapt / evaluate flows do)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergelab.config import load_study
from mergelab.study.results import hyper_parameters
from mergelab.errors import InputError
from mergelab.study import PHASES, Run, local_submit, run_graph, up_to_date

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "name": "tiny-graph",
    "bench": {"kind": "micro", "root": str(REPO / "data/micro"), "rank": 4},
    "tasks": ["digits", "textures"],
    "methods": [{"method": "task_arithmetic", "spaces": ["full"], "grid": {"alpha": [0.3]}}],
    "adaptive": [{"method": "adamerging", "iters": 1, "batch_size": 4}],
    "analyses": ["norms"],
    "joint": False,
}


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    return Run(load_study(TINY), str(tmp_path_factory.mktemp("graph") / "store"))


def kinds(nodes) -> list[str]:
    return list(dict.fromkeys(n.node for n in nodes))


def test_a_phase_runs_with_the_phases_it_needs_and_nothing_else(context, one_thread):
    submit = local_submit(context)
    assert kinds(run_graph(context, submit, phases=["stage"])[0]) == ["stage"]
    assert kinds(run_graph(context, submit, phases=["merge"])[0]) == ["stage", "merge"]
    nodes, done = run_graph(context, submit, phases=["evaluate"])
    assert kinds(nodes) == ["stage", "reference", "merge", "adapt", "evaluate"] and done is None
    nodes, done = run_graph(context, submit)  # the whole study reuses every node computed above
    assert kinds(nodes) == ["stage", "reference", "merge", "adapt", "evaluate", "results", "analysis"]
    assert [n.node for n in nodes if not n.hit] == ["results", "analysis"]
    ds = context.store.get_dataset(done.key)  # each configuration as a value beside its label
    assert hyper_parameters(ds, "alpha=0.3") == {"alpha": 0.3}
    (adapted,) = [str(c) for c in ds.config.values if c != "alpha=0.3"]
    assert hyper_parameters(ds, adapted) == {"iters": 1, "lr": context.spec.adaptive[0].lr} and adapted.startswith("iters=1,lr=")
    assert list(PHASES) == ["stage", "reference", "merge", "adapt", "evaluate", "results", "analysis", "adaptation_study"]


def test_an_unknown_phase_is_one_line(context):
    with pytest.raises(InputError, match="unknown study phase 'merges'; phases: stage, reference"):
        run_graph(context, local_submit(context), phases=["merges"])


def test_every_phase_is_one_node_kind_whose_probe_computes_nothing(context, one_thread):
    from mergelab.study import NODES, MergeJob
    from mergelab.store import Store

    assert list(NODES) == list(PHASES) and all(node.kind == kind for kind, node in NODES.items())
    nodes, _ = run_graph(context, local_submit(context))
    merge = NODES["merge"]
    assert merge.probe(context, MergeJob("task_arithmetic", "full", {"alpha": 0.3})) == next(n for n in nodes if n.node == "merge")
    published = [a.key for a in Store(context.store.url).ls()]
    assert merge.probe(context, MergeJob("task_arithmetic", "full", {"alpha": 0.9})) is None
    assert NODES["evaluate"].probe(context, next(n for n in nodes if n.node == "merge")) is not None
    assert [a.key for a in Store(context.store.url).ls()] == published


def test_unseen_tasks_are_evaluated_and_normalised_but_never_merged_or_selected_on(tmp_path, one_thread):
    """001 Tab. 4's protocol: merge some tasks, evaluate every merge on others as well."""
    from mergelab.merging import merge
    from mergelab.store import Store

    from mergelab_figures import tables

    spec = {**TINY, "name": "tiny-unseen", "unseen": ["signs"], "adaptive": [], "analyses": [],
            "methods": [{"method": "task_arithmetic", "spaces": ["full"], "grid": {"alpha": [0.3, 1.0]}}]}
    run = Run(load_study(spec), str(tmp_path / "store"))
    nodes, _ = run_graph(run, local_submit(run))
    assert run.taskset.names == ("digits", "textures")  # what is merged
    ds = Store(run.store.url).get_dataset(next(n.key for n in nodes if n.node == "results"))
    assert ds.attrs["tasks"] == ["digits", "textures"] and ds.attrs["unseen"] == ["signs"]
    assert list(ds.task.values) == ["digits", "textures", "signs"]
    # the unseen task is scored with the merge of the other two, normalised by its own fine-tuned model
    ta = merge(run.taskset, "task_arithmetic", "full", alpha=1.0)
    session = run.eval_session
    acc = session.accuracy("signs", "test", session.weights(ta))[0]
    finetuned = session.accuracy("signs", "test", session.finetuned("signs"))[0]
    score = ds["score"].sel(merge_method="task_arithmetic", space="full", config="alpha=1.0", task="signs").squeeze()
    assert float(score.sel(metric="acc")) == acc and float(score.sel(metric="norm_acc")) == pytest.approx(acc / finetuned)
    # the selection reads the merged tasks' val only
    val = ds["score"].sel(task=["digits", "textures"], metric="val_norm_acc").mean("task").squeeze()
    chosen = ds["selected"].squeeze()
    assert str(chosen.config[chosen.values.argmax()].item()) == str(val.config[val.values.argmax()].item())
    frame = tables.unseen_frame(ds)
    assert list(frame.columns) == ["digits", "textures", "Avg. seen", "signs", "Avg. unseen", tables.AVG]
    assert tables.has_unseen(ds) and not tables.has_unseen(ds.assign_attrs(unseen=[]))


def test_unseen_tasks_need_the_merged_ones_named_and_distinct():
    with pytest.raises(ValueError, match="unseen tasks need the merged ones listed too"):
        load_study({**TINY, "tasks": None, "unseen": ["signs"]})
    with pytest.raises(ValueError, match="unseen: 'digits' is also in tasks"):
        load_study({**TINY, "unseen": ["digits"]})


def test_a_labelled_adaptation_study_runs_a_registered_one_again_and_is_named_beside_it(tmp_path, one_thread):
    """001 Fig. 10's four pairs: ``pareto`` and ``<label>: {study: pareto, pair: …}`` entries."""
    from mergelab.store import Store

    from mergelab_figures.data import available

    sweep = {"n_preferences": 2, "iters": 1, "batch_size": 4, "splits": ["val"]}
    spec = {**TINY, "name": "tiny-pairs", "tasks": ["digits", "textures", "signs"], "methods": [], "adaptive": [], "analyses": [],
            "adaptation_studies": {"pareto": {**sweep, "pair": ["digits", "textures"]},
                                   "pareto_signs": {"study": "pareto", **sweep, "pair": ["signs", "digits"]},
                                   "pareto_same": {"study": "pareto", **sweep, "pair": ["digits", "textures"]}}}
    run = Run(load_study(spec), str(tmp_path / "store"))
    nodes, _ = run_graph(run, local_submit(run))
    studies = [n for n in nodes if n.node == "adaptation_study"]
    assert len(studies) == 3 and studies[0].key == studies[2].key  # the same settings are the same artifact
    names = available(Store(run.store.url), "tiny-pairs")
    assert {"preferences/pareto", "preferences/pareto/pareto_signs", "preferences/pareto/pareto_same"} <= set(names)
    signs = Store(run.store.url).get_dataset(Store(run.store.url).ref("studies/tiny-pairs/preferences/pareto/pareto_signs"))
    assert list(signs.task.values) == ["signs", "digits"]


def test_a_bound_that_depends_on_the_adapters_fails_before_any_node_merges(tmp_path):
    """LoRA-LEGO's k above a module's Σ_t r_t (two rank-4 adapters: 8 units) is refused on the task set
    before any node runs, and so by the cached-rerun probe that ``mergelab run`` takes before Prefect starts
    (issue 30 item 5: it failed in the merge node; then after the stage node, probe case 540's kind)."""
    from mergelab.store import Store

    spec = load_study({**TINY, "adaptive": [], "analyses": [],
                       "methods": [{"method": "task_arithmetic", "spaces": ["full"], "grid": {"alpha": [0.3]}},
                                   {"method": "lora_lego", "spaces": ["full"], "grid": {"k": [4, 64]}}]})
    ctx = Run(spec, str(tmp_path / "store"))
    for walk in (lambda: run_graph(ctx, local_submit(ctx)), lambda: up_to_date(spec, str(tmp_path / "store"))):
        with pytest.raises(InputError, match=r"lora_lego: k=64 clusters but only 8 minimal semantic units .*choose k <= 8"):
            walk()
    assert list(Store(str(tmp_path / "store")).ls()) == []


@pytest.mark.parametrize("analyze", [False, True], ids=["run", "analyze"])
def test_analysis_layers_beyond_the_adapters_fail_before_any_node_runs(tmp_path, analyze):
    """``components`` on a block the adapters do not change (the micro tower has blocks 0 to 3) is refused
    on the task set before any node runs, stage included (issue 30 case 688: it ran the whole study first,
    and a list with one good block silently dropped the other; probe case 540: then after the stage node)."""
    from mergelab.store import Store
    from mergelab.study.graph import analysis_graph

    spec = load_study({**TINY, "adaptive": [], "analyses": ["components"], "analysis_settings": {"components": {"layers": [1, 9]}}})
    ctx = Run(spec, str(tmp_path / "store"))
    with pytest.raises(InputError, match=r"analysis_settings: components: layers=\[1, 9\] names block 9, which the adapters do not "
                                         r"change \(their blocks: 0, 1, 2, 3\); list some of those"):
        analysis_graph(ctx, local_submit(ctx), ["components"], []) if analyze else run_graph(ctx, local_submit(ctx))
    assert list(Store(str(tmp_path / "store")).ls()) == []
