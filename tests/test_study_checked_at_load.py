"""Every part of a study is checked when it loads, against its task set (issue 30, item 5): settings
of adaptation studies (``pair``, ``focal``, ``n_preferences``, ``preference``, the schedule), adaptive
preferences and ``analysis_settings`` values. ``mergelab run`` refuses each with one ``error:``
line and exit 2 before anything runs (no store is created)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mergelab_app.cli import app

runner = CliRunner()
TASKS = ["digits", "textures", "signs"]
MICRO = Path(__file__).resolve().parents[1] / "data" / "micro"


def _study(**changes):
    return {"name": "s", "tasks": TASKS, "methods": [{"method": "ties", "grid": {"alpha": [1.0]}}], **changes}


def _adaptation(name, **settings):
    return _study(adaptation_studies={name: settings})


def _analysis(name, **settings):
    return _study(analyses=[name], analysis_settings={name: settings})


CASES = [
    (_adaptation("pareto", pair=["digits", "aerial"]), "pareto: pair=['digits', 'aerial'] is invalid",
     "'aerial' is not one of the tasks digits, textures, signs"),
    (_adaptation("pareto", pair="digits"), "pareto: pair='digits' is invalid", "not allowed as a Sequence value"),
    (_adaptation("pareto", pair=TASKS), "pareto: pair=", "name 2 of the tasks"),
    (_adaptation("pareto", pair=["digits", "digits"]), "pareto: pair=", "a task is named twice"),
    (_adaptation("pareto", n_preferences=1), "pareto: n_preferences=1 is invalid", "a number in [2, 1000]"),
    (_adaptation("pareto", n_preferences=True), "pareto: n_preferences=True is invalid", "valid integer"),
    (_adaptation("pareto", splits="val"), "pareto: splits='val' is invalid", "not allowed as a Sequence value"),
    (_adaptation("pareto", splits=["train"]), "pareto: splits=['train'] is invalid", "'val' or 'test'"),
    (_adaptation("cloud", n_preferences=4), "cloud: setting 'focal' is required", "add it"),
    (_adaptation("cloud", focal=["digits"]), "cloud: focal=['digits'] is invalid", "name 2 of the tasks"),
    (_adaptation("cloud", focal=["digits", "textures"], tasks=["digits", "textures"]), "cloud: focal=",
     "it leaves 0 of the 2 tasks, at least 1 must remain"),
    (_adaptation("cloud", focal=["digits", "textures"], focal_weight=0.7), "cloud: focal_weight=0.7 is invalid", "[0, 0.5]"),
    (_adaptation("stch_alpha", preference=[0.5, 0.5]), "stch_alpha: preference=[0.5, 0.5] is invalid",
     "2 entries for 3 tasks (digits, textures, signs)"),
    (_adaptation("stch_alpha", tasks=["digits", "signs"], preference=[0.2, 0.3, 0.5]), "stch_alpha: preference=",
     "3 entries for 2 tasks (digits, signs)"),
    (_adaptation("pareto", methods=["tara_b", "tara_c"]), "pareto: methods=['tara_b', 'tara_c'] is invalid",
     "'tara_c' is not among the adaptive methods: "),
    (_adaptation("stch_alpha", methods="tara_a"), "stch_alpha: methods='tara_a' is invalid", "not allowed as a Sequence value"),
    (_adaptation("adarank_ablation", origins=["ta", "kart"]), "adarank_ablation: origins=['ta', 'kart'] is invalid", "'ta' or 'cart'"),
    (_adaptation("adarank_ablation", space="knots"), "adarank_ablation: space='knots' is invalid", "'full' or 'core'"),
    (_adaptation("adarank_ablation", tasks=["digits", "nope"]), "adarank_ablation: tasks=", "'nope' is not one of the tasks"),
    (_adaptation("adarank_ablation", iters=True), "adarank_ablation: iters=True is invalid", "valid integer"),
    (_adaptation("adarank_ablation", lr=0), "adarank_ablation: lr=0 is invalid", "(0, inf]"),
    # issue 30 probe 552, 554: unbounded, a traceback (numpy out of memory) after the references ran
    (_adaptation("pareto", n_preferences=10**9), "pareto: n_preferences=1000000000 is invalid", "a number in [2, 1000]"),
    (_adaptation("pareto", iters=10**9), "pareto: iters=1000000000 is invalid", "a number in [0, 100000]"),
    (_adaptation("cloud", focal=["digits", "textures"], batch_size=10**9), "cloud: batch_size=1000000000 is invalid", "[1, 65536]"),
    # probe 560-563: checked inside the study function, after the references ran (alpha 0 never finished)
    (_adaptation("stch_alpha", alphas=[]), "stch_alpha: alphas=[] is invalid", "at least 1 item"),
    (_adaptation("stch_alpha", alphas=[0.5, -1.0]), "stch_alpha: alphas=[0.5, -1.0] is invalid", "numbers in (0, inf]"),
    (_adaptation("stch_alpha", alphas=[float("nan")]), "stch_alpha: alphas=[nan] is invalid", "numbers in (0, inf]"),
    (_adaptation("stch_alpha", alphas=[0.0]), "stch_alpha: alphas=[0.0] is invalid", "numbers in (0, inf]"),
    ({**_adaptation("pareto", pair=["digits", "nope"]), "tasks": None, "bench": {"kind": "micro", "root": str(MICRO)}},
     "pareto: pair=['digits', 'nope'] is invalid", "'nope' is not one of the tasks aerial, digits, housenumbers"),  # the bench's own
    (_study(adaptive=[{"method": "tara_a", "preference": [0.5, 0.5]}]), "adaptive tara_a: preference has 2 entries for the 3 merged tasks",
     "give one weight per task"),
    (_analysis("components", layers="0"), "analysis_settings: components: layers='0' is invalid", "list of int or None"),
    (_analysis("lambda_similarity", lambdas="0.3"), "analysis_settings: lambda_similarity: lambdas='0.3' is invalid", "list of float"),
    (_analysis("coverage", energy=True), "analysis_settings: coverage: energy=True is invalid", "expected float"),
    (_analysis("truncation", spaces="core"), "analysis_settings: truncation: spaces='core' is invalid", "list of str"),
    (_analysis("truncation", fractions=[0.5, 1.5]), "analysis_settings: truncation: fractions=[0.5, 1.5] is invalid", "[0, 1]"),
    # a fresh probe (issue 30): settings whose range or names only the analysis knew, accepted at load
    (_analysis("coverage", energy=5.0), "analysis_settings: coverage: energy=5.0 is invalid", "a number in (0, 1]"),
    (_analysis("sar", space="bogus"), "analysis_settings: sar: space='bogus' is invalid", "not among the spaces: full, knots, core"),
    (_analysis("anisotropy", batch_size=0), "analysis_settings: anisotropy: batch_size=0 is invalid", "a number in [1, 65536]"),
    (_analysis("tas_sweep", eval_split="train"), "analysis_settings: tas_sweep: eval_split='train' is invalid", "one of 'val', 'test'"),
    (_analysis("truncation", method="bogus"), "analysis_settings: truncation: method='bogus' is invalid", "not among the merge methods"),
    (_analysis("reference_basis_accuracy", bases=["first_task", "bogus"]), "reference_basis_accuracy: bases=['first_task', 'bogus']",
     "'first_task', 'random_orthonormal', 'concatenation'"),
    (_analysis("reference_bases", seed=-1), "analysis_settings: reference_bases: seed=-1 is invalid", "[0, 9223372036854775807]"),
    # issue 30 probe cases 442-448: found only after the study graph and the model libraries loaded
    (_study(bench={"kind": "micro", "root": "/nonexistent"}), "bench.root /nonexistent holds no micro benchmark",
     "run `mergelab build-micro --out /nonexistent`"),
    (_study(tasks=["bogus", "digits"], bench={"kind": "micro", "root": str(MICRO)}), "'bogus' is not a task of the micro bench",
     "allowed: aerial, digits"),
    # probe 494: refused in the flow, after Prefect started (the test's machine has no CUDA: see below)
    (_study(device="cuda", bench={"kind": "micro", "root": str(MICRO)}), "device 'cuda': torch sees no CUDA device on this machine",
     "set device: cpu"),
]


@pytest.mark.parametrize(("study", "message", "fix"), CASES, ids=[f"{m[:40]} {f[:30]}" for _, m, f in CASES])
def test_a_study_is_checked_whole_before_anything_runs(study, message, fix, tmp_path, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # a machine without CUDA, wherever the suite runs
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    result = runner.invoke(app, ["run", str(tmp_path / "study.yaml"), "--store", str(tmp_path / "store")], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0] and fix in lines[0], result.stderr
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), repr(result.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"], "a refused study wrote something"


def test_a_study_that_fits_its_tasks_loads():
    from mergelab.config import load_study

    spec = load_study(_study(adaptation_studies={"pareto": {"pair": ["digits", "signs"], "n_preferences": 3},
                                                 "cloud": {"focal": ["digits", "signs"], "n_preferences": 3},
                                                 "stch_alpha": {"tasks": ["digits", "signs"], "preference": [0.5, 0.5]}},
                             adaptive=[{"method": "tara_a", "preference": [0.2, 0.3, 0.5]}],
                             analyses=["components", "embedding_interference", "tas_sweep"],
                             analysis_settings={"components": {"layers": [0]}, "embedding_interference": {"method": "tsv+iso_c"},
                                                "tas_sweep": {"lams": [0.1, 0.5], "distances": ["l2"], "eval_split": "val"}}))
    assert spec.task_names() == TASKS  # a composition is a merge method; a split, distances and λ within their rules
