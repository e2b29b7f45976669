"""Notebooks 50 (TARA preferences) and 60 (AdaRank masks) run against a tiny study store and draw their figures."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from mergelab.store import Store

pytestmark = pytest.mark.notebook

REPO = Path(__file__).resolve().parents[1]
STUDY = "micro"
#: A study that ran adaptive methods but no preference study (studies/text.yaml)
ADAPTIVE_ONLY = "adaptive-only"
#: notebook -> how many figures (image/png outputs) it must draw from the full tiny store
FIGURES = {"50_tara_preferences": 5, "60_adarank_masks": 7}


@pytest.fixture(scope="module")
def study_store(adaptation_studies, tmp_path_factory) -> Path:
    """A store on disk (the kernel is another process) publishing every study Dataset under ``studies/micro``."""
    root = tmp_path_factory.mktemp("adaptation-store") / "store"
    store = Store(root)
    for name, ds in adaptation_studies.items():
        key = store.key("test.adaptation_studies", "1", name=name)
        store.put_dataset(key, ds)
        store.set_ref(f"studies/{STUDY}/{name}", key)
        if name in ("preferences/pareto", "preferences/cloud"):  # a labelled second run (another pair): 001 Figs. 10-11
            store.set_ref(f"studies/{STUDY}/{name}/second_pair", key)
        if name.startswith("adapt/"):
            store.set_ref(f"studies/{ADAPTIVE_ONLY}/{name}", key)
    return root


def _execute(path: Path, params: dict[str, str]) -> nbformat.NotebookNode:
    """Run every cell on the python3 kernel in the repository root, the parameters cell replaced."""
    nb = nbformat.read(path, as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    cell.source = "\n".join(f"{name} = {value!r}" for name, value in params.items())
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "lib"), str(REPO / "analysis"), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("MPLBACKEND", None)  # the inline backend renders figures as image/png
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute(env=env)
    return nb


def _outputs(nb: nbformat.NotebookNode, kind: str) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == kind]


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_draws_its_figures_from_the_study(study_store, name):
    path = REPO / "notebooks" / f"{name}.ipynb"
    first_code = next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    assert first_code.metadata["tags"] == ["parameters"] and "STORE = os.environ.get(\"MERGELAB_STORE\", DEFAULT_STORE)" in first_code.source
    nb = _execute(path, {"STORE": str(study_store), "STUDY": STUDY, "PAIRS_STUDY": STUDY})
    pngs = [o for o in _outputs(nb, "display_data") if "image/png" in o.data]
    assert len(pngs) >= FIGURES[name]
    assert not _outputs(nb, "error")
    assert "not computed" not in "".join(o.get("text", "") for o in _outputs(nb, "stream"))
    assert "not the papers' numbers" in nb.cells[0].source
    paper_cells = [c for c in nb.cells if any(t.startswith("paper:") for t in c.metadata.get("tags", []))]
    assert paper_cells and all(_shown(c) for c in paper_cells)  # every cell tagged with a paper item draws it
    if name == "60_adarank_masks":  # 002 Tab. 4 with each origin's best in bold (mergelab_figures.tables.bold_best)
        (ablation,) = [c for c in paper_cells if "paper:002-tab4" in c.metadata["tags"]]
        assert "font-weight: bold" in "".join(o.data.get("text/html", "") for o in ablation.outputs if "data" in o)


def _shown(cell: nbformat.NotebookNode) -> bool:
    return any(o.output_type in ("display_data", "execute_result") for o in cell.outputs)


def test_the_preferences_notebook_says_what_a_study_without_preference_studies_did_not_compute(study_store):
    """A study with adaptive runs and no ``adaptation_studies:`` (the text study) runs notebook 50 to the
    end: each preference figure says it was not computed instead of stopping the notebook."""
    nb = _execute(REPO / "notebooks" / "50_tara_preferences.ipynb", {"STORE": str(study_store), "STUDY": ADAPTIVE_ONLY,
                                                                      "PAIRS_STUDY": ADAPTIVE_ONLY})
    assert not _outputs(nb, "error")
    printed = "".join(o.get("text", "") for o in _outputs(nb, "stream"))
    for name in ("preferences/pareto", "preferences/cloud", "preferences/stch_alpha"):
        assert f"{name}: not computed in this study" in printed
