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

Files are named after the paper item a cell redraws (its ``paper:<item>`` tag) and written by
:mod:`mergelab_app.report_export`.

:func:`report` executes many notebooks, at most :func:`default_jobs` kernels at once unless told,
calls ``progress`` with one line as each notebook ends, exports the ones that succeeded and writes
``index.html`` (:func:`~mergelab_app.report_export.write_index`): one row per paper item a cell drew.
``notebooks/README.md`` lists every figure and table of the papers and whether a notebook draws it.

A notebook that fails raises :class:`~mergelab.errors.InputError` with one line naming the
notebook, the failing cell and its error; nothing is written for it (files are written under
temporary names and renamed into place only once complete). With several notebooks every one is
attempted and the failures are reported together, in the order the notebooks were given.
"""

from __future__ import annotations

import ast
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import nbformat
from jupyter_client.kernelspec import NoSuchKernel
from nbclient import NotebookClient
from nbclient.exceptions import CellControlSignal, CellExecutionError, CellTimeoutError, DeadKernelError

import mergelab
from mergelab.errors import InputError
from mergelab_app.report_export import FIGURE_MIMES, REPO, CellOutputs, cell_outputs, export, write_index

__all__ = ["FIGURE_FORMATS", "default_jobs", "execute_notebook", "list_notebooks", "prepared_notebook", "read_notebook", "report"]

KERNEL = "python3"
PARAMETERS_TAG = "parameters"
DEFAULT_OUT = "data/reports"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
#: The formats :func:`execute_notebook` has the kernel render figures in by default (every one the export writes).
FIGURE_FORMATS = tuple(FIGURE_MIMES)


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
        raise InputError(f"cannot run {path.name}: no Jupyter kernel {KERNEL!r}; install one with `python -m ipykernel install "
                         "--sys-prefix`") from None
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
    It takes 7 parameters: what runs (notebooks, ``params``, ``out_dir``), how (``cwd``, ``timeout``, ``jobs``), a progress callback."""
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
