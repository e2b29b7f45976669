"""``bench.kind: text`` (issue 28 item 4): the shipped real-weights text benchmark read from its
manifest — tasks, label prompts, adapter sets, the encoder the adapters were trained on — here on a
tiny build (a random BERT, two synthetic tasks) so that nothing downloads."""

from __future__ import annotations

import json

import pytest

from helpers import TEXT_FILLER, TEXT_WORDS, text_sources
from mergelab.bench import bench_spec, load_bench
from mergelab.config import load_study
from mergelab.errors import InputError
from mergelab.synthetic import sentence_encoder_directory

ENCODER_WORDS = [*TEXT_FILLER, "about", "it", "is", ".", *(w for names in TEXT_WORDS.values() for w in names)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A text benchmark with r2 and r4 adapter sets (r4 the default), and the encoder it was built on."""
    from mergelab.textbench.build import TextBuildConfig, build_text
    from mergelab.textbench.rows import SplitSizes

    root = tmp_path_factory.mktemp("text")
    encoder = sentence_encoder_directory(root / "encoder", ENCODER_WORDS)
    config = TextBuildConfig("test", lora_steps=2, lora_batch=4, sizes=SplitSizes(train=6, val=3, test=3, min_chars=3), ranks=(2, 4),
                             max_length=16)
    build_text(root / "text", root / "store", model=encoder, profile=config, sources=text_sources(root / "debs"), debs=root / "debs")
    return root / "text", encoder


def _load(bench: dict, tasks=None):
    study = {"name": "text", "bench": {"kind": "text", **bench}, "seeds": [0], "analyses": ["norms"], **({"tasks": tasks} if tasks else {})}
    return load_bench(bench_spec(study["bench"]), load_study(study).tasks)


def test_the_manifest_gives_the_tasks_their_prompts_and_the_default_adapter_set(built):
    out, encoder = built
    manifest = json.loads((out / "manifest.json").read_text())
    bench = _load({"root": str(out), "weights": str(encoder)})
    assert bench.name == "text-r4" and bench.taskset.names == tuple(TEXT_WORDS)
    assert {u.rank for t in bench.taskset for u in t.modules.values()} == {4}
    for name, task in bench.tasks.items():
        assert list(task.templates) == manifest["tasks"][name]["templates"] == ["about {}.", "it is {}."]
        assert list(task.classnames) == manifest["tasks"][name]["classnames"]
    assert bench.model_id["max_length"] == 16 and bench.model_id["weights"] == manifest["model"]["digest"]
    low = _load({"root": str(out), "weights": str(encoder), "rank": 2}, tasks=["animals"])
    assert low.name == "text-r2" and low.taskset.names == ("animals",) and {u.rank for t in low.taskset for u in t.modules.values()} == {2}
    # the same task on the same encoder: the same evaluation key as in the whole bench
    assert low.task_ids["animals"] == bench.task_ids["animals"]


def test_a_study_without_tasks_merges_every_task_of_the_manifest(built):
    from mergelab.config import StudySpec

    out, encoder = built
    study = StudySpec.model_validate({"name": "t", "bench": {"kind": "text", "root": str(out), "weights": str(encoder)}, "analyses": ["norms"]})
    assert study.task_names(own_bench=True) == list(TEXT_WORDS)


@pytest.mark.parametrize(("change", "tasks", "message"), [
    ({"rank": 8}, None, "bench.rank: no 8 adapter set in"),
    ({}, ["weather", "sports"], "tasks: 'sports' is not a task of"),
    ({"root": "EMPTY"}, None, "holds no built text benchmark (manifest.json); run `mergelab build-text --out"),
    ({"weights": "OTHER"}, None, "is not the encoder"),
])
def test_bad_settings_are_one_line_errors(built, tmp_path, change, tasks, message):
    out, encoder = built
    other = sentence_encoder_directory(tmp_path / "other", [*ENCODER_WORDS, "extra"]) if change.get("weights") == "OTHER" else encoder
    root = tmp_path if change.get("root") == "EMPTY" else out
    with pytest.raises(InputError) as err:
        _load({**change, "root": str(root), "weights": str(other)}, tasks=tasks)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_study_without_the_built_benchmark_is_refused_before_a_model_library_loads(built, tmp_path):
    """``mergelab run``'s check of the bench files (BenchSpec.preflight): the rows-only data/text of a fresh
    clone has no adapter set, an empty root no manifest."""
    from mergelab.config import StudySpec

    out, _ = built
    study = lambda **bench: StudySpec.model_validate({"name": "t", "bench": {"kind": "text", **bench}, "analyses": ["norms"]})  # noqa: E731
    study(root=str(out)).check_bench_files()
    for bench, message in (({"root": str(out), "rank": 8}, "no 8 adapter set"), ({"root": str(tmp_path)}, "holds no built text benchmark")):
        with pytest.raises(InputError, match=message):
            study(**bench).check_bench_files()
