"""What ``mergelab report`` writes of an executed notebook: its page, its figures and tables, and the index.

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

``index.html`` (:func:`write_index`) has one row per paper item a cell drew, with its status as
``notebooks/README.md`` gives it (``drawn``, or ``partial: …`` and what is missing;
:func:`item_statuses`), linking its files and the cell in the notebook's page. Files are written
under temporary names and renamed into place only once complete.
"""

from __future__ import annotations

import base64
import html
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import nbformat

from mergelab.errors import InputError

__all__ = ["FIGURE_MIMES", "INDEX", "REPO", "CellOutputs", "cell_outputs", "export", "item_label", "item_statuses", "paper_items",
           "write_index"]

REPO = Path(__file__).resolve().parents[2]
PAPER_TAG = "paper:"
INDEX = "index.html"
_ITEM = re.compile(r"(?P<paper>\d{3})-(?P<kind>fig|tab)(?P<number>\d+)(?:-(?P<part>[a-z]+))?")
_KINDS = {"fig": "Fig.", "tab": "Tab."}
#: The formats every figure is rendered in and written as, with the MIME type of its output.
FIGURE_MIMES = {"png": "image/png", "pdf": "application/pdf"}
TABLE_MIME = "text/html"


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
    defaults to the notebook's name recorded by :func:`~mergelab_app.report.execute_notebook`. A previous export of the
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
