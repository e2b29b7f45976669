"""Errors of the libraries below the CLI reach the user as one line, early (issue 30, item 6):
``report --notebook`` on a file that is not a notebook and ``report --out`` under a file before any
kernel starts, ``serve`` with a bad deployment name or no server behind ``PREFECT_API_URL``,
``--runner dask=ADDRESS`` with no scheduler there (a probe of seconds, not Dask's 120 s), and
Click's usage errors (bad option values and types, unknown options and commands) without the boxed
usage block: one ``error:`` line, exit 2, no traceback, nothing written."""

from __future__ import annotations

import contextlib
import json
import socket
from pathlib import Path

import pytest
import xarray as xr
from typer.testing import CliRunner

from mergelab_app.cli import app
from mergelab.store import Store

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "studies" / "micro.yaml"


def _dead_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _report(tmp, notebook: Path | None = None, *extra):
    """``report`` on a store holding the study ``tiny``."""
    store = Store(tmp / "store")
    key = store.key("test.report", "1", name="results")
    store.put_dataset(key, xr.Dataset({"score": ("task", [0.5])}))
    store.set_ref("studies/tiny/results", key)
    return ["report", "--store", tmp / "store", "--study", "tiny", "--out", tmp / "reports",
            *(["--notebook", notebook] if notebook else []), *extra]


def _case_report_on_a_text_file(tmp, api):
    (tmp / "notes.ipynb").write_text("hello")
    return _report(tmp, tmp / "notes.ipynb"), "notes.ipynb is not a Jupyter notebook (Notebook does not appear to be JSON"


def _case_report_on_a_json_list(tmp, api):
    (tmp / "list.ipynb").write_text("[1, 2]")
    return _report(tmp, tmp / "list.ipynb"), "list.ipynb is not a Jupyter notebook"


def _case_report_on_a_notebook_of_the_wrong_shape(tmp, api):
    (tmp / "odd.ipynb").write_text('{"cells": 3, "nbformat": 4, "nbformat_minor": 5, "metadata": {}}')
    return _report(tmp, tmp / "odd.ipynb"), "odd.ipynb is not a Jupyter notebook"


def _case_report_on_binary(tmp, api):
    (tmp / "bin.ipynb").write_bytes(b"\xff\xfe\x00")
    return _report(tmp, tmp / "bin.ipynb"), "bin.ipynb is not a Jupyter notebook"


def _case_report_out_under_a_file(tmp, api):
    (tmp / "afile").write_text("")
    args = _report(tmp, REPO / "notebooks" / "00_overview.ipynb")
    args[args.index("--out") + 1] = tmp / "afile" / "reports"
    return args, "--out", "which is a file; choose a path under a directory"


def _case_report_out_a_folder_of_other_files(tmp, api):  # issue 30 fresh probe 629: pages written among the shipped adapters
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("keep")
    args = _report(tmp, REPO / "notebooks" / "00_overview.ipynb")
    args[args.index("--out") + 1] = tmp / "mine"
    return args, "is a folder of other files (no index.html of a previous output)", "pass a new or empty folder"


def _case_report_on_a_notebook_without_a_parameters_cell(tmp, api):  # issue 30 probe 618: found as the notebook ran
    (tmp / "plain.ipynb").write_text(json.dumps({"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [
        {"cell_type": "code", "id": "a", "metadata": {}, "source": "1", "outputs": [], "execution_count": None}]}))
    return _report(tmp, tmp / "plain.ipynb"), "plain.ipynb has no code cell tagged 'parameters'; cannot set STORE, STUDY"


def _case_report_out_is_the_store(tmp, api):  # probe 628: the pages were written among the store's objects
    args = _report(tmp, REPO / "notebooks" / "00_overview.ipynb")
    args[args.index("--out") + 1] = tmp / "store"
    return args, "--out", "lies inside the store", "choose an output folder outside the store"


def _case_serve_bad_deployment_name(tmp, api):
    api(f"http://127.0.0.1:{_dead_port()}/api")
    return (["serve", STUDY, "--register-only", "--name", "nightly/run", "--store", tmp / "s"],
            "--name 'nightly/run' must start with a letter or digit and use only letters, digits and _ . + - (it names the deployment")


def _case_serve_empty_deployment_name(tmp, api):
    api(f"http://127.0.0.1:{_dead_port()}/api")
    return ["serve", STUDY, "--register-only", "--name", "", "--store", tmp / "s"], "--name '' must start with a letter or digit"


def _case_register_with_no_server_there(tmp, api):
    port = _dead_port()
    api(f"http://127.0.0.1:{port}/api")
    return (["serve", STUDY, "--register-only", "--store", tmp / "s"],
            f"--register-only: no Prefect server answers at PREFECT_API_URL=http://127.0.0.1:{port}/api (ConnectError")


def _case_serve_with_no_server_there(tmp, api):
    api(f"http://127.0.0.1:{_dead_port()}/api")
    return ["serve", STUDY, "--store", tmp / "s"], "serve: no Prefect server answers at PREFECT_API_URL=", "start one (prefect server start)"


def _case_dask_runner_with_no_scheduler_there(tmp, api):
    port = _dead_port()
    return (["run", STUDY, "--runner", f"dask=tcp://127.0.0.1:{port}", "--store", tmp / "s"],
            f"--runner dask=tcp://127.0.0.1:{port}: no Dask scheduler answers at 127.0.0.1:{port}", "start one (dask scheduler)")


def _case_dask_runner_port_not_a_number(tmp, api):
    return ["run", STUDY, "--runner", "dask=tcp://127.0.0.1:eighty", "--store", tmp / "s"], "the port is not a number"


def _case_dask_runner_with_an_empty_address(tmp, api):  # issue 30 probe 577: `dask=$ADDRESS` unset ran on a local cluster
    return ["run", STUDY, "--runner", "dask=", "--store", tmp / "s"], "--runner dask=: nothing after '='", "dask alone for the default"


def _case_thread_runner_with_an_empty_count(tmp, api):  # probe 575: ran with the default count
    return ["run", STUDY, "--runner", "thread=", "--store", tmp / "s"], "--runner thread=: nothing after '='", "e.g. thread=4"


def _case_option_of_the_wrong_type(tmp, api):
    return ["adapt", "--iters", "many"], "Invalid value for '--iters'", "see mergelab adapt --help"


def _case_option_out_of_range(tmp, api):
    return _report(tmp, None, "--jobs", "0"), "Invalid value for '--jobs'", "see mergelab report --help"


def _case_option_above_its_range(tmp, api):  # issue 30 fresh probe 622: --jobs 10^30 ran the notebooks
    return _report(tmp, None, "--jobs", str(10**30)), "Invalid value for '--jobs'", "see mergelab report --help"


def _case_unknown_option(tmp, api):
    return ["merge", "--iters", "3"], "No such option: --iters", "see mergelab merge --help"


def _case_missing_option(tmp, api):
    return ["merge", "--method", "ties"], "Missing option '--base'; see mergelab merge --help"


def _case_unknown_command(tmp, api):
    return ["frobnicate"], "No such command 'frobnicate'; see mergelab --help"


def _case_unknown_store_command(tmp, api):
    return ["store", "frob"], "No such command 'frob'; see mergelab store --help"


def _case_unknown_root_option(tmp, api):
    return ["--bogus"], "No such option: --bogus; see mergelab --help"


CASES = [v for k, v in sorted(globals().items()) if k.startswith("_case_")]


@pytest.mark.parametrize("case", CASES, ids=lambda f: f.__name__.removeprefix("_case_"))
def test_a_third_party_error_is_one_early_line(case, tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with contextlib.ExitStack() as stack:
        args, *messages = case(tmp_path, lambda url: stack.enter_context(temporary_settings({PREFECT_API_URL: url})))
        before = set(tmp_path.rglob("*"))
        result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"}, prog_name="mergelab")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("store ")]  # the announced store
    assert len(lines) == 1 and lines[0].startswith("error: ") and all(m in lines[0] for m in messages), result.stderr
    assert "Traceback" not in result.output and "╭" not in result.output, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert set(tmp_path.rglob("*")) == before, "a refused command wrote something"
