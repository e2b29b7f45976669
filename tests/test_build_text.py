"""`mergelab build-text` (issue 28 item 3) on a tiny random BERT and rows packed into a synthetic
Debian package: the build exports rows, adapters the sentence_encoder bench loads, a README and a
manifest; a rerun is a no-op; a fresh store rebuilds from the exported rows without the package.
The parsers of the real sources on hand-written excerpts of their formats. Nothing downloads."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import REPO
from helpers import TEXT_FILLER, TEXT_WORDS, deb_archive, text_sources
from mergelab.errors import InputError
from mergelab.docblocks import REGIME_BLOCK
from mergelab.synthetic import sentence_encoder_directory
from mergelab.textbench.rows import SplitSizes, read_rows, split_rows
from mergelab.textbench.sources import (DebPackage, deb_files, emoji_names, fetch_deb, foldoc_entries, fortune_quotes,
                                        wordnet_glosses)


@pytest.mark.slow
def test_build_exports_rows_and_adapters_the_bench_loads_and_resumes_from_its_rows(tmp_path, one_thread):
    from mergelab.bench import bench_spec, load_bench
    from mergelab.config import load_study
    from mergelab.textbench.build import TextBuildConfig, build_text

    encoder = sentence_encoder_directory(tmp_path / "encoder", [*TEXT_FILLER, "about", "it", "is", ".", *(w for n in TEXT_WORDS.values() for w in n)])
    sources = text_sources(tmp_path / "debs")
    config = TextBuildConfig("test", lora_steps=3, lora_batch=4, sizes=SplitSizes(train=8, val=3, test=4, min_chars=3), ranks=(2, 4),
                             max_length=16)
    out = tmp_path / "text"
    only = build_text(out, tmp_path / "store", model=encoder, profile=config, ranks=[4], sources=sources, debs=tmp_path / "debs")
    assert list(only.manifest["adapters"]) == ["4"] and only.manifest["default_rank"] == 4 and not (out / "adapters" / "r2").exists()
    first = build_text(out, tmp_path / "store", model=encoder, profile=config, sources=sources, debs=tmp_path / "debs")
    assert first.wrote and first.manifest["adapter_keys"]["4"] == only.manifest["adapter_keys"]["4"]  # r4 reused, r2 added
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["tasks"]) == list(TEXT_WORDS) and manifest["adapters"]["2"]["animals"] == "adapters/r2/animals"
    from safetensors import safe_open  # the default set as trained, the others in float16 (data/text within 20 MB)

    assert manifest["adapter_dtypes"] == {"4": "float32", "2": "float16"} and "r2 in float16, r4 in float32" in (out / "README.md").read_text()
    for rank, dtype in (("2", "F16"), ("4", "F32")):
        with safe_open(str(out / "adapters" / f"r{rank}" / "animals" / "adapter_model.safetensors"), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {dtype}
    for task, names in TEXT_WORDS.items():
        rows = read_rows(out / task)
        assert {label for split in rows.values() for _, label in split} == set(names)
        texts = [set(text for text, _ in split) for split in rows.values()]
        assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])  # no row in two splits
        assert manifest["tasks"][task]["classnames"] == sorted(names)
        assert manifest["tasks"][task]["rows"]["train"] == {n: 8 for n in names}
    readme = (out / "README.md").read_text()
    assert "real-weights text benchmark numbers" in readme and "not built yet" not in readme and "CC0-1.0" in (out / "LICENSES.md").read_text()
    assert "\n".join(REGIME_BLOCK) in readme  # new adapters: the study's claims block is empty until the study runs again

    study = {"name": "text", "bench": {"kind": "sentence_encoder", "weights": str(encoder), "max_length": 16}, "seeds": [0],
             "analyses": ["norms"], "tasks": [{"name": t, "adapter": str(out / "adapters" / "r4" / t), "data": str(out / t),
                                                "templates": list(sources[t].templates)} for t in TEXT_WORDS]}
    bench = load_bench(bench_spec(study["bench"]), load_study(study).tasks)
    assert bench.taskset.names == tuple(TEXT_WORDS) and {u.rank for t in bench.taskset for u in t.modules.values()} == {4}
    assert len(bench.taskset.module_names) == 12  # query, key, value, attention.output.dense, intermediate.dense, output.dense × 2 blocks

    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert not build_text(out, tmp_path / "store", model=encoder, profile=config, sources=sources, debs=tmp_path / "debs").wrote
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == files
    (tmp_path / "debs" / "rows_1.0_all.deb").unlink()  # a fresh store rebuilds from the exported rows, without the package
    again = build_text(out, tmp_path / "fresh", model=encoder, profile=config, sources=sources, debs=tmp_path / "debs")
    assert again.manifest["tasks"] == manifest["tasks"] and again.manifest["adapter_keys"] == manifest["adapter_keys"]
    assert again.manifest["metrics"] == manifest["metrics"]  # retrained from the same rows and seeds: the same adapters


def test_data_only_build_says_the_adapters_are_not_built_and_the_cli_refuses_in_one_line(tmp_path):
    from mergelab_app.cli import app
    from mergelab.textbench.build import TextBuildConfig, build_text

    encoder = sentence_encoder_directory(tmp_path / "encoder", [*TEXT_FILLER, "about", "it", "is", ".", *(w for n in TEXT_WORDS.values() for w in n)])
    sources = text_sources(tmp_path / "debs")
    config = TextBuildConfig("test", lora_steps=1, lora_batch=2, sizes=SplitSizes(train=4, val=2, test=2, min_chars=3), max_length=16)
    result = build_text(tmp_path / "text", tmp_path / "store", model=encoder, profile=config, adapters=False, sources=sources,
                        debs=tmp_path / "debs")
    assert result.manifest["adapters"] == {} and not (tmp_path / "text" / "adapters").exists()
    assert "**not built yet.**" in (tmp_path / "text" / "README.md").read_text()
    assert set(result.manifest["metrics"]["linear_probe"]) == set(TEXT_WORDS)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    refused = CliRunner().invoke(app, ["build-text", "--out", str(tmp_path / "other"), "--model", str(encoder), "--store", str(tmp_path / "s")])
    assert refused.exit_code == 2 and "is not a text benchmark folder" in refused.output
    with pytest.raises(InputError, match="unknown text task"):
        build_text(tmp_path / "text", tmp_path / "store", model=encoder, profile=config, tasks=["nope"], sources=sources)
    for ranks in ([], [0], [4, 4], [True]):
        with pytest.raises(InputError, match="give distinct LoRA ranks >= 1"):
            build_text(tmp_path / "text", tmp_path / "store", model=encoder, profile=config, ranks=ranks, sources=sources)


def test_packages_are_read_from_their_pinned_bytes(tmp_path):
    sha = deb_archive(tmp_path / "p_1_all.deb", {"usr/a.txt": b"alpha", "usr/b.txt": b"beta"})
    assert deb_files(tmp_path / "p_1_all.deb", ("usr/b.txt",)) == {"usr/b.txt": b"beta"}
    with pytest.raises(InputError, match="has no"):
        deb_files(tmp_path / "p_1_all.deb", ("usr/c.txt",))
    assert fetch_deb(DebPackage("p", "1", sha, "", ""), tmp_path) == tmp_path / "p_1_all.deb"
    with pytest.raises(InputError, match="the catalogue pins"):
        fetch_deb(DebPackage("p", "1", "0" * 64, "", ""), tmp_path)


def test_parsers_read_each_source_format():
    noun = (b"  1 This software and database is being provided\n"
            b"02084071 05 n 02 dog 0 domestic_dog 0 001 @ 02083346 n 0000 | a member of the genus Canis; "
            b"\"the dog barked all night\"  \n")
    assert wordnet_glosses(noun) == [("a member of the genus Canis", "noun.animal")]
    assert fortune_quotes(b"First one.\n%\nSecond\n  -- someone\n%\n") == ["First one.", "Second\n  -- someone"]
    body = b"Ethernet\n\n   <networking> A {local area network (LAN)} standard.\n\n   More.\n\n   (2003-01-01)\n"
    b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    index = f"Ethernet\tA\t{b64[len(body) // 64]}{b64[len(body) % 64]}\n"
    assert foldoc_entries(body, index) == [("A local area network standard.", "networking")]
    emoji = ("# group: Food & Drink\n1F347 ; fully-qualified # \U0001F347 E0.6 grapes\n"
             "1F44D 1F3FB ; fully-qualified # x E1.0 thumbs up: light skin tone\n263A ; unqualified # x E0.6 smiling face\n").encode()
    assert emoji_names(emoji) == [("grapes", "Food & Drink")]


def test_rows_are_drawn_per_class_split_without_overlap_and_drop_ambiguous_texts():
    rows = [(f"text number {i} of {label}", label) for label in ("x", "y", "z") for i in range(40)] + [("text number 1 of x", "y")]
    splits = split_rows(rows, {"x": "ex", "y": "why"}, SplitSizes(train=10, val=5, test=5), seed=3)
    assert {label for split in splits.values() for _, label in split} == {"ex", "why"}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [20, 10, 10]
    assert all(text != "text number 1 of x" for split in splits.values() for text, _ in split)  # filed under two labels
    assert split_rows(rows, {"x": "ex", "y": "why"}, SplitSizes(train=10, val=5, test=5), seed=3) == splits
    small = split_rows(rows, {"x": "ex"}, SplitSizes(train=60, val=20, test=20), seed=0)
    assert [len(small[s]) for s in ("train", "val", "test")] == [23, 8, 8]  # 39 usable rows keep the 3:1:1 proportions
    with pytest.raises(InputError, match="needs at least 10"):
        split_rows(rows[:5], {"x": "ex"}, SplitSizes(), seed=0)


def test_a_licence_that_must_travel_with_the_copy_is_shipped_whole():
    """FOLDOC's GFDL requires its full text with every copy: the export writes it beside LICENSES.md."""
    from mergelab.textbench.readme import render_licenses
    from mergelab.textbench.sources import LICENCE_TEXTS, SOURCES

    shipped = REPO / "data" / "text"
    needing = {s.package.licence_text for s in SOURCES.values() if s.package.licence_text}
    assert needing == {"GFDL-1.3.txt"}
    for name in needing:
        assert (shipped / name).read_bytes() == LICENCE_TEXTS.joinpath(name).read_bytes()
        assert f"[{name}]({name})" in render_licenses(SOURCES) == (shipped / "LICENSES.md").read_text()
