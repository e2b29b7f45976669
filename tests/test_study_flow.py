"""The study flow end to end on a small micro study: results Dataset, cache hits on rerun, only
downstream nodes recompute after a hyper-parameter change, changed adapters recompute, Dask gives
the same results. (``mergelab run`` killed, stopped or run twice at once: test_study_faults.py.)"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml

from mergelab.store import Store

pytestmark = pytest.mark.flow

REPO = Path(__file__).resolve().parents[1]

SMALL = {
    "name": "small",
    "bench": {"kind": "micro", "root": str(REPO / "data/micro"), "rank": 4},
    "tasks": ["digits", "textures", "signs"],
    "methods": [
        {"method": "task_arithmetic", "spaces": ["full", "core"], "grid": {"alpha": [0.3, 0.6]}},
        {"method": "ties", "spaces": ["knots"], "grid": {"density": [0.3], "alpha": [1.0]}},
    ],
    "adaptive": [{"method": "adamerging", "iters": 2, "batch_size": 4}],
    "analyses": ["norms", "merged_rank"],
    "adaptation_studies": {
        "pareto": {"pair": ["digits", "textures"], "n_preferences": 2, "iters": 1, "batch_size": 4, "splits": ["val"]},
        "adarank_ablation": {"origins": ["ta"], "iters": 1, "batch_size": 4, "splits": ["val"], "tasks": ["digits", "signs"]},
    },
}


def write_study(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def computed(run) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in run.nodes:
        if not r.hit:
            out[r.node] = out.get(r.node, 0) + 1
    return out


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="module")
def first_run(harness, tmp_path_factory):
    from mergelab_flows.study import study_flow

    root = tmp_path_factory.mktemp("study")
    study = write_study(root / "small.yaml", SMALL)
    store = str(root / "store")
    return study, store, study_flow(str(study), store=store)


def test_results_dataset_has_every_method_space_config_task_metric_seed(first_run):
    _, store, run = first_run
    assert computed(run) == {"stage": 1, "reference": 4, "merge": 5, "adapt": 1, "evaluate": 6, "results": 1, "analysis": 2,
                             "adaptation_study": 2}
    ds = xr.open_zarr(Store(store).dataset_url(run["results"]), consolidated=False).load()  # one open_zarr reads it
    assert dict(ds["score"].sizes) == {"merge_method": 3, "space": 3, "config": 4, "task": 4, "metric": 9, "seed": 1}
    entropy = ds["score"].sel(task=["digits", "textures", "signs"], metric="val_entropy").sel(merge_method="task_arithmetic", space="full")
    assert np.all((entropy > 0) | entropy.isnull())
    # paired bootstrap intervals of each selected merge's gain: TA against itself is exactly 0, against zero-shot it
    # brackets the point difference
    ci = ds["gain_ci"].sel(seed=0)
    assert ci.sel(merge_method="task_arithmetic", space="full", versus="task_arithmetic").values.tolist() == [0.0, 0.0]
    table = ds["score"].sel(task=["digits", "textures", "signs"], metric="norm_acc").where(ds["selected"]).max("config").mean("task")
    gain = float(table.sel(merge_method="ties", space="knots", seed=0)) - float((ds["reference_score"].sel(reference="zeroshot", metric="acc")
                                                                                / ds["reference_score"].sel(reference="finetuned", metric="acc"))
                                                                               .sel(task=["digits", "textures", "signs"]).mean())
    low, high = ci.sel(merge_method="ties", space="knots", versus="zeroshot").values
    assert low <= gain <= high and low < high
    hits = ds["selected_hit"].sel(merge_method="ties", space="knots", seed=0)  # what the intervals resample
    assert set(np.unique(hits.values)) <= {0.0, 1.0} and hits.sizes["example"] == ds["reference_hit"].sizes["example"]
    digits = hits.values[hits["example_task"].values == "digits"]
    assert digits.mean() == pytest.approx(float(ds["score"].sel(merge_method="ties", space="knots", task="digits", metric="acc").max()))
    assert set(ds.merge_method.values) == {"task_arithmetic", "ties", "adamerging"}
    acc = ds["score"].sel(task=["digits", "textures", "signs"], metric="acc").load()
    ta = acc.sel(merge_method="task_arithmetic", space="full", config="alpha=0.3")
    assert np.all((ta > 0.05) & (ta <= 1.0))
    hits = ds["score"].sel(task="joint", metric=["hits@1", "hits@3", "hits@5"]).sel(merge_method="task_arithmetic", space="core", config="alpha=0.6")
    assert np.all(np.diff(hits.values.ravel()) >= 0)  # Hits@1 <= Hits@3 <= Hits@5
    experts = ds["reference_score"].sel(reference="finetuned", task="joint", metric=["hits@1", "hits@3", "hits@5"]).values
    assert np.all((0 < experts) & (experts <= 1)) and np.all(np.diff(experts) >= 0)  # each expert on its own images, every label
    assert np.isnan(float(ds["reference_score"].sel(reference="finetuned", task="joint", metric="acc")))
    # exactly one selected configuration per method x space that was run, chosen on val
    selected = ds["selected"].load()
    assert int(selected.sel(merge_method="task_arithmetic").sum()) == 2 and ds.attrs["selection"] == "val"
    chosen = ds["score"].sel(task=["digits", "textures", "signs"], metric="val_norm_acc").mean("task").sel(merge_method="task_arithmetic", space="full")
    picked = int(selected.sel(merge_method="task_arithmetic", space="full").squeeze().argmax("config"))
    assert picked == int(chosen.squeeze().fillna(-1).argmax("config"))
    assert float(ds["merge_seconds"].sel(merge_method="ties", space="knots", config="alpha=1.0,density=0.3").squeeze()) > 0
    assert "micro" in ds.attrs["note"]
    analyses = Store(store).refs()
    assert {"studies/small/results", "studies/small/analysis/norms", "studies/small/analysis/merged_rank", "studies/small/adapt/adamerging"} <= set(analyses)


def test_adaptation_studies_are_published_where_the_notebooks_read_them(first_run):
    from mergelab_figures.data import available, load

    _, store, _ = first_run
    assert {"preferences/pareto", "ablations/adarank", "adapt/adamerging"} <= set(available(store, "small"))
    assert "micro-r4 benchmark" in load(store, "small", "adapt/adamerging").attrs["dataset"]  # figure captions name the bench
    pareto = load(store, "small", "preferences/pareto")
    assert list(pareto.task.values) == ["digits", "textures"] and pareto.sizes["preference"] == 2
    assert pareto.attrs["adaptation_split"] == "val" and "not the papers'" in pareto.attrs["dataset"]
    ablation = load(store, "small", "ablations/adarank")
    assert list(ablation.origin.values) == ["ta"] and list(ablation.task.values) == ["digits", "signs"]


@pytest.mark.parametrize(("studies", "message"), [
    ({"pareto_front": {}}, "unknown adaptation study 'pareto_front'; allowed: pareto, cloud"),
    ({"cloud": {"focal": ["digits"], "n_prefs": 3}}, "cloud: unknown setting 'n_prefs'; allowed: iters"),
    ({"pareto_2": {"study": "paretoo"}}, "pareto_2: study 'paretoo' is not an adaptation study; allowed: pareto"),
    ({"pareto_2": {"study": "pareto", "pairs": []}}, "pareto_2: unknown setting 'pairs'; allowed: iters"),
    ({"pa/reto": {"study": "pareto"}}, "adaptation study label 'pa/reto' must start with a letter or digit"),
])
def test_bad_adaptation_study_settings_are_one_line_errors(studies, message):
    from mergelab.config import load_study
    from mergelab.errors import InputError

    with pytest.raises(InputError, match="adaptation_studies") as err:
        load_study({**SMALL, "adaptation_studies": studies})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_analyze_runs_named_analyses_reusing_the_study_selection(first_run, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import mergelab_flows.study
    from mergelab_app.cli import app

    study, store, run = first_run
    cli = CliRunner()
    done = cli.invoke(app, ["analyze", str(study), "--store", store, "--analysis", "cosine", "--analysis", "merged_rank"],
                      env={"COLUMNS": "200"})
    assert done.exit_code == 0, done.output
    # merged_rank was computed by the run on the same selected merges: a cache hit; cosine is new
    assert "analysis 1/2" in done.stdout and "studies/small/analysis/cosine" in done.stdout
    assert Store(store).ref("studies/small/analysis/merged_rank") == next(r.key for r in run.nodes if r.label == "merged_rank")
    monkeypatch.setattr(mergelab_flows.study, "analyze_flow", None)  # a cached analyze is confirmed without the orchestrator
    again = cli.invoke(app, ["analyze", str(study), "--store", store, "--analysis", "cosine", "--analysis", "merged_rank"],
                       env={"COLUMNS": "200"})
    assert again.exit_code == 0 and "every node was a cache hit" in again.stdout, again.output
    monkeypatch.undo()
    fresh = cli.invoke(app, ["analyze", str(study), "--store", str(tmp_path / "empty"), "--analysis", "merged_rank"])
    assert fresh.exit_code == 2 and "run `mergelab run` on the study first" in fresh.stderr
    assert fresh.stderr.strip().count("\n") == 0
    unknown = cli.invoke(app, ["analyze", str(study), "--analysis", "kappa"])
    assert unknown.exit_code == 2 and "unknown analysis 'kappa'; allowed: norms" in unknown.stderr


def test_a_study_of_analyses_only_has_no_results(harness, tmp_path):
    from mergelab_flows.study import study_flow

    spec = {"name": "only", "bench": SMALL["bench"], "tasks": SMALL["tasks"], "analyses": ["norms"]}
    run = study_flow(str(write_study(tmp_path / "only.yaml", spec)), store=str(tmp_path / "store"))
    assert run["results"] is None and computed(run) == {"stage": 1, "analysis": 1}
    assert "studies/only/analysis/norms" in Store(str(tmp_path / "store")).refs()


def test_analysis_settings_reach_the_analysis_and_key_it_apart(harness, tmp_path):
    from mergelab_flows.study import study_flow

    settings = {"components": 1.0, "layers": [0], "batch_size": 4, "batches": 1}
    spec = {"name": "every-component", "bench": SMALL["bench"], "tasks": SMALL["tasks"], "analyses": ["components"],
            "analysis_settings": {"components": settings}}
    store = Store(str(tmp_path / "store"))
    run = study_flow(str(write_study(tmp_path / "a.yaml", spec)), store=store.url)
    ds = store.get_dataset(store.ref("studies/every-component/analysis/components"))
    # every singular component of every rank-4 update of the first block, not the default top 10 % of every block
    assert ds.attrs["layers"] == [0] and ds.attrs["components"] == 1.0
    assert int(ds.n_components.max()) == 4 and ds.sizes["component"] == 4
    assert {m.split(".")[2] for m in ds.module.values} == {"0"}
    other = study_flow(str(write_study(tmp_path / "b.yaml", {**spec, "name": "other", "analysis_settings": {
        "components": {**settings, "layers": [1]}}})), store=store.url)
    keys = [next(r.key for r in r_.nodes if r.label == "components") for r_ in (run, other)]
    assert keys[0] != keys[1]


def test_rerun_is_all_cache_hits(first_run):
    from mergelab_flows.study import study_flow

    study, store, run = first_run
    again = study_flow(str(study), store=store)
    assert computed(again) == {}
    assert again["results"] == run["results"]


def test_up_to_date_confirms_an_unchanged_study_without_computing(first_run, tmp_path):
    from mergelab.config import load_study
    from mergelab.study import up_to_date

    study, store, run = first_run
    published = [a.key for a in Store(store).ls()]
    nodes, done = up_to_date(load_study(study), store)
    assert done.key == run["results"] and all(n.hit for n in nodes)
    assert sorted((n.node, n.key) for n in nodes) == sorted((n.node, n.key) for n in run.nodes)
    changed = {**SMALL, "methods": [{**SMALL["methods"][0], "grid": {"alpha": [0.3, 0.9]}}, SMALL["methods"][1]]}
    assert up_to_date(load_study(changed), store) is None  # one merge is missing: the flow must run
    assert up_to_date(load_study(SMALL), str(tmp_path / "empty")) is None
    assert [a.key for a in Store(store).ls()] == published and not Store(str(tmp_path / "empty")).ls()


def test_one_changed_hyper_parameter_recomputes_only_its_downstream(first_run, tmp_path):
    from mergelab_flows.study import study_flow

    _, store, _ = first_run
    spec = {**SMALL, "methods": [{**SMALL["methods"][0], "grid": {"alpha": [0.3, 0.6]}},
                                 {**SMALL["methods"][1], "grid": {"density": [0.5], "alpha": [1.0]}}]}
    run = study_flow(str(write_study(tmp_path / "changed.yaml", spec)), store=store)
    # the one new TIES configuration is merged and evaluated; selection and the merged-model analysis follow it
    assert computed(run) == {"merge": 1, "evaluate": 1, "results": 1, "analysis": 1}


def test_changed_adapters_recompute_what_depends_on_them(harness, tmp_path):
    from safetensors.torch import load_file, save_file

    from mergelab_flows.study import study_flow

    root = tmp_path / "micro"
    shutil.copytree(REPO / "data/micro", root, ignore=shutil.ignore_patterns("r16", "dense"))
    spec = {**SMALL, "bench": {**SMALL["bench"], "root": str(root)}, "adaptive": [], "analyses": ["norms"],
            "methods": [SMALL["methods"][0]], "adaptation_studies": {}}
    study = write_study(tmp_path / "s.yaml", spec)
    store = str(tmp_path / "store")
    study_flow(str(study), store=store)
    weights = root / "adapters/r4/digits/adapter_model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if "lora_B" in k)
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, weights)
    run = study_flow(str(study), store=store)
    # everything below the adapters: stage, the digits fine-tuned reference, every merge and evaluation
    assert computed(run) == {"stage": 1, "reference": 1, "merge": 4, "evaluate": 4, "results": 1, "analysis": 1}


def test_dask_runner_gives_the_same_results(first_run, tmp_path):
    from mergelab_flows.runtime import task_runner
    from mergelab_flows.study import study_flow

    study, store, run = first_run
    dask_store = str(tmp_path / "dask")
    other = study_flow.with_options(task_runner=task_runner("dask"))(str(study), store=dask_store)
    assert computed(other)["merge"] == 5
    a = Store(store).get_dataset(run["results"])
    b = Store(dask_store).get_dataset(other["results"])
    xr.testing.assert_allclose(a[["score", "selected"]], b[["score", "selected"]])


def test_serve_registers_the_cron_schedule(first_run):
    from prefect.client.orchestration import get_client
    from typer.testing import CliRunner

    from mergelab_app.cli import app

    study, store, _ = first_run
    done = CliRunner().invoke(app, ["serve", str(study), "--cron", "0 3 * * *", "--store", store, "--register-only"])
    assert done.exit_code == 0, done.output
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("study/small")
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
    assert deployment.parameters == {"study": str(study.resolve()), "store": store}
    bad = CliRunner().invoke(app, ["serve", str(study), "--cron", "every day", "--register-only"])
    assert bad.exit_code == 2 and "not a cron expression" in bad.output


@pytest.mark.notebook
def test_report_executes_the_overview_notebook_against_the_study_store(first_run, tmp_path):
    from typer.testing import CliRunner

    from mergelab_app.cli import app

    _, store, _ = first_run
    out = tmp_path / "reports"
    done = CliRunner().invoke(app, ["report", "--store", store, "--study", "small", "--out", str(out),
                                    "--notebook", str(REPO / "notebooks/00_overview.ipynb")])
    assert done.exit_code == 0, done.output
    assert (out / "00_overview.html").stat().st_size > 10_000
    # accuracy vs merge time named after its paper item, the untagged per-task heatmap fig-01 and gains with their
    # bootstrap intervals fig-02, each as PNG and PDF;
    # the paper tables as HTML, named after their items; the index lists them
    written = sorted(p.name for p in (out / "00_overview").iterdir())
    assert written == ["001-tab10.html", "001-tab3.html", "001-tab9.html", "003-fig1.pdf", "003-fig1.png", "003-tab3.html", "003-tab4.html",
                       "fig-01.pdf", "fig-01.png", "fig-02.pdf", "fig-02.png"]
    assert "font-weight: bold" in (out / "00_overview" / "003-tab3.html").read_text()
    links = set(re.findall(r'href="([^"#]+)"', (out / "index.html").read_text()))
    assert {"00_overview/003-fig1.png", "00_overview/003-fig1.pdf", "00_overview/003-tab3.html"} <= links
    missing = CliRunner().invoke(app, ["report", "--store", store, "--study", "nosuch", "--out", str(out)])
    assert missing.exit_code == 2 and "no study 'nosuch'" in missing.output


def test_tas_selection_picks_the_lowest_mean_tas_without_labels(harness, tmp_path):
    from mergelab_flows.study import study_flow

    spec = {**SMALL, "selection": "tas", "adaptive": [], "analyses": [], "joint": False,
            "methods": [{"method": "task_arithmetic", "spaces": ["full"], "grid": {"alpha": [0.2, 1.0]}}]}
    store = str(tmp_path / "store")
    run = study_flow(str(write_study(tmp_path / "tas.yaml", spec)), store=store)
    ds = Store(store).get_dataset(run["results"])
    tas = ds["score"].sel(task=["digits", "textures", "signs"], metric="tas").mean("task").squeeze()
    assert bool(tas.notnull().all()) and ds.attrs["selection"] == "tas"
    assert int(ds["selected"].squeeze().argmax("config")) == int(tas.argmin("config"))
