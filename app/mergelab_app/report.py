"""The notebook runner behind ``mergelab report``: parameters in, executed notebooks out as HTML, PNG + PDF and tables.

A notebook takes its parameters from its code cell tagged ``parameters`` (papermill's
convention): :func:`execute_notebook` rewrites the assignments of that cell with the values
given, runs every cell with nbclient on the ``python3`` kernel, in ``cwd``, with this checkout's
``lib/`` and ``analysis/`` first on the kernel's ``PYTHONPATH`` (so the kernel imports the same
``mergelab_figures`` and ``mergelab`` as the caller), and returns the executed notebook.

Every figure is written as PNG and PDF. The kernel's inline backend renders each figure a cell
displays in every format of :data:`FIGURE_FORMATS` (IPython's ``InlineBackend.figure_formats``,
set on the kernel's command line): one output carries the figure as ``image/png`` and
``application/pdf``, both drawn from the same :class:`~mergelab_figures.style.PaperFigure` (so tidied
alike), the PDF as vectors. No notebook cell saves a file; the notebook page shows the PNG.

Files are named after the paper item they redraw. A code cell tagged ``paper:<item>``, where
``<item>`` is ``<paper>-fig<N>`` or ``<paper>-tab<N>`` with an optional ``-<part>``
(``paper:001-fig3``, ``paper:003-tab3``, ``paper:004-fig5-left``; papers numbered as in
``notebooks/README.md``: 000 the TARA-Merging supplement, 001 TARA-Merging, 002 AdaRank, 003 Core
Space, 004 Model Merging Beyond Image Classification), writes its figures as
``<name>/<item>.png`` + ``<item>.pdf``, ``<item>-2.png`` + ``<item>-2.pdf``, … and its HTML tables
(``text/html`` outputs: a DataFrame, a :mod:`mergelab_figures.tables` Styler with its bold) as
``<name>/<item>.html``, ``<item>-2.html``, … (each a page of its own, linking back to the cell),
numbered on over the cells whose first tag is the same item. A cell may carry several such tags
when one output stands for several items (a main-text figure and its appendix or supplement copy):
its files are named after the first and the index lists it under each. Untagged figures are
``<name>/fig-NN.png`` + ``.pdf``, numbered over the untagged ones; untagged tables stay in the
notebook page only. :func:`export` writes ``<name>.html`` (nbconvert's HTML exporter, images
embedded) and those files.

:func:`report` executes many notebooks, at most :func:`default_jobs` kernels at once unless told,
calls ``progress`` with one line as each notebook ends, exports the ones that succeeded and writes
``index.html`` (:func:`write_index`): one row per paper item a cell drew, with its status as
``notebooks/README.md`` gives it (``drawn``, or ``partial: …`` and what is missing;
:func:`item_statuses`), linking its files and the cell in the notebook's page.
``notebooks/README.md`` lists every figure and table of the papers and whether a notebook draws it.

A notebook that fails raises :class:`~mergelab.errors.InputError` with one line naming the
notebook, the failing cell and its error; nothing is written for it (files are written under
temporary names and renamed into place only once complete). With several notebooks every one is
attempted and the failures are reported together, in the order the notebooks were given.
"""

from __future__ import annotations

import ast
import base64
import html
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import nbformat
from jupyter_client.kernelspec import NoSuchKernel
from nbclient import NotebookClient
from nbclient.exceptions import CellControlSignal, CellExecutionError, CellTimeoutError, DeadKernelError

import mergelab
from mergelab.errors import InputError

__all__ = ["FIGURE_FORMATS", "FIGURE_MIMES", "REPO", "CellOutputs", "cell_outputs", "default_jobs", "execute_notebook", "export",
           "item_label", "item_statuses", "list_notebooks", "paper_items", "prepared_notebook", "read_notebook", "report", "write_index"]

REPO = Path(__file__).resolve().parents[2]
KERNEL = "python3"
PARAMETERS_TAG = "parameters"
PAPER_TAG = "paper:"
INDEX = "index.html"
DEFAULT_OUT = "data/reports"
_ITEM = re.compile(r"(?P<paper>\d{3})-(?P<kind>fig|tab)(?P<number>\d+)(?:-(?P<part>[a-z]+))?")
_KINDS = {"fig": "Fig.", "tab": "Tab."}
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
#: The formats every figure is rendered in and written as, with the MIME type of its output.
FIGURE_MIMES = {"png": "image/png", "pdf": "application/pdf"}
#: The formats :func:`execute_notebook` has the kernel render figures in by default (every one the export writes).
FIGURE_FORMATS = tuple(FIGURE_MIMES)
TABLE_MIME = "text/html"


def list_notebooks(root: str | Path | None = None) -> list[Path]:
    """The repository's notebooks, ``<root>/notebooks/*.ipynb`` sorted by name (the numbering is the order)."""
    return sorted(Path(root or REPO, "notebooks").glob("*.ipynb"))


def _kernel_env() -> dict[str, str]:
    """The caller's environment with the folders that hold the caller's ``mergelab`` and
    ``mergelab_figures`` first on ``PYTHONPATH`` (``lib/`` and ``analysis/`` of a checkout), so the
    kernel imports the same code as the caller."""
    import mergelab_figures

    env = dict(os.environ)
    first = list(dict.fromkeys(str(Path(m.__file__).resolve().parents[1]) for m in (mergelab, mergelab_figures)))
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in first]
    env["PYTHONPATH"] = os.pathsep.join(first + rest)
    env.pop("MPLBACKEND", None)  # the kernel's inline backend renders figures as image/png
    return env


def _literal(name: str, value: Any, notebook: str) -> str:
    value = str(value) if isinstance(value, os.PathLike) else value
    text = repr(value)
    try:
        ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise InputError(f"parameter {name}={text} for {notebook} is not a Python literal (str, number, bool, None, list, dict)") from None
    return text


def _inject(nb: nbformat.NotebookNode, params: Mapping[str, Any], notebook: str) -> None:
    """Rewrite the assignments of the ``parameters`` cell to ``params`` (in place)."""
    cells = [c for c in nb.cells if c.cell_type == "code" and PARAMETERS_TAG in c.metadata.get("tags", [])]
    if not cells:
        if params:
            raise InputError(f"{notebook} has no code cell tagged {PARAMETERS_TAG!r}; cannot set {', '.join(params)}")
        return
    cell = cells[0]
    lines = cell.source.splitlines()
    targets = {node.targets[0].id: node for node in ast.parse(cell.source).body
               if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)}
    unknown = [name for name in params if name not in targets]
    if unknown:
        raise InputError(f"{notebook} has no parameter {', '.join(unknown)}; its parameters cell sets {', '.join(targets) or 'nothing'}")
    for name in sorted(params, key=lambda n: -targets[n].lineno):  # bottom-up, so line numbers stay valid
        node = targets[name]
        lines[node.lineno - 1:node.end_lineno] = [f"{name} = {_literal(name, params[name], notebook)}"]
    cell.source = "\n".join(lines)
    cell.metadata.setdefault("mergelab", {})["injected"] = sorted(params)


def _first_line(source: str) -> str:
    return next((line.strip() for line in source.splitlines() if line.strip()), "")[:80]


def paper_items(cell: nbformat.NotebookNode, notebook: str) -> tuple[str, ...]:
    """The paper items a cell's ``paper:<item>`` tags name, in tag order (empty for an untagged cell).

    Raises :class:`InputError` for an item that is not ``<NNN>-fig<N>`` or ``<NNN>-tab<N>`` with an
    optional ``-<part>`` of lowercase letters.
    """
    items = tuple(tag[len(PAPER_TAG):] for tag in cell.metadata.get("tags", []) if tag.startswith(PAPER_TAG))
    bad = [item for item in items if not _ITEM.fullmatch(item)]
    if bad:
        raise InputError(f"{notebook}: cell {cell.get('id', '?')} has the tag {PAPER_TAG}{bad[0]}; name a paper item as "
                         f"{PAPER_TAG}<NNN>-fig<N> or {PAPER_TAG}<NNN>-tab<N>, optionally -<part> (e.g. {PAPER_TAG}004-fig5-left)")
    return items


def item_label(item: str) -> str:
    """An item as the papers print it: ``001-fig3`` -> ``001 Fig. 3``, ``004-fig5-left`` -> ``004 Fig. 5 (left)``."""
    match = _ITEM.fullmatch(item)
    part = f" ({match['part']})" if match["part"] else ""
    return f"{match['paper']} {_KINDS[match['kind']]} {int(match['number'])}{part}"


#: A row of an item table of notebooks/README.md: ``| item | what it shows | status | redrawn in |``.
_README_ROW = re.compile(r"\|\s*(?P<label>\d{3} (?:Fig|Tab)\. \d+(?: \(\w+\))?)\s*\|[^|]*\|\s*(?P<status>[^|]*?)\s*\|")
UNLISTED = "not listed in notebooks/README.md"


def item_statuses(root: str | Path | None = None) -> dict[str, str]:
    """``{label: status}`` for every paper item ``<root>/notebooks/README.md`` lists (``"001 Fig. 5": "drawn"``,
    ``"001 Tab. 3": "partial: no ensemble row, …"``); empty when the checkout has no such file."""
    path = Path(root or REPO, "notebooks", "README.md")
    if not path.is_file():
        return {}
    rows = (_README_ROW.match(line) for line in path.read_text(encoding="utf-8").splitlines())
    return {row["label"]: row["status"] for row in rows if row}


def _item_order(item: str) -> tuple[str, str, int, str]:
    """Sort key: paper, figures before tables, number, part."""
    match = _ITEM.fullmatch(item)
    return match["paper"], match["kind"], int(match["number"]), match["part"] or ""


@dataclass(frozen=True)
class CellOutputs:
    """What one code cell of an executed notebook gives its export."""

    cell_id: str
    items: tuple[str, ...]  #: its paper items (``paper:<item>`` tags), in tag order
    files: tuple[tuple[str, bytes], ...]  #: its files, each with its name, in output order: per figure its PNG then PDF; a tagged cell's tables as HTML
    shown: bool  #: whether it displayed anything (a figure, a table): only then did it draw its items


def _numbered(counter: Counter[str], item: str) -> str:
    """``item`` the first time, then ``item-2``, ``item-3``, … (counted in ``counter``)."""
    counter[item] += 1
    return item if counter[item] == 1 else f"{item}-{counter[item]}"


def _text(value: str | list[str]) -> str:
    return "".join(value) if isinstance(value, list) else value


def _table_page(table: str, item: str, notebook: str, cell_id: str) -> bytes:
    """A tagged cell's HTML table as a page of its own, under ``<name>/``, linking back to the cell."""
    name = Path(notebook).stem
    label = html.escape(item_label(item))
    back = f"../{quote(f'{name}.html')}" + (f"#cell-id={quote(cell_id)}" if cell_id else "")
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', f'<head><meta charset="utf-8"><title>{label} ({html.escape(name)})</title></head>',
        "<body>", f'<p>{label}, drawn in <a href="{back}">{html.escape(name)}</a>. The numbers are the study\'s; on the micro '
        "benchmark they are micro-benchmark numbers, <strong>not the papers' numbers</strong>.</p>", table, "</body>", "</html>", ""
    ]).encode("utf-8")


def cell_outputs(nb: nbformat.NotebookNode, notebook: str) -> list[CellOutputs]:
    """Every code cell of ``nb`` that has a paper tag or a figure output, in order, its files named as the module says."""
    figures: Counter[str] = Counter()
    tables: Counter[str] = Counter()
    untagged = 0
    found = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        items = paper_items(cell, notebook)
        outputs = cell.get("outputs", [])
        files = []
        for output in outputs:
            data = output.get("data", {})
            formats = [(ext, mime) for ext, mime in FIGURE_MIMES.items() if mime in data]
            if formats:
                if items:
                    stem = _numbered(figures, items[0])
                else:
                    untagged += 1
                    stem = f"fig-{untagged:02d}"
                files += [(f"{stem}.{ext}", base64.b64decode(data[mime])) for ext, mime in formats]
            if items and TABLE_MIME in data:
                page = _table_page(_text(data[TABLE_MIME]), items[0], notebook, cell.get("id", ""))
                files.append((f"{_numbered(tables, items[0])}.html", page))
        if items or files:
            shown = any(o.get("output_type") in ("display_data", "execute_result") for o in outputs)
            found.append(CellOutputs(cell.get("id", ""), items, tuple(files), shown))
    return found


def read_notebook(path: str | Path) -> nbformat.NotebookNode:
    """The Jupyter notebook at ``path`` (version 4, validated); a missing file or one that is not a
    notebook (not JSON, not UTF-8, not nbformat's schema) is an :class:`InputError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"notebook {path} does not exist")
    try:
        nb = nbformat.read(path, as_version=4)  # validates against nbformat's schema
    except (ValueError, TypeError, AttributeError, KeyError, RecursionError, nbformat.ValidationError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
        raise InputError(f"{path} is not a Jupyter notebook ({first}); pass .ipynb files (the repository's are in notebooks/)") from None
    return nb


def prepared_notebook(path: str | Path, params: Mapping[str, Any]) -> nbformat.NotebookNode:
    """The notebook at ``path`` (:func:`read_notebook`) with ``params`` injected into its ``parameters``
    cell; InputError, before any kernel starts, when it has no such cell or parameter or a cell's
    ``paper:`` tag is malformed."""
    path = Path(path)
    nb = read_notebook(path)
    _inject(nb, params, path.name)
    cell_outputs(nb, path.name)
    return nb


def execute_notebook(path: str | Path, params: Mapping[str, Any], *, cwd: str | Path,
                     timeout: int = 600, figure_formats: Sequence[str] = FIGURE_FORMATS) -> nbformat.NotebookNode:
    """Run the notebook at ``path`` with ``params`` injected into its ``parameters`` cell.

    Every cell runs on the ``python3`` kernel started in ``cwd`` (relative paths in the notebook,
    such as ``STORE = "data/store"``, resolve there), with at most ``timeout`` seconds per cell; the
    kernel renders each figure in each of ``figure_formats`` (keys of :data:`FIGURE_MIMES`; a caller
    that exports nothing may ask for ``("png",)`` alone).
    Returns the executed notebook; ``nb.metadata["mergelab"]`` records its name and the
    parameters. Raises :class:`InputError` (one line: notebook, cell, error) when a cell fails, and
    before anything runs when a cell's ``paper:`` tag is malformed.
    """
    path = Path(path)
    unknown = [f for f in figure_formats if f not in FIGURE_MIMES]
    if unknown or not figure_formats:
        raise ValueError(f"figure_formats={tuple(figure_formats)!r}: choose from {', '.join(FIGURE_MIMES)}")
    nb = prepared_notebook(path, params)
    nb.metadata["mergelab"] = {"notebook": path.stem, "parameters": {k: _literal(k, v, path.name) for k, v in params.items()}}
    current: dict[str, int] = {}

    def on_cell_execute(cell: nbformat.NotebookNode, cell_index: int) -> None:
        current["index"] = cell_index

    client = NotebookClient(nb, timeout=timeout, kernel_name=KERNEL, resources={"metadata": {"path": str(Path(cwd))}},
                            on_cell_execute=on_cell_execute,
                            extra_arguments=["--IPKernelApp.log_level=ERROR",  # a local kernel: no transport warnings
                                             *(f"--InlineBackend.figure_formats={f}" for f in figure_formats)])
    try:
        client.execute(env=_kernel_env())
    except NoSuchKernel:
        raise InputError(f"cannot run {path.name}: no Jupyter kernel {KERNEL!r}; install one with `python -m ipykernel install --sys-prefix`") from None
    except (CellExecutionError, CellTimeoutError, DeadKernelError, CellControlSignal) as exc:
        index = current.get("index")
        where = f"cell {index + 1} ({_first_line(nb.cells[index].source)!r})" if index is not None else "kernel start"
        if isinstance(exc, CellExecutionError):
            error = f"{exc.ename}: {_ANSI.sub('', exc.evalue)}"
        elif isinstance(exc, CellTimeoutError):
            error = f"ran longer than the {timeout} s cell timeout"
        else:
            error = f"{type(exc).__name__}: {_ANSI.sub('', str(exc)).splitlines()[0] if str(exc) else 'kernel died'}"
        raise InputError(f"notebook {path.name} failed at {where}: {error[:500]}") from None
    return nb


def _write_text(path: Path, text: str) -> None:
    """Write ``path`` under a temporary name beside it and rename it into place (never half-written)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def export(nb: nbformat.NotebookNode, out_dir: str | Path, *, name: str | None = None) -> list[Path]:
    """Write ``<out_dir>/<name>.html`` and each cell's files under ``<out_dir>/<name>/``.

    Every figure output as ``.png`` and ``.pdf`` (the formats it carries), every HTML table of a
    tagged cell as ``.html``, named after the cell's ``paper:`` tag (``<item>.png``, ``<item>-2.png``,
    …; ``<item>.html``, …) or, an untagged figure, ``fig-NN`` (:func:`cell_outputs`). ``name``
    defaults to the notebook's name recorded by :func:`execute_notebook`. A previous export of the
    same name is replaced as a whole (no stale files remain). Returns the written files, the HTML
    page first, then the cells' files in cell and output order.
    """
    name = name or nb.metadata.get("mergelab", {}).get("notebook")
    if not name:
        raise ValueError("export needs name= for a notebook that execute_notebook did not run")
    from nbconvert import HTMLExporter  # slow to import; only needed here

    cells = cell_outputs(nb, f"{name}.ipynb")
    html_page, _ = HTMLExporter().from_notebook_node(nb)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out_dir))  # same filesystem: renames are atomic
    try:
        figures = staging / "figures"
        figures.mkdir()
        for cell in cells:
            for filename, content in cell.files:
                (figures / filename).write_bytes(content)
        (staging / "page.html").write_text(html_page, encoding="utf-8")
        fig_dir, html_path = out_dir / name, out_dir / f"{name}.html"
        if fig_dir.exists():
            shutil.rmtree(fig_dir)
        figures.rename(fig_dir)
        os.replace(staging / "page.html", html_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [html_path, *(fig_dir / filename for cell in cells for filename, _ in cell.files)]


def _index_row(item: str, status: str, notebook: str, cell: CellOutputs) -> str:
    page = quote(f"{notebook}.html") + (f"#cell-id={quote(cell.cell_id)}" if cell.cell_id else "")
    files = ", ".join(f'<a href="{quote(f"{notebook}/{filename}")}">{html.escape(filename)}</a>' for filename, _ in cell.files)
    word, _, detail = status.partition(":") if status.startswith("partial:") else (status, "", "")
    shown = f"<strong>{html.escape(word)}</strong>{html.escape(':' + detail) if detail else ''}"
    return (f"<tr><td>{html.escape(item_label(item))}</td><td>{shown}</td><td><a href=\"{page}\">{html.escape(notebook)}</a></td>"
            f"<td>{files or 'shown in the notebook page'}</td></tr>")


def write_index(out_dir: str | Path, pages: Mapping[str, Sequence[CellOutputs]], params: Mapping[str, Any],
                statuses: Mapping[str, str] | None = None) -> Path:
    """Write ``<out_dir>/index.html``: the paper items drawn by the exported notebooks ``pages``.

    ``pages`` maps each notebook name (its ``<name>.html`` and ``<name>/`` under ``out_dir``) to its
    :func:`cell_outputs`. One row per item and cell that displayed something, sorted by paper and
    item: the item, its status (``statuses[label]``, default :func:`item_statuses` of this checkout:
    ``drawn`` or ``partial: …`` as ``notebooks/README.md`` gives it), a link to the cell in the
    notebook's page, links to the cell's files (each figure's PNG and PDF, each table's HTML); then
    every notebook page. ``params`` (the notebooks' parameters) are printed in the header. Plain
    HTML, written atomically. Returns its path.
    """
    statuses = item_statuses() if statuses is None else statuses
    rows = sorted(((item, position, notebook, cell) for position, (notebook, cells) in enumerate(pages.items())
                   for cell in cells if cell.shown for item in cell.items),
                  key=lambda row: (_item_order(row[0]), row[1]))
    setting = ", ".join(f"{html.escape(k)} = {html.escape(repr(v))}" for k, v in params.items()) or "their defaults"
    notebooks = "\n".join(f'<li><a href="{quote(f"{name}.html")}">{html.escape(name)}</a></li>' for name in pages)
    page = "\n".join([
        '<!DOCTYPE html>', '<html lang="en">', '<head><meta charset="utf-8"><title>mergelab report: paper figures and tables</title></head>',
        "<body>", "<h1>Paper figures and tables drawn by this report</h1>",
        f"<p>Notebooks run with {setting}. The numbers are this study's; on the micro benchmark they are "
        "micro-benchmark numbers, <strong>not the papers' numbers</strong>. <code>notebooks/README.md</code> lists "
        "every figure and table of the five papers and whether a notebook draws it; the status column repeats it "
        "(<strong>drawn</strong>: the item's quantity in its layout; <strong>partial</strong>: part of it, what is "
        "missing after the colon).</p>",
        "<table>", "<thead><tr><th>item</th><th>status</th><th>drawn in</th><th>files</th></tr></thead>", "<tbody>",
        *(_index_row(item, statuses.get(item_label(item), UNLISTED), notebook, cell) for item, _, notebook, cell in rows),
        "</tbody>", "</table>", "<h2>Notebook pages</h2>", f"<ul>\n{notebooks}\n</ul>", "</body>", "</html>", ""])
    path = Path(out_dir) / INDEX
    _write_text(path, page)
    return path


def default_jobs(n_notebooks: int) -> int:
    """Kernels :func:`report` runs at once unless told: ``min(n_notebooks, os.cpu_count() // 2 or 1)``
    (a kernel drawing figures keeps a core busy; the other half is left to the caller)."""
    return min(n_notebooks, (os.cpu_count() or 1) // 2 or 1)


def report(notebooks: Sequence[str | Path], params: Mapping[str, Any], out_dir: str | Path = DEFAULT_OUT, *,
           cwd: str | Path | None = None, timeout: int = 600, jobs: int | None = None,
           progress: Callable[[str], None] | None = None) -> list[Path]:
    """Execute each notebook with ``params`` and export it to ``out_dir``, ``jobs`` kernels at a time; write the index.

    Kernels start in ``cwd`` (default the current directory); ``jobs`` defaults to
    :func:`default_jobs`. As each notebook ends, ``progress`` (if given) gets one line:
    ``notebook k/n <name>: done in S s`` or ``…: failed after S s``, ``k`` counting the notebooks ended
    so far. Every notebook is attempted; the ones that succeed are written (:func:`export`) and
    listed in ``<out_dir>/index.html`` (:func:`write_index`). If any failed, raises one
    :class:`InputError` naming each failed notebook and its failing cell, in the order of
    ``notebooks``. Returns every file written, what ``mergelab report`` counts: per notebook, in the
    order given, what :func:`export` wrote (its HTML page, then each cell's figures as PNG and PDF
    and its tagged tables as HTML); the index last.
    """
    if not notebooks:
        raise InputError("no notebooks to run: pass notebook paths (the repository's are in notebooks/)")
    if jobs is not None and jobs < 1:
        raise InputError(f"jobs={jobs}: run at least one notebook at a time")
    paths = [Path(p) for p in notebooks]
    for path in paths:  # every notebook readable and taking the parameters before the first kernel starts (issue 30 probe 618)
        prepared_notebook(path, params)
    cwd = Path(cwd) if cwd is not None else Path.cwd()
    seconds: dict[int, float] = {}

    def run(index: int) -> nbformat.NotebookNode:
        start = time.perf_counter()
        try:
            return execute_notebook(paths[index], params, cwd=cwd, timeout=timeout)
        finally:
            seconds[index] = time.perf_counter() - start

    exported: dict[int, tuple[list[Path], list[CellOutputs]]] = {}
    failures: dict[int, str] = {}
    with ThreadPoolExecutor(max_workers=jobs or default_jobs(len(paths)), thread_name_prefix="notebook") as pool:
        futures = {pool.submit(run, index): index for index in range(len(paths))}
        try:
            for ended, future in enumerate(as_completed(futures), start=1):
                index = futures[future]
                try:
                    nb = future.result()
                except InputError as exc:
                    failures[index] = str(exc)
                    outcome = f"failed after {seconds[index]:.1f} s"
                else:
                    files = export(nb, out_dir)
                    exported[index] = (files, cell_outputs(nb, paths[index].name))
                    outcome = f"done in {seconds[index]:.1f} s"
                if progress is not None:
                    progress(f"notebook {ended}/{len(paths)} {paths[index].stem}: {outcome}")
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # an unexpected error: start no further notebook
            raise
    written = [f for index in sorted(exported) for f in exported[index][0]]
    if exported:
        written.append(write_index(out_dir, {paths[i].stem: exported[i][1] for i in sorted(exported)}, params))
    if failures:
        done = f" (the {len(exported)} other notebooks were written to {out_dir})" if exported else ""
        raise InputError("; ".join(failures[index] for index in sorted(failures)) + done)
    return written
