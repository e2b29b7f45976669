"""The paper notebooks (10-40) run against a store of micro-benchmark analyses and draw their figures.

The module fixture publishes every weight-only analysis of the registry on the rank-4 micro
TaskSet, the merged-model ones on its Task Arithmetic merge, and the model-dependent ones
(``anisotropy``, ``components``, ``tas_sweep``, ``embedding_interference``, ``truncation_accuracy``,
``reference_basis_accuracy``; tiny budgets, computed
once per session on the two-task ``micro_pair`` bench) under ``studies/micro`` (as the study flow
does, via :func:`helpers.publish_analyses`) with a hand-made results Dataset
(:func:`helpers.synthetic_results`); a second study ``sparse`` names only the ``norms`` Dataset, so
the notebooks' skip paths run too.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import MICRO_LABEL, publish_analyses, synthetic_results

from mergelab_figures import data
from mergelab_app.report import execute_notebook, report
from mergelab_app.report_export import INDEX, REPO, cell_outputs
from mergelab.experiments.registry import ANALYSES
from mergelab.micro.benchmark import load_micro
from mergelab.merging import merge
from mergelab.store import Store

pytestmark = pytest.mark.notebook

STUDY = "micro"
MIN_FIGURES = {"10_tara_geometry": 11, "20_adarank_spectra": 7, "30_core_space": 8, "40_tas_geometry": 10}
#: Figures of the model-dependent analyses (cells that draw the Dataset of an analysis with ``needs="bench"``) each notebook must draw.
MODEL_FIGURES = {"10_tara_geometry": 6, "20_adarank_spectra": 3, "30_core_space": 1, "40_tas_geometry": 4}
DRAWS_BENCH_ANALYSIS = re.compile(r"_figures\.\w+\((" + "|".join(n for n, a in ANALYSES.items() if a.needs == "bench") + r")\b")
PAPER_NOTEBOOKS = [REPO / "notebooks" / f"{name}.ipynb" for name in MIN_FIGURES]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, micro_pair, bench_datasets) -> Path:
    """A working directory whose ``data/store`` holds the studies ``micro`` and ``sparse``."""
    root = tmp_path_factory.mktemp("papers")
    store = Store(root / "data" / "store")
    taskset = load_micro(REPO / "data" / "micro").taskset(rank=4)
    keys = publish_analyses(store, STUDY, taskset, merged=merge(taskset, "task_arithmetic", "full", alpha=0.3),
                            bench=micro_pair, computed=bench_datasets)
    store.set_ref("studies/sparse/analysis/norms", keys["norms"])
    results = store.key("test.results", "1", study=STUDY)  # 40 draws TAS across methods from the study's results
    store.put_dataset(results, synthetic_results({("task_arithmetic", "full"): [0.5, 0.6], ("ties", "core"): [0.7, 0.6]}))
    store.set_ref(f"studies/{STUDY}/results", results)
    return root


def _outputs(nb, kind: str) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == kind]


@pytest.mark.parametrize("path", PAPER_NOTEBOOKS, ids=lambda p: p.stem)
def test_paper_notebook_draws_its_figures_from_the_study(workdir, path):
    # a relative STORE resolves in the kernel's folder; PNG only (nothing is exported: no PDF to render)
    nb = execute_notebook(path, {"STORE": "data/store", "STUDY": STUDY}, cwd=workdir, figure_formats=("png",))
    pngs = [o for o in _outputs(nb, "display_data") if "image/png" in o.data]
    assert len(pngs) >= MIN_FIGURES[path.stem]
    model_cells = [c for c in nb.cells if c.cell_type == "code" and DRAWS_BENCH_ANALYSIS.search(c.source)]
    model_pngs = [o for c in model_cells for o in c.outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(model_pngs) == MODEL_FIGURES[path.stem]
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    printed = "".join(o.text for o in _outputs(nb, "stream"))
    assert data.NOT_COMPUTED not in printed  # every Dataset the notebooks read was published
    drawn = [cell for cell in cell_outputs(nb, path.name) if cell.items]
    assert drawn and all(cell.shown for cell in drawn)  # every cell tagged with a paper item draws it


def test_the_spectra_notebook_draws_loss_changes_from_the_components_study_when_its_study_has_none(workdir):
    # 002 Figs. 1-2 over every component come from a companion study (studies/papers/002-components.yaml)
    path = REPO / "notebooks" / "20_adarank_spectra.ipynb"
    nb = execute_notebook(path, {"STORE": "data/store", "STUDY": "sparse", "COMPONENTS_STUDY": STUDY}, cwd=workdir,
                          figure_formats=("png",))
    drawn = {item for cell in cell_outputs(nb, path.name) if cell.shown for item in cell.items}
    assert drawn == {"002-fig1", "002-fig2"}  # the sparse study has only norms: every other cell skips


def test_report_on_a_study_with_fewer_analyses_writes_every_notebook(workdir, tmp_path):
    files = report(PAPER_NOTEBOOKS, {"STORE": str(workdir / "data" / "store"), "STUDY": "sparse"}, tmp_path / "reports", cwd=tmp_path)
    htmls = [f for f in files if f.suffix == ".html" and f.parent == tmp_path / "reports"]  # the pages and the index
    assert [f.name for f in htmls] == [f"{name}.html" for name in MIN_FIGURES] + [INDEX]
    assert all(f.is_file() and f.is_relative_to(tmp_path / "reports") for f in files)
    pngs = sorted(f.relative_to(tmp_path / "reports").as_posix() for f in files if f.suffix == ".png")
    assert pngs == ["40_tas_geometry/004-fig13.png", "40_tas_geometry/004-fig5-left.png"]  # only the norms figures can be drawn
    # every figure also as PDF; the norms table (a tagged cell's HTML output) as a page of its own
    written = sorted(p.name for p in (tmp_path / "reports" / "40_tas_geometry").iterdir())
    assert written == ["004-fig13.pdf", "004-fig13.png", "004-fig5-left.pdf", "004-fig5-left.png", "004-tab3.html"]
    assert (tmp_path / "reports" / "40_tas_geometry" / "004-fig13.pdf").read_bytes().startswith(b"%PDF")
    assert "Layer-1" in (tmp_path / "reports" / "40_tas_geometry" / "004-tab3.html").read_text()
    for html in htmls[:-1]:
        assert data.NOT_COMPUTED in html.read_text()
    index = htmls[-1].read_text()  # the norms items, drawn; nothing the study did not compute
    assert ["004 Fig. 5 (left)", "004 Fig. 12", "004 Fig. 13", "004 Tab. 3"] == re.findall(r"<tr><td>([^<]+)</td>", index)
    assert 'href="40_tas_geometry/004-tab3.html"' in index and 'href="40_tas_geometry/004-fig13.pdf"' in index


def test_optional_returns_the_dataset_or_says_it_was_not_computed(workdir, capsys):
    store = workdir / "data" / "store"
    assert data.available(store, "sparse") == ["analysis/norms"]
    assert data.optional(store, "sparse", "analysis/norms").attrs["dataset"] == MICRO_LABEL
    assert data.optional(store, "sparse", "analysis/cosine") is None
    assert capsys.readouterr().out.startswith(f"analysis/cosine: {data.NOT_COMPUTED} (study 'sparse'")
