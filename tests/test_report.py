"""mergelab_app.report: parameters injected into the tagged cell, HTML + PNG export named after paper items, the
index, parallel runs with progress lines, failures as one-line InputErrors; the `mergelab report` command."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest
import xarray as xr
from helpers import synthetic_results
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output
from typer.testing import CliRunner

from mergelab_app import report, report_export
from mergelab_figures.data import DEFAULT_STORE
from mergelab_app.report_export import INDEX
from mergelab_app.cli import app
from mergelab.errors import InputError
from mergelab.store import Store

pytestmark = pytest.mark.notebook

PNG = base64.b64decode(  # a 1x1 PNG
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")
PDF = b"%PDF-1.4\n"  # the start of one: export copies the bytes it is given


def _write(path: Path, *code: str | tuple[str, list[str]], params: str = 'GREETING = "hello"  # a default\nN = 1') -> Path:
    """A notebook: a markdown cell, the parameters cell, then one code cell per ``code`` (a source, or a source and its tags)."""
    cells = [new_markdown_cell("# tiny"), new_code_cell(params, metadata={"tags": ["parameters"]}),
             *(new_code_cell(c) if isinstance(c, str) else new_code_cell(c[0], metadata={"tags": c[1]}) for c in code)]
    nbformat.write(new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}), path)
    return path


GOOD = ("%matplotlib inline\nfrom matplotlib.figure import Figure\nfrom IPython.display import display\n"
        "import mergelab_figures, mergelab, os\n"
        "print(GREETING * N, os.getcwd(), mergelab_figures.__file__, mergelab.__file__, sep='\\n')\n"
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
    assert Path(analysis_file).resolve().parent == report_export.REPO / "analysis" / "mergelab_figures"
    assert Path(mergelab_file).resolve().parent == report_export.REPO / "lib" / "mergelab"
    assert nb.cells[1].source == 'GREETING = \'hi\'\nN = 3' and nb.metadata["mergelab"]["notebook"] == "tiny"
    assert nbformat.read(path, as_version=4).cells[1].source.startswith('GREETING = "hello"')  # the source file is untouched

    files = report_export.export(nb, tmp_path / "out")
    assert files == [tmp_path / "out" / "tiny.html", tmp_path / "out" / "tiny" / "fig-01.png", tmp_path / "out" / "tiny" / "fig-01.pdf"]
    assert files[1].read_bytes().startswith(b"\x89PNG") and files[2].read_bytes().startswith(b"%PDF")  # the kernel rendered both
    page = files[0].read_text()
    assert "hihihi" in page and "data:image/png;base64" in page and "application/pdf" not in page  # the page shows the PNG
    png_only = report.execute_notebook(path, {}, cwd=workdir, timeout=120, figure_formats=("png",))
    assert [p.name for p in report_export.export(png_only, tmp_path / "png")] == ["tiny.html", "fig-01.png"]
    with pytest.raises(ValueError, match="figure_formats=\\('svg',\\)"):
        report.execute_notebook(path, {}, cwd=workdir, figure_formats=("svg",))


@pytest.mark.parametrize("jobs", [1, 3])
def test_a_failing_notebook_raises_one_line_and_leaves_no_output(tmp_path, jobs):
    # with three kernels at once bad.ipynb fails after worse.ipynb has; the message still follows the notebooks' order
    late = _write(tmp_path / "bad.ipynb", "import time; time.sleep(2)", "raise ValueError('boom\\nsecond line')", "print('never')")
    good = _write(tmp_path / "good.ipynb", "print(GREETING)")
    early = _write(tmp_path / "worse.ipynb", "1 / 0")
    out = tmp_path / "reports"
    lines: list[str] = []
    with pytest.raises(InputError) as info:
        report.report([late, good, early], {"GREETING": "hi"}, out, cwd=tmp_path, timeout=120, jobs=jobs, progress=lines.append)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith("notebook bad.ipynb failed at cell 4 (\"raise ValueError('boom\\\\nsecond line')\"): ValueError: boom second line; "
                              "notebook worse.ipynb failed at cell 3 ('1 / 0'): ZeroDivisionError")
    assert message.endswith(f"(the 1 other notebooks were written to {out})")
    assert sorted(p.name for p in out.iterdir()) == ["good", "good.html", "index.html"]  # nothing for bad, no staging left behind
    assert sorted(re.sub(r"\d+\.\d s", "S s", line.split(" ", 2)[2]) for line in lines) == [
        "bad: failed after S s", "good: done in S s", "worse: failed after S s"]


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


def _figure(mark: int) -> dict[str, str]:
    """An output bundle of one figure as the kernel renders it: PNG and PDF (their last byte ``mark``, to tell them apart)."""
    return {"image/png": base64.b64encode(PNG + bytes([mark])).decode(), "application/pdf": base64.b64encode(PDF + bytes([mark])).decode(),
            "text/plain": "<Figure>"}


def _with_pngs(n: int) -> nbformat.NotebookNode:
    data = {"image/png": base64.b64encode(PNG).decode(), "text/plain": "<Figure>"}
    cell = new_code_cell("figs", outputs=[new_output("display_data", data=data) for _ in range(n)])
    return new_notebook(cells=[cell], metadata={"mergelab": {"notebook": "paper"}})


def test_export_replaces_a_previous_export_as_a_whole(tmp_path):
    first = report_export.export(_with_pngs(3), tmp_path)
    assert [p.name for p in first] == ["paper.html", "fig-01.png", "fig-02.png", "fig-03.png"]
    second = report_export.export(_with_pngs(1), tmp_path)
    assert sorted(p.name for p in (tmp_path / "paper").iterdir()) == ["fig-01.png"] and len(second) == 2
    assert (tmp_path / "paper" / "fig-01.png").read_bytes() == PNG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["paper", "paper.html"]


def _parameters(nb: nbformat.NotebookNode) -> dict:
    """The values the notebook's parameters cell assigns, run on its own."""
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    namespace: dict = {}
    exec(cell.source, namespace)
    return {name: namespace[name] for name in ("STORE", "STUDY")}


def test_the_repository_notebooks_are_listed_in_order_and_take_the_study_from_the_environment(monkeypatch):
    names = [p.name for p in report.list_notebooks()]
    assert names == sorted(names) and {"10_tara_geometry.ipynb", "30_core_space.ipynb"} <= set(names)
    for path in report.list_notebooks():  # every notebook takes the study parameters from a tagged cell
        nb = nbformat.read(path, as_version=4)
        monkeypatch.delenv("MERGELAB_STORE", raising=False)
        monkeypatch.delenv("MERGELAB_STUDY", raising=False)
        assert _parameters(nb) == {"STORE": DEFAULT_STORE, "STUDY": "micro"}, path.name  # the checkout's data/store
        monkeypatch.setenv("MERGELAB_STORE", "memory://lab")  # what `make lab` sets
        monkeypatch.setenv("MERGELAB_STUDY", "other")
        assert _parameters(nb) == {"STORE": "memory://lab", "STUDY": "other"}, path.name
        report._inject(nb, {"STORE": "s3://given", "STUDY": "given"}, path.name)  # the report's values beat the environment
        assert _parameters(nb) == {"STORE": "s3://given", "STUDY": "given"}, path.name


def _cell(*figures: int, tags: tuple[str, ...] = (), table: bool = False, printed: bool = False, plain: bool = False) -> nbformat.NotebookNode:
    """A code cell with ``len(figures)`` figure outputs (PNG + PDF; ``figures`` mark their bytes), a table, a print or a plain-text result."""
    outputs = [new_output("display_data", data=_figure(mark)) for mark in figures]
    outputs += [new_output("display_data", data={"text/html": "<table><tr><td>61.5</td></tr></table>", "text/plain": "table"})] if table else []
    outputs += [new_output("stream", name="stdout", text="analysis/x: not computed in this study\n")] if printed else []
    outputs += [new_output("execute_result", data={"text/plain": "'stch'"}, execution_count=1)] if plain else []
    return new_code_cell("...", outputs=outputs, metadata={"tags": list(tags)})


def _tagged_notebook() -> nbformat.NotebookNode:
    cells = [_cell(1, 2, tags=("paper:001-fig3",)), _cell(3), _cell(tags=("paper:003-tab3", "paper:001-tab1"), table=True),
             _cell(4, tags=("paper:001-fig3",)), _cell(5), _cell(tags=("paper:002-fig1",), printed=True),
             _cell(6, tags=("paper:004-fig5-left", "paper:004-fig12")), _cell(7, tags=("paper:003-tab5",), table=True),
             _cell(tags=("paper:003-tab3",), table=True), _cell(tags=("paper:003-tab7",), plain=True)]
    return new_notebook(cells=cells, metadata={"mergelab": {"notebook": "paper"}})


def test_a_tagged_cell_names_its_figures_and_tables_after_the_paper_item(tmp_path):
    nb = _tagged_notebook()
    files = report_export.export(nb, tmp_path)
    figures = ["001-fig3", "001-fig3-2", "fig-01", "001-fig3-3", "fig-02", "004-fig5-left", "003-tab5"]
    assert [p.name for p in files] == ["paper.html", "001-fig3.png", "001-fig3.pdf", "001-fig3-2.png", "001-fig3-2.pdf", "fig-01.png",
                                       "fig-01.pdf", "003-tab3.html", "001-fig3-3.png", "001-fig3-3.pdf", "fig-02.png", "fig-02.pdf",
                                       "004-fig5-left.png", "004-fig5-left.pdf", "003-tab5.png", "003-tab5.pdf", "003-tab5.html", "003-tab3-2.html"]
    pngs, pdfs = [p for p in files if p.suffix == ".png"], [p for p in files if p.suffix == ".pdf"]
    assert [p.read_bytes() for p in pngs] == [PNG + bytes([mark]) for mark in range(1, 8)]  # each file holds its own output
    assert [p.read_bytes() for p in pdfs] == [PDF + bytes([mark]) for mark in range(1, 8)]  # every figure also as PDF, same stem
    assert [p.stem for p in pngs] == [p.stem for p in pdfs] == figures
    assert sorted(p.name for p in (tmp_path / "paper").iterdir()) == sorted(p.name for p in files[1:])
    table = (tmp_path / "paper" / "003-tab3.html").read_text()  # a page of its own: the table, its item, a link back to its cell
    assert "<td>61.5</td>" in table and "<title>003 Tab. 3 (paper)</title>" in table and "not the papers' numbers" in table
    assert f'href="../paper.html#cell-id={nb.cells[2].id}"' in table
    assert report_export.item_label("004-fig5-left") == "004 Fig. 5 (left)" and report_export.item_label("003-tab10") == "003 Tab. 10"
    for bad in ("paper:fig3", "paper:001-figure3", "paper:001-fig3-Left", "paper:1-tab2"):
        nb = new_notebook(cells=[_cell(1, tags=(bad,))], metadata={"mergelab": {"notebook": "bad"}})
        with pytest.raises(InputError, match=f"bad.ipynb: cell .* has the tag {bad}; name a paper item as paper:<NNN>-fig<N>"):
            report_export.export(nb, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # refused before anything was written


class _Links(HTMLParser):
    """The table rows (cell texts) and every href of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.hrefs: list[str] = []
        self.in_cell = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "tr":
            self.rows.append([])
        elif tag == "td":
            self.rows[-1].append("")
            self.in_cell = True
        self.hrefs += [value for name, value in attrs if tag == "a" and name == "href"]

    def handle_endtag(self, tag: str) -> None:
        self.in_cell = self.in_cell and tag != "td"

    def handle_data(self, data: str) -> None:
        if self.in_cell:
            self.rows[-1][-1] += data


def test_an_item_the_readme_does_not_list_says_so_in_the_index(tmp_path):
    nb = new_notebook(cells=[_cell(7, tags=("paper:000-fig10",))], metadata={"mergelab": {"notebook": "one"}})
    report_export.export(nb, tmp_path)
    index = report_export.write_index(tmp_path, {"one": report_export.cell_outputs(nb, "one.ipynb")}, {}, statuses={"001 Fig. 3": "drawn"})
    assert f"<td><strong>{report_export.UNLISTED}</strong></td>" in index.read_text()
    assert report_export.item_statuses(tmp_path) == {}  # a folder without notebooks/README.md


def test_the_index_lists_each_drawn_item_with_links_to_its_pngs_and_cell(tmp_path):
    nb = _tagged_notebook()
    report_export.export(nb, tmp_path)
    other = new_notebook(cells=[_cell(7, tags=("paper:000-fig10",))], metadata={"mergelab": {"notebook": "other"}})
    report_export.export(other, tmp_path)
    pages = {"paper": report_export.cell_outputs(nb, "paper.ipynb"), "other": report_export.cell_outputs(other, "other.ipynb")}
    index = report_export.write_index(tmp_path, pages, {"STORE": "data/store", "STUDY": "micro"})
    assert index == tmp_path / "index.html"
    parsed = _Links()
    parsed.feed(index.read_text())
    rows = [row for row in parsed.rows if row]
    # sorted by paper and item; a cell under each of its tags; 002 Fig. 1 printed "not computed" and is left out
    assert [row[0] for row in rows] == ["000 Fig. 10", "001 Fig. 3", "001 Fig. 3", "001 Tab. 1", "003 Tab. 3", "003 Tab. 3",
                                        "003 Tab. 5", "003 Tab. 7", "004 Fig. 5 (left)", "004 Fig. 12"]
    assert rows[1][2:] == ["paper", "001-fig3.png, 001-fig3.pdf, 001-fig3-2.png, 001-fig3-2.pdf"]
    assert rows[2][3] == "001-fig3-3.png, 001-fig3-3.pdf"
    assert rows[3][3] == rows[4][3] == "003-tab3.html" and rows[5][3] == "003-tab3-2.html"  # a table cell links its HTML table
    assert rows[6][3] == "003-tab5.png, 003-tab5.pdf, 003-tab5.html"
    assert rows[7][3] == "shown in the notebook page"  # a plain-text result: no file
    assert rows[8][3] == rows[9][3] == "004-fig5-left.png, 004-fig5-left.pdf"
    # each item's status as notebooks/README.md gives it: drawn, or partial and what is missing
    statuses = report_export.item_statuses()
    assert [row[1] for row in rows] == [statuses[row[0]] for row in rows]
    assert rows[1][1] == statuses["001 Fig. 3"] and rows[1][1].startswith("drawn")
    assert rows[7][1] == statuses["003 Tab. 7"] and rows[7][1].startswith("partial: ")
    assert "<strong>partial</strong>: " in index.read_text()
    table_cell = nb.cells[2].id
    assert f"paper.html#cell-id={table_cell}" in parsed.hrefs and f'id="cell-id={table_cell}"' in (tmp_path / "paper.html").read_text()
    assert {"paper/001-fig3-2.png", "paper/001-fig3-2.pdf", "paper/003-tab3.html", "other/000-fig10.pdf", "paper.html", "other.html"} <= set(parsed.hrefs)
    assert all((tmp_path / href.split("#")[0]).is_file() for href in parsed.hrefs)  # every link resolves
    assert "STUDY = &#x27;micro&#x27;" in index.read_text() and "not the papers' numbers" in index.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html", "other", "other.html", "paper", "paper.html"]  # no temporary file left


def test_default_jobs_is_half_the_cores_and_at_most_one_per_notebook(monkeypatch):
    for cores, notebooks, jobs in [(16, 7, 7), (16, 20, 8), (2, 7, 1), (1, 7, 1), (None, 7, 1)]:
        monkeypatch.setattr(report.os, "cpu_count", lambda cores=cores: cores)
        assert report.default_jobs(notebooks) == jobs
    with pytest.raises(InputError, match="jobs=0"):
        report.report(["x.ipynb"], {}, jobs=0)


#: Each notebook logs its start, waits until AT_ONCE notebooks have started (the kernels run at once) and logs its end.
BARRIER = """import pathlib, time
log = pathlib.Path(LOG)
with log.open("a") as f:
    f.write("start {name}\\n")
deadline = time.monotonic() + 60  # a guard: fail instead of hanging when the others never start
while log.read_text().count("start") < AT_ONCE:
    assert time.monotonic() < deadline, "the other notebooks did not run at the same time"
    time.sleep(0.05)
with log.open("a") as f:
    f.write("end {name}\\n")"""


@pytest.mark.parametrize("jobs", [1, 2])
def test_report_runs_jobs_notebooks_at_once_and_prints_a_line_as_each_ends(tmp_path, jobs):
    log = tmp_path / "log.txt"
    paths = [_write(tmp_path / f"n{i}.ipynb", BARRIER.format(name=f"n{i}"), (GOOD, ["paper:001-fig3"]), params='LOG = ""\nAT_ONCE = 1\nN = 1\nGREETING = ""')
             for i in (1, 2, 3)]
    lines: list[str] = []
    files = report.report(paths, {"LOG": str(log), "AT_ONCE": jobs}, tmp_path / "out", cwd=tmp_path, timeout=120, jobs=jobs,
                          progress=lines.append)
    running, most = 0, 0
    for event in log.read_text().split():
        running += {"start": 1, "end": -1}.get(event, 0)
        most = max(most, running)
    assert most == jobs  # exactly `jobs` kernels at once, never more
    assert [re.fullmatch(r"notebook (\d)/3 (n\d): done in \d+\.\d s", line)[1] for line in lines] == ["1", "2", "3"]
    assert sorted(line.split()[2] for line in lines) == ["n1:", "n2:", "n3:"]
    out = tmp_path / "out"
    assert files == [f for n in ("n1", "n2", "n3") for f in (out / f"{n}.html", out / n / "001-fig3.png", out / n / "001-fig3.pdf")] \
        + [out / "index.html"]  # the notebooks' order, the index last
    assert [f"n{i}/001-fig3.png" in files[-1].read_text() for i in (1, 2, 3)] == [True] * 3


def test_the_report_command_prints_plain_progress_lines_and_writes_the_index(tmp_path):
    store = Store(tmp_path / "store")
    key = store.key("test.report", "1", name="results")
    store.put_dataset(key, xr.Dataset({"score": ("task", [0.5])}))
    store.set_ref("studies/tiny/results", key)
    path = _write(tmp_path / "tiny.ipynb", ("print(STORE, STUDY)\n" + GOOD, ["paper:001-fig3"]), params='STORE = "data/store"\nSTUDY = "micro"\nGREETING = "hi"\nN = 1')
    out = tmp_path / "reports"
    result = CliRunner().invoke(app, ["report", "--store", str(tmp_path / "store"), "--study", "tiny", "--out", str(out),
                                      "--notebook", str(path), "--jobs", "2"])
    assert result.exit_code == 0, result.output
    # stderr is no terminal here: one plain line, no spinner, no escape codes
    assert re.search(r"^notebook 1/1 tiny: done in \d+\.\d s$", result.stderr, re.M) and "\x1b" not in result.stderr
    assert f"wrote 1 HTML reports, 1 figures (1 PNG, 1 PDF) and 0 tables under {out}" in result.stdout
    assert str(out / "index.html") in result.stdout
    assert (out / "tiny" / "001-fig3.png").is_file() and "tiny/001-fig3.png" in (out / "index.html").read_text()
    assert f"{(tmp_path / 'store').resolve()} tiny" in (out / "tiny.html").read_text()
    refused = CliRunner().invoke(app, ["report", "--store", str(tmp_path / "store"), "--study", "tiny", "--jobs", "0"])
    assert refused.exit_code == 2 and "--jobs" in refused.output


#: The figures and tables of each paper, by number (parts such as 004 Fig. 5 (left) share their number).
PAPER_ITEMS = {"000": (range(5, 13), range(5, 16)), "001": (range(1, 12), range(1, 11)), "002": (range(1, 7), range(1, 12)),
               "003": (range(1, 7), range(1, 11)), "004": (range(1, 15), range(1, 5))}


def test_the_figure_index_lists_every_paper_item_and_exactly_the_tagged_cells():
    text = (report_export.REPO / "notebooks" / "README.md").read_text()
    rows = [line.strip().strip("|").split(" | ") for line in text.splitlines() if re.match(r"\| 00\d (Fig|Tab)\. \d", line)]
    labels = [row[0].strip() for row in rows]
    assert len(labels) == len(set(labels))
    assert report_export.item_statuses() == {label.strip(): status.strip() for label, _, status, _ in rows}  # what index.html shows
    numbered = {re.sub(r" \(\w+\)$", "", label) for label in labels}
    assert numbered == {f"{paper} {kind} {n}" for paper, (figs, tabs) in PAPER_ITEMS.items()
                        for kind, numbers in (("Fig.", figs), ("Tab.", tabs)) for n in numbers}
    listed = set()
    for label, _, status, where in (map(str.strip, row) for row in rows):
        found = re.fullmatch(r"`(\S+\.ipynb)` `paper:(\S+)`( \(the cell of .+\))?", where)
        assert (found is not None) == status.startswith(("drawn", "partial: ")), label  # drawn items name their cell
        assert status.startswith(("drawn", "partial: ", "missing, feasible on micro", "needs ", "diagram, not data", "formulas, not data")), label
        if found:
            assert report_export.item_label(found[2]) == label
            listed.add((found[1], found[2]))
    tagged = {(path.name, item) for path in report.list_notebooks() for cell in nbformat.read(path, as_version=4).cells
              for item in report_export.paper_items(cell, path.name)}
    assert listed == tagged


def test_the_overview_notebook_writes_its_paper_tables_as_html_and_every_figure_as_png_and_pdf(tmp_path):
    store = Store(tmp_path / "store")
    runs = {("task_arithmetic", "full"): [0.50, 0.60], ("ties", "full"): [0.55, 0.60], ("ties", "core"): [0.65, 0.62],
            ("tsv", "core"): [0.60, 0.70]}
    key = store.key("test.report", "1", name="results")
    store.put_dataset(key, synthetic_results(runs, tasks=("digits", "textures")))
    store.set_ref("studies/synthetic/results", key)
    other = store.key("test.report", "1", name="results-r16")  # a companion study: another adapter rank of the same tasks
    store.put_dataset(other, synthetic_results({("task_arithmetic", "full"): [0.6, 0.6], ("tara_b", "full"): [0.7, 0.6]},
                                               tasks=("digits", "textures")))
    store.set_ref("studies/synthetic-r16/results", other)
    unseen = store.key("test.report", "1", name="results-unseen")  # a study that evaluates a task it does not merge
    three = synthetic_results({run: [*acc, 0.4] for run, acc in runs.items()}, tasks=("digits", "textures", "signs"))
    store.put_dataset(unseen, three.assign_attrs(tasks=["digits", "textures"], unseen=["signs"]))
    store.set_ref("studies/synthetic-unseen/results", unseen)
    out = tmp_path / "reports"
    params = {"STORE": str(tmp_path / "store"), "STUDY": "synthetic", "RANK_STUDIES": {"r = 4": "synthetic", "r = 16": "synthetic-r16"},
              "MIXED_STUDY": "synthetic-r16", "UNSEEN_STUDY": "synthetic-unseen"}
    files = report.report([report_export.REPO / "notebooks" / "00_overview.ipynb"], params, out, cwd=tmp_path, timeout=300)
    assert [f.relative_to(out).as_posix() for f in files if f.parent == out or f.suffix == ".png"] == [
        "00_overview.html", "00_overview/fig-01.png", "00_overview/003-fig1.png", INDEX]
    assert sorted(f.name for f in files if f.parent == out / "00_overview") == sorted(p.name for p in (out / "00_overview").iterdir())
    # each figure (003 Fig. 1, the untagged heatmap) as PNG and PDF; each tagged table as HTML, named after its first item
    assert sorted(p.name for p in (out / "00_overview").iterdir()) == [
        "000-tab13.html", "001-tab10.html", "001-tab3.html", "001-tab4.html", "001-tab9.html", "003-fig1.pdf", "003-fig1.png",
        "003-tab3.html", "003-tab4.html", "003-tab9.html", "fig-01.pdf", "fig-01.png"]
    assert all((out / "00_overview" / f"{stem}.pdf").read_bytes().startswith(b"%PDF") for stem in ("003-fig1", "fig-01"))
    table = (out / "00_overview" / "003-tab3.html").read_text()
    assert "font-weight: bold" in table and "hand-made test numbers" in table and "Avg." in table and "finetuned (absolute)" in table
    index = (out / "index.html").read_text()
    for link in ("00_overview/003-tab3.html", "00_overview/003-fig1.pdf", "00_overview/001-tab3.html", "00_overview/003-tab4.html",
                 "00_overview/001-tab10.html"):
        assert f'href="{link}"' in index
    assert re.findall(r"<tr><td>([^<]+)</td>", index) == ["000 Tab. 7", "000 Tab. 8", "000 Tab. 13", "001 Tab. 1", "001 Tab. 3",
                                                          "001 Tab. 4", "001 Tab. 9", "001 Tab. 10", "003 Fig. 1", "003 Tab. 3", "003 Tab. 4",
                                                          "003 Tab. 7", "003 Tab. 9"]
    ranks = (out / "00_overview" / "000-tab13.html").read_text()
    assert "r = 16" in ranks and "task_arithmetic" in ranks and "tara_b" not in ranks and "font-weight: bold" in ranks
    assert "Avg. unseen" in (out / "00_overview" / "001-tab4.html").read_text()
    assert "TqdmWarning" not in (out / "00_overview.html").read_text()  # a kernel without ipywidgets prints nothing of it
