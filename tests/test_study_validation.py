"""A study is validated whole when it is loaded: every bad section is one line naming the field, the
value and the fix, before any node runs (and ``mergelab run`` exits 2 with that line)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from mergelab.config import load_study
from mergelab.errors import InputError

REPO_STUDY = {"name": "s", "methods": [{"method": "ties", "grid": {"alpha": [1.0]}}]}


def _with(**changes):
    return {**REPO_STUDY, **changes}


def _adaptive(**entry):
    return _with(adaptive=[{"method": "adamerging", **entry}])


CASES = [
    (_with(name=".."), "study name '..' must start with a letter or digit"),
    (_with(name="a/b"), "study name 'a/b'"),
    (_with(name=""), "study name ''"),
    (_with(seeds=[]), "seeds is empty"),
    (_with(methods=[{"method": "tiez"}]), "unknown merge method 'tiez'"),
    (_with(methods=[{"method": "ties", "spaces": ["fool"]}]), "unknown space 'fool'"),
    (_with(methods=[{"method": "ties", "grid": {"alpha": []}}]), "grid 'alpha' lists no value"),
    (_with(methods=[{"method": "ties"}]), "ties: its registry grid (used when grid: is left out) has 99 configurations"),
    (_with(methods=[{"method": "ties", "grid": {"alpha": list(range(1, 10)), "density": list(range(1, 9))}}]),
     "ties: the grid has 72 configurations (9 alpha x 8 density; at most 64)"),
    (_with(methods=[{"method": "ties", "grid": {"alpha": [1.0]}, "fixed": {"alpha": 2.0}}]), "'alpha' is both fixed and swept"),
    (_with(methods=[{"method": "ties", "grid": {"densty": [0.2]}}]), "has no option 'densty'"),
    (_with(methods=[{"method": "ties", "grid": {"density": [0.0]}}]), "density=0.0 is invalid"),
    (_with(methods=[{"method": "ties+consensus"}]), "'consensus' leaves a single merged matrix unchanged"),
    (_adaptive(iters=0), "iters=0 must be at least 1"),
    (_adaptive(iters=-5), "iters=-5 must be at least 1"),
    (_adaptive(lr=-1.0), "lr=-1.0 must be a positive number"),
    (_adaptive(lr=float("nan")), "lr=nan must be a positive number"),
    (_adaptive(batch_size=0), "batch_size=0 must be at least 1"),
    (_adaptive(label="../escape"), "adaptive label '../escape'"),
    (_adaptive(hp={"init": "x"}), "init='x' is invalid; expected float in [-1000, 1000] or None"),
    (_adaptive(hp={"init": 1e308}), "init=1e+308 is invalid; expected float in [-1000, 1000]"),  # issue 30 probe 392: float32 overflow, late
    (_adaptive(hp={"clamp": [1.0, 0.0]}), "clamp=[1.0, 0.0] is invalid; expected [low, high]"),  # probe 391
    (_adaptive(batch_size=10**12), "batch_size=1000000000000 must be at least 1 and at most 65536"),  # probe 362
    (_adaptive(method="tara_a", alpha=0.0), "alpha=0.0 (the STCH smoothing"),  # probe 363
    (_adaptive(method="adarank", hp={"rank_ratio": 0.0}), "rank_ratio=0.0 is invalid; expected float in (0, 1]"),  # probes 396/397
    (_adaptive(method="tara_b", hp={"rank": 0}), "rank=0 is invalid; expected int in [1, inf]"),  # probes 403/404: a traceback after the references
    (_adaptive(method="adarank", hp={"temperature": 0.0}), "temperature=0.0 is invalid; expected float in (0, inf]"),  # 398/399: late
    (_adaptive(hp={"granularity": "block"}), "granularity='block' is invalid; expected one of 'task', 'layer'"),
    (_adaptive(optimizer="sgd"), "optimizer"),
    (_with(adaptive=[{"method": "adarank", "hp": {"orign": "cart"}}]), "adarank has no setting 'orign'"),
    (_with(adaptive=[{"method": "adarank", "hp": {"origin": "bogus"}}]), "origin='bogus' is invalid"),
    (_with(adaptive=[{"method": "adarank", "hp": {"origin": "cart"}, "start_grid": {"lam": []}}]), "start_grid 'lam' lists no value"),
    (_with(adaptive=[{"method": "adarank", "start_grid": {"lamda": [0.5]}}]), "adarank has no setting 'lamda'"),
    (_with(adaptive=[{"method": "tara_b", "hp": {"space": "knots"}}]), "space='knots' is invalid; expected one of 'full', 'core'"),
    (_with(adaptive=[{"method": "adamerging"}, {"method": "adamerging"}]), "distinct labels"),
    (_with(adaptive=[{"method": "adamerging", "objective": "labels"}]), "set allow_labels: true"),
    (_with(adaptive=[{"method": "nope"}]), "unknown adaptive method 'nope'"),
    (_with(analyses=["nope"]), "unknown analysis 'nope'"),
    (_with(analyses=["norms"], analysis_settings={"components": {"layers": [0]}}), "'components' is not in analyses:"),
    (_with(analyses=["components"], analysis_settings={"components": {"layer": [0]}}),
     "components has no setting 'layer'; allowed: lam, components, layers"),
    (_with(analyses=["merged_rank"], analysis_settings={"merged_rank": {"merged": []}}),
     "merged_rank has no setting 'merged'; allowed: rtol, split_packed"),  # the inputs are the study's, not settings
    # issue 30 probe 540-543, 546: ranges an analysis setting declares, checked at load, not after stage and references
    (_with(analyses=["components"], analysis_settings={"components": {"layers": [0, -1]}}),
     "layers=[0, -1] is invalid; expected"),
    (_with(analyses=["components"], analysis_settings={"components": {"components": 5.0}}), "components=5.0 is invalid; expected"),
    (_with(analyses=["components"], analysis_settings={"components": {"components": 0.0}}), "(a number in (0, 1])"),
    (_with(analyses=["truncation_accuracy"], analysis_settings={"truncation_accuracy": {"fractions": [0.5, 1.5]}}),
     "fractions=[0.5, 1.5] is invalid; expected"),
    (_with(selection="best"), "selection"),
    (_with(colour="blue"), "unknown field"),
    (_with(dtype="int8"), "dtype 'int8' is not supported; choose one of float32, bfloat16, float16"),
    (_with(device="meta"), "device: device 'meta': mergelab runs encoders on cpu or cuda"),  # issue 30 probe 496: in the flow
    (_with(device="cuda:-1"), "device: device 'cuda:-1' is not a torch device; use cpu, cuda or cuda:N"),
    (_with(tasks=[{"name": "digits", "adapter": "/elsewhere/digits"}]),  # probe 570: "TaskSource(...) is not a micro task", late
     "tasks: the micro bench brings its own tasks and their adapters; name them (tasks: [digits, ...])"),
    (_with(tasks=["digits"], unseen=[{"name": "signs", "checkpoint": "/elsewhere/signs"}]), "unseen: the micro bench brings its own tasks"),
    (_with(bench={"kind": "hf_seq_cls"}, joint=True), "no joint label space"),
    (_with(methods=[{"method": "ties", "grid": {"alpha": [0.5]}}, {"method": "ties", "spaces": ["core", "full"], "grid": {"alpha": [0.8]}}]),
     "methods[1]: ties in the full space is also methods[0]"),  # issue 30 probe 476: accepted, rows of both in one selection
    (_with(seeds=[0, 1, 0]), "seeds lists 0 twice"),  # issue 30 probe 486: accepted
    (_with(allow_labels="yes"), "allow_labels: Input should be a valid boolean"),  # probe 534: read as true
    (_with(analyses=["norms", "norms"]), "analyses lists 'norms' twice"),  # probe 537: accepted
    (_adaptive(method="tara_a", preference=[1.5, -0.5]), "preference [1.5, -0.5] must be finite and non-negative"),  # 514: after stage
    (_adaptive(method="tara_a", preference=[0.5, float("nan")]), "must be finite and non-negative"),  # 515
    (_adaptive(method="tara_a", preference=[1.0, 1.0]), "sums to 2, not 1"),
    (_with(adaptive=[{"method": "adamerging"}], adaptive_init=float("inf")), "adaptive_init=inf must be a starting merge coefficient"),
]


@pytest.mark.parametrize(("study", "message"), CASES, ids=[m[:40] for _, m in CASES])
def test_a_bad_study_is_one_line_naming_the_problem(study, message):
    with pytest.raises(InputError) as err:
        load_study(study)
    text = str(err.value)
    assert message in text and "\n" not in text


def test_a_repeated_yaml_key_is_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("name: s\nmethods:\n  - method: ties\n    grid: {alpha: [1.0]}\nname: t\n")
    with pytest.raises(InputError, match=r"duplicate key 'name' \(line 5\); keep one of them"):
        load_study(path)


def test_a_yaml_merge_key_is_read_as_yaml_defines_it(tmp_path):
    """``<<: *anchor`` brings an anchor's keys in, and the mapping's own keys override them (issue 30 probe:
    it was refused as an unknown tag)."""
    path = tmp_path / "merge.yaml"
    path.write_text("name: s\nmethods:\n  - &ties {method: ties, spaces: [full], grid: {alpha: [1.0]}}\n"
                    "  - <<: *ties\n    spaces: [core]\n")
    spec = load_study(path)
    assert [(m.method, m.spaces) for m in spec.methods] == [("ties", ["full"]), ("ties", ["core"])]


@pytest.mark.parametrize(("text", "message"), [
    ("name: s\nx: !!python/object:os.system {}\n", "a study holds plain mappings, lists and scalars"),
    ("# " + "x" * (1 << 20) + "\nname: s\n", "more than a study's 1048576"),
], ids=["python-tag", "a-megabyte-of-comments"])
def test_what_a_study_file_cannot_be(text, message, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=re.escape(message)):
        load_study(path)
    with pytest.raises(InputError, match="is not a regular file"):
        load_study(tmp_path)


def test_mergelab_run_exits_2_on_a_bad_adaptive_setting_before_running_anything(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_with(adaptive=[{"method": "adarank", "hp": {"origin": "bogus"}}])))
    done = subprocess.run([sys.executable, "-m", "mergelab_app.cli", "run", str(path), "--store", str(tmp_path / "store")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "origin='bogus'" in done.stderr
    assert not (tmp_path / "store").exists()  # nothing was written


def test_a_relative_store_is_relative_to_the_study_file(tmp_path, monkeypatch):
    (tmp_path / "studies").mkdir()
    path = tmp_path / "studies" / "s.yaml"
    path.write_text(yaml.safe_dump({**REPO_STUDY, "store": "../runs/store"}))
    monkeypatch.chdir("/")
    monkeypatch.delenv("MERGELAB_STORE", raising=False)
    assert load_study(path).store_url() == str(tmp_path / "studies" / "../runs/store")
    path.write_text(yaml.safe_dump({**REPO_STUDY, "store": "memory://shared"}))
    assert load_study(path).store_url() == "memory://shared"


def test_the_default_store_is_never_under_the_working_directory(tmp_path, monkeypatch):
    """--store, then $MERGELAB_STORE, then the study's store:, then store/ next to the study file;
    commands without a study use the user's cache."""
    from mergelab.store import default_store_url

    path = tmp_path / "studies" / "s.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(REPO_STUDY))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MERGELAB_STORE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert load_study(path).store_url() == str(tmp_path / "studies" / "store")
    assert load_study("studies/s.yaml").store_url() == str(tmp_path / "studies" / "store")
    assert default_store_url() == str(tmp_path / "cache" / "mergelab" / "store")
    path.write_text(yaml.safe_dump({**REPO_STUDY, "store": "memory://declared"}))
    assert load_study(path).store_url() == "memory://declared"
    monkeypatch.setenv("MERGELAB_STORE", "memory://env")
    assert load_study(path).store_url() == "memory://env" and default_store_url() == "memory://env"
    assert load_study(path).store_url("memory://flag") == "memory://flag"


def test_the_shipped_studies_load_and_share_the_demo_store():
    """studies/micro.yaml, its companions (studies/papers/*.yaml) and the text study: valid, distinct names, one store."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "studies"
    specs = [load_study(p) for p in [root / "micro.yaml", *sorted((root / "papers").glob("*.yaml")), root / "text.yaml"]]
    assert len(specs) >= 3 and len({s.name for s in specs}) == len(specs)
    assert {Path(s.store_url()).resolve() for s in specs} == {(root.parent / "data" / "store").resolve()}
    assert {str(s.bench.rank) for s in specs} == {"None", "16", "mixed"}  # the demo's default set, then the other two
