"""README's Reliability section and docs/reliability.md name, for each guarantee, the test that holds it:
every test they cite exists.

A guarantee whose test was renamed or removed would otherwise still read as held. Cited are test files
(``tests/test_x.py``), tests in a file (``tests/test_x.py::test_y``), tests by name (``test_y``) and the
cases of table-driven tests (an id, or its words spaced) and the code that implements a guarantee (any other backticked snake_case
name, found in the tests or in a wing).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "README.md", ROOT / "docs" / "reliability.md")
WINGS = ("lib", "flows", "analysis", "app")

CITED_FILE = re.compile(r"`(tests/[\w/]+\.py)(?:::(\w+))?`")
CITED_NAME = re.compile(r"`(\w*_\w+_\w+)`")  # a snake_case name of three words or more


def _text(folders: tuple[str, ...]) -> str:
    files = (p for folder in folders for p in sorted((ROOT / folder).rglob("*.py")))
    return "\n".join(p.read_text() for p in files if p != Path(__file__).resolve())


def _missing(doc: str) -> list[str]:
    missing = []
    for path, name in CITED_FILE.findall(doc):
        if not (ROOT / path).is_file():
            missing.append(path)
        elif name and not re.search(rf"^(def|class|\w+ =|[A-Z_]+:)\s*{name}\b|^(def|class) {name}\b|^{name}\b",
                                    (ROOT / path).read_text(), re.M):
            missing.append(f"{path}::{name}")
    tests, code = _text(("tests",)), _text(WINGS)
    for name in set(CITED_NAME.findall(CITED_FILE.sub("", doc))):
        if name.startswith("test_"):
            if not re.search(rf"^def {name}\(", tests, re.M):
                missing.append(name)
        elif not any(spelling in tests or spelling in code for spelling in (name, name.replace("_", " "))):
            missing.append(name)
    return sorted(missing)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_test_the_reliability_docs_cite_exists(doc):
    assert _missing(doc.read_text()) == []


@pytest.mark.parametrize("cited", ["`tests/test_nowhere.py`", "`tests/test_store.py::test_nowhere`",
                                   "`test_a_guarantee_nobody_tests`", "`a_case_nobody_wrote`"])
def test_the_check_sees_a_citation_of_nothing(cited):
    assert _missing(f"* **A guarantee** ({cited}).") != []
