"""docs/methods.md's tables of methods, spaces and adaptive methods are the registries' rendering
(mergelab.catalog), so they cannot go stale: a new registry entry is a new row."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor

from conftest import REPO
from mergelab import catalog

METHODS_MD = REPO / "docs" / "methods.md"


def test_the_committed_tables_are_the_registries_rendering():
    text = METHODS_MD.read_text()
    assert set(re.findall(r"<!-- catalog:(\w+):begin", text)) == set(catalog.TABLES)
    assert catalog.render(text) == text, "docs/methods.md is stale: run `PYTHONPATH=lib python -m mergelab.catalog docs/methods.md`"


def test_every_registered_name_has_a_row():
    from mergelab.adaptation import ADAPTERS
    from mergelab.merging import METHODS
    from mergelab.spaces import SPACES

    for table, registry in ((catalog.method_table(), METHODS), (catalog.space_table(), SPACES), (catalog.adaptive_table(), ADAPTERS)):
        assert re.findall(r"^\| `([^`]+)` \|", table, re.M) == list(registry)


def toy_halved(deltas: Sequence[Tensor], *, alpha: float = 0.5) -> Tensor:
    """Halved sum (a toy; Nobody et al., 2099, Eq. 1): ``alpha · Σ_t τ_t``."""
    return alpha * torch.stack(list(deltas)).sum(dim=0)


def test_a_new_entry_is_a_new_row_with_its_citation():
    from mergelab.merging import METHODS, MergeMethod

    METHODS.register("toy_halved", MergeMethod(toy_halved, grid={"alpha": (0.25, 0.5)}, inputs="tensors", nonmatrix="self"))
    try:
        row = catalog.method_table().splitlines()[-1]
    finally:
        del METHODS["toy_halved"]
    assert row == "| `toy_halved` | Halved sum (a toy; Nobody et al., 2099, Eq. 1) | `alpha=0.5` | `alpha`: 0.25, 0.5 | tensors | — |"


def test_a_citation_is_the_docstring_title_outside_parentheses():
    assert catalog.citation("TIES (Yadav et al., 2023; 001 Sec. 4 (iii)): trim, elect.") == "TIES (Yadav et al., 2023; 001 Sec. 4 (iii))"
    assert catalog.citation('NormAvg (004: "A: B", Sec. 4.3): rescale.') == 'NormAvg (004: "A: B", Sec. 4.3)'
    assert catalog.citation("AdaRank (002 Eq. 5, App. A). ``origin``: x.") == "AdaRank (002 Eq. 5, App. A)"
    assert catalog.citation("Full space: the dense ``B A``.\n\nMore.", ends=".") == "Full space: the dense `B A`"


def test_the_hand_written_departures_name_only_registered_methods():
    from mergelab.adaptation import ADAPTERS
    from mergelab.merging import METHODS

    section = METHODS_MD.read_text().split("## Defaults in the papers' words, and departures", 1)[1]
    named = [n for line in section.splitlines() if line.startswith("| `") for n in re.findall(r"`([^`]+)`", line.split(" | ")[0])]
    assert named and [n for n in named if n not in METHODS and n not in ADAPTERS] == []
