"""The notebook runner behind ``mergelab report``: parameters in, executed notebooks out as HTML + PNG.

A notebook takes its parameters from its code cell tagged ``parameters`` (papermill's
convention): :func:`execute_notebook` rewrites the assignments of that cell with the values
given, runs every cell with nbclient on the ``python3`` kernel, in ``cwd``, with this checkout's
``lib/`` and repository root first on the kernel's ``PYTHONPATH`` (so the kernel imports the same
``analysis`` and ``mergelab`` as the caller), and returns the executed notebook. :func:`export`
writes ``<name>.html`` (nbconvert's HTML exporter, images embedded) and every ``image/png``
output as ``<name>/fig-NN.png``; :func:`report` does both for many notebooks.

A notebook that fails raises :class:`~mergelab.errors.InputError` with one line naming the
notebook, the failing cell and its error; nothing is written for it (files are written under
temporary names and renamed into place only once complete).
"""

from __future__ import annotations

import ast
import base64
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nbformat
from jupyter_client.kernelspec import NoSuchKernel
from nbclient import NotebookClient
from nbclient.exceptions import CellControlSignal, CellExecutionError, CellTimeoutError, DeadKernelError

import mergelab
from mergelab.errors import InputError

__all__ = ["REPO", "execute_notebook", "export", "list_notebooks", "report"]

REPO = Path(__file__).resolve().parents[1]
KERNEL = "python3"
PARAMETERS_TAG = "parameters"
DEFAULT_OUT = "data/reports"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def list_notebooks(root: str | Path | None = None) -> list[Path]:
    """The repository's notebooks, ``<root>/notebooks/*.ipynb`` sorted by name (the numbering is the order)."""
    return sorted(Path(root or REPO, "notebooks").glob("*.ipynb"))


def _kernel_env() -> dict[str, str]:
    """The caller's environment with this checkout's ``lib/`` and root first on ``PYTHONPATH``."""
    env = dict(os.environ)
    first = [str(Path(mergelab.__file__).resolve().parents[1]), str(REPO)]
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


def execute_notebook(path: str | Path, params: Mapping[str, Any], *, cwd: str | Path,
                     timeout: int = 600) -> nbformat.NotebookNode:
    """Run the notebook at ``path`` with ``params`` injected into its ``parameters`` cell.

    Every cell runs on the ``python3`` kernel started in ``cwd`` (relative paths in the notebook,
    such as ``STORE = "data/store"``, resolve there), with at most ``timeout`` seconds per cell.
    Returns the executed notebook; ``nb.metadata["mergelab"]`` records its name and the
    parameters. Raises :class:`InputError` (one line: notebook, cell, error) when a cell fails.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"notebook {path} does not exist")
    nb = nbformat.read(path, as_version=4)
    _inject(nb, params, path.name)
    nb.metadata["mergelab"] = {"notebook": path.stem, "parameters": {k: _literal(k, v, path.name) for k, v in params.items()}}
    current: dict[str, int] = {}

    def on_cell_execute(cell: nbformat.NotebookNode, cell_index: int) -> None:
        current["index"] = cell_index

    client = NotebookClient(nb, timeout=timeout, kernel_name=KERNEL, resources={"metadata": {"path": str(Path(cwd))}},
                            on_cell_execute=on_cell_execute,
                            extra_arguments=["--IPKernelApp.log_level=ERROR"])  # a local kernel: no transport warnings
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


def _pngs(nb: nbformat.NotebookNode) -> list[bytes]:
    return [base64.b64decode(output["data"]["image/png"]) for cell in nb.cells if cell.cell_type == "code"
            for output in cell.get("outputs", []) if "image/png" in output.get("data", {})]


def export(nb: nbformat.NotebookNode, out_dir: str | Path, *, name: str | None = None) -> list[Path]:
    """Write ``<out_dir>/<name>.html`` and each ``image/png`` output as ``<out_dir>/<name>/fig-NN.png``.

    ``name`` defaults to the notebook's name recorded by :func:`execute_notebook`. A previous
    export of the same name is replaced as a whole (no stale figures remain). Returns the written
    files, the HTML first.
    """
    name = name or nb.metadata.get("mergelab", {}).get("notebook")
    if not name:
        raise ValueError("export needs name= for a notebook that execute_notebook did not run")
    from nbconvert import HTMLExporter  # slow to import; only needed here

    html, _ = HTMLExporter().from_notebook_node(nb)
    pngs = _pngs(nb)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out_dir))  # same filesystem: renames are atomic
    try:
        figures = staging / "figures"
        figures.mkdir()
        for i, png in enumerate(pngs, start=1):
            (figures / f"fig-{i:02d}.png").write_bytes(png)
        (staging / "page.html").write_text(html, encoding="utf-8")
        fig_dir, html_path = out_dir / name, out_dir / f"{name}.html"
        if fig_dir.exists():
            shutil.rmtree(fig_dir)
        figures.rename(fig_dir)
        os.replace(staging / "page.html", html_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [html_path, *(fig_dir / f"fig-{i:02d}.png" for i in range(1, len(pngs) + 1))]


def report(notebooks: Sequence[str | Path], params: Mapping[str, Any], out_dir: str | Path = DEFAULT_OUT, *,
           cwd: str | Path | None = None, timeout: int = 600) -> list[Path]:
    """Execute each notebook with ``params`` (kernel in ``cwd``, default the current directory) and export it to ``out_dir``.

    Every notebook is attempted; the ones that succeed are written. If any failed, raises one
    :class:`InputError` naming each failed notebook and its failing cell. Returns the written
    files (per notebook: the HTML, then its PNGs).
    """
    if not notebooks:
        raise InputError("no notebooks to run: pass notebook paths (the repository's are in notebooks/)")
    cwd = Path(cwd) if cwd is not None else Path.cwd()
    written: list[Path] = []
    failures: list[str] = []
    for path in notebooks:
        try:
            nb = execute_notebook(path, params, cwd=cwd, timeout=timeout)
        except InputError as exc:
            failures.append(str(exc))
            continue
        written += export(nb, out_dir)
    if failures:
        done = f" (the {len(notebooks) - len(failures)} other notebooks were written to {out_dir})" if written else ""
        raise InputError("; ".join(failures) + done)
    return written
