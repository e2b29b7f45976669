"""Generated Markdown blocks (mergelab.docblocks): a tool rewrites only what lies between the markers."""

from __future__ import annotations

import pytest

from conftest import REPO
from mergelab.docblocks import REGIME_BLOCK, replace_block
from mergelab.errors import InputError


def test_a_block_is_replaced_between_its_markers_and_the_text_around_it_is_kept():
    begin, end = REGIME_BLOCK
    text = f"intro\n{begin}\nold table\n{end}\noutro, {end} again\n"
    assert replace_block(text, REGIME_BLOCK, "new table") == f"intro\n{begin}\nnew table\n{end}\noutro, {end} again\n"
    assert replace_block(replace_block(text, REGIME_BLOCK, "a"), REGIME_BLOCK, "b") == replace_block(text, REGIME_BLOCK, "b")


@pytest.mark.parametrize("text", ["no markers", REGIME_BLOCK[0], f"{REGIME_BLOCK[1]}\n{REGIME_BLOCK[0]}"])
def test_a_file_without_a_whole_block_is_refused(text):
    with pytest.raises(InputError, match="add both markers"):
        replace_block(text, REGIME_BLOCK, "table")


@pytest.mark.parametrize("doc", ["docs/demo.md", "data/text/README.md"])
def test_the_claims_tables_are_generated_blocks(doc):
    text = (REPO / doc).read_text()
    assert replace_block(text, REGIME_BLOCK, "x").count(REGIME_BLOCK[0]) == 1


def test_the_text_benchmark_ships_its_studys_claims_table():
    text = (REPO / "data/text/README.md").read_text()
    body = text.split(REGIME_BLOCK[0])[1].split(REGIME_BLOCK[1])[0]
    assert "| finding (test split, selected on val) | papers | text | 95 % CI | reproduced |" in body
    assert "of 14 hold (text-r4 benchmark numbers" in body
