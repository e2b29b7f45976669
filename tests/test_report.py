"""analysis.report: parameters injected into the tagged cell, HTML + PNG export, failures as one-line InputErrors."""

from __future__ import annotations

import base64
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from analysis import report
from mergelab.errors import InputError

pytestmark = pytest.mark.notebook

PNG = base64.b64decode(  # a 1x1 PNG
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


def _write(path: Path, *code: str, params: str = 'GREETING = "hello"  # a default\nN = 1') -> Path:
    cells = [new_markdown_cell("# tiny"), new_code_cell(params, metadata={"tags": ["parameters"]}),
             *(new_code_cell(c) for c in code)]
    nbformat.write(new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}), path)
    return path


GOOD = ("%matplotlib inline\nfrom matplotlib.figure import Figure\nfrom IPython.display import display\n"
        "import analysis, mergelab, os\n"
        "print(GREETING * N, os.getcwd(), analysis.__file__, mergelab.__file__, sep='\\n')\n"
        "fig = Figure(); fig.subplots().plot(range(N)); display(fig)")


def _stdout(nb) -> list[str]:
    return "".join(o.text for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "stream").split("\n")


def test_parameters_are_injected_and_the_export_has_html_and_pngs(tmp_path):
    path = _write(tmp_path / "tiny.ipynb", GOOD)
    workdir = tmp_path / "work"
    workdir.mkdir()
    nb = report.execute_notebook(path, {"GREETING": "hi", "N": 3}, cwd=workdir, timeout=120)
    greeting, cwd, analysis_file, mergelab_file = _stdout(nb)[:4]
    assert greeting == "hihihi"
    assert Path(cwd) == workdir
    # the kernel imports this checkout's packages, not whichever copy is installed
    assert Path(analysis_file).parent == report.REPO / "analysis"
    assert Path(mergelab_file).parent == report.REPO / "lib" / "mergelab"
    assert nb.cells[1].source == 'GREETING = \'hi\'\nN = 3' and nb.metadata["mergelab"]["notebook"] == "tiny"
    assert nbformat.read(path, as_version=4).cells[1].source.startswith('GREETING = "hello"')  # the source file is untouched

    files = report.export(nb, tmp_path / "out")
    assert files == [tmp_path / "out" / "tiny.html", tmp_path / "out" / "tiny" / "fig-01.png"]
    assert files[1].read_bytes().startswith(b"\x89PNG")
    assert "hihihi" in files[0].read_text() and "data:image/png;base64" in files[0].read_text()


def test_a_failing_notebook_raises_one_line_and_leaves_no_output(tmp_path):
    bad = _write(tmp_path / "bad.ipynb", "x = 1", "raise ValueError('boom\\nsecond line')", "print('never')")
    good = _write(tmp_path / "good.ipynb", "print(GREETING)")
    out = tmp_path / "reports"
    with pytest.raises(InputError) as info:
        report.report([bad, good], {"GREETING": "hi"}, out, cwd=tmp_path, timeout=120)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith("notebook bad.ipynb failed at cell 4 (\"raise ValueError('boom\\\\nsecond line')\"): ValueError: boom second line")
    assert "other notebooks were written" in message
    assert sorted(p.name for p in out.iterdir()) == ["good", "good.html"]  # nothing for bad, no staging left behind


def test_bad_parameters_are_input_errors_before_any_kernel_starts(tmp_path):
    path = _write(tmp_path / "tiny.ipynb", "print(GREETING)")
    with pytest.raises(InputError, match=r"tiny.ipynb has no parameter STOER; its parameters cell sets GREETING, N"):
        report.execute_notebook(path, {"STOER": "x"}, cwd=tmp_path)
    with pytest.raises(InputError, match="not a Python literal"):
        report.execute_notebook(path, {"N": object()}, cwd=tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        report.execute_notebook(tmp_path / "missing.ipynb", {}, cwd=tmp_path)
    with pytest.raises(InputError, match="no notebooks"):
        report.report([], {}, tmp_path)
    untagged = tmp_path / "untagged.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell("N = 1")]), untagged)
    with pytest.raises(InputError, match="no code cell tagged 'parameters'"):
        report.execute_notebook(untagged, {"N": 2}, cwd=tmp_path)


def _with_pngs(n: int) -> nbformat.NotebookNode:
    data = {"image/png": base64.b64encode(PNG).decode(), "text/plain": "<Figure>"}
    cell = new_code_cell("figs", outputs=[new_output("display_data", data=data) for _ in range(n)])
    return new_notebook(cells=[cell], metadata={"mergelab": {"notebook": "paper"}})


def test_export_replaces_a_previous_export_as_a_whole(tmp_path):
    first = report.export(_with_pngs(3), tmp_path)
    assert [p.name for p in first] == ["paper.html", "fig-01.png", "fig-02.png", "fig-03.png"]
    second = report.export(_with_pngs(1), tmp_path)
    assert sorted(p.name for p in (tmp_path / "paper").iterdir()) == ["fig-01.png"] and len(second) == 2
    assert (tmp_path / "paper" / "fig-01.png").read_bytes() == PNG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["paper", "paper.html"]


def test_the_repository_notebooks_are_listed_in_order():
    names = [p.name for p in report.list_notebooks()]
    assert names == sorted(names) and {"10_tara_geometry.ipynb", "30_core_space.ipynb"} <= set(names)
    for path in report.list_notebooks():  # every notebook takes the study parameters from a tagged cell
        cell = next(c for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
        assert 'STORE = "data/store"' in cell.source and 'STUDY = "micro"' in cell.source
