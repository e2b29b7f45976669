"""``mergelab run``, ``demo``, ``analyze``, ``serve`` and ``report``: studies and their notebooks."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Optional

import typer
from rich.table import Table

from mergelab_app.cli.app import announce_store, milestone, progress_bars, RegistryHelp, StoreOpt, _Command, app, console, err_console, warn
from mergelab.errors import InputError, check_writable

if TYPE_CHECKING:
    from rich.progress import Progress


# run / demo -------------------------------------------------------------------------------------

RunnerOpt = Annotated[str, typer.Option("--runner", help="Task runner: thread[=WORKERS] (default), dask (a local cluster) or dask=ADDRESS.")]


def _default_study() -> Path:
    from mergelab.study_files import DEFAULT_STUDY, find_study

    found = find_study(DEFAULT_STUDY)
    if found is None:
        raise InputError(f"{DEFAULT_STUDY} not found; run from the mergelab checkout or pass a study file to `mergelab run`")
    return found


#: The most notebooks ``report --jobs`` runs at once (each is a kernel process).
MAX_JOBS = 64


def _run_study(study: Path, store: str | None, runner: str):
    """Run the ``study`` flow with rich progress bars; print what ran and what was cached.

    An unchanged study (every node's artifact already in the store) is confirmed in this
    process without starting Prefect, so a rerun costs seconds.
    """
    from mergelab.config import load_study

    spec = load_study(study)  # validate before torch, xarray or Prefect load: bad input fails in a second
    spec.check_bench_files()
    from mergelab.model.placement import resolve_device

    resolve_device(spec.device)  # a device this machine lacks (issue 30 probe 494): before Prefect starts, not in the flow
    from mergelab.store import Store
    from mergelab.study import up_to_date
    from mergelab_flows.runtime import parse_runner

    parse_runner(runner)
    url = announce_store(spec.store_url(store))
    cached = up_to_date(spec, url)
    if cached is not None:
        run_nodes, done = cached
        run = {"nodes": run_nodes, "results": done.key if done else None, "store": Store(url).url}
    else:
        from mergelab_flows.study import study_flow

        run = _run_flow(study_flow, runner, study=str(study), store=url)
    _summary(spec.name, run)
    return spec, run


def _summary(name: str, run) -> None:
    """One line: what ran, what was cached, per node kind, and where the results are."""
    from mergelab_flows.runtime import summarize

    counts = summarize(run["nodes"])
    ran = sum(c["nodes"] - c["hits"] for c in counts.values())
    hits = sum(c["hits"] for c in counts.values())
    detail = ", ".join(f"{kind} {c['nodes'] - c['hits']}/{c['nodes']}" for kind, c in counts.items())
    verdict = "every node was a cache hit" if ran == 0 else f"{ran} nodes computed, {hits} cache hits"
    where = f"results {run['results']} in {run['store']}" if run.get("results") else f"store {run['store']}"
    console.print(f"study {name}: {verdict} (computed/total: {detail}); {where}", soft_wrap=True, highlight=False)


class _Stopped(Exception):
    """SIGTERM, raised in the main thread by :func:`_run_flow`'s handler."""


def _run_flow(flow, runner: str, **params):
    """A study flow on ``--runner`` with one progress bar per node kind (on stderr); when stderr is
    not a terminal (CI logs, ``nohup``), plain lines: every tenth of a phase and its end.

    The flow runs in a worker thread while the main thread waits for it and for signals: SIGINT
    or SIGTERM stops the run at once (exit 130 / 143), abandoning the nodes that are running;
    what they were writing stays in the store's staging area, never published, and a rerun
    resumes from the published nodes.
    """
    import contextlib
    import signal
    import threading

    from mergelab_flows.runtime import quiet_input_errors, start_ephemeral_server, task_runner

    chosen = task_runner(runner)
    from mergelab_flows.study import set_progress

    listen, counts, progress = _node_progress()
    outcome: dict[str, object] = {}

    def work() -> None:
        try:
            outcome["result"] = flow.with_options(task_runner=chosen)(**params)
        except BaseException as err:  # handed to the main thread below
            outcome["error"] = err

    start_ephemeral_server()
    quiet_input_errors()  # a node's InputError is this command's one-line error, not a logged traceback
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    worker = threading.Thread(target=work, name="mergelab-flow", daemon=True)
    try:
        with progress if progress is not None else contextlib.nullcontext():
            set_progress(listen)
            worker.start()
            while worker.is_alive():
                worker.join(0.2)
    except (KeyboardInterrupt, _Stopped) as interrupt:
        _exit_stopped(interrupt, counts)
    finally:
        set_progress(None)
        signal.signal(signal.SIGTERM, previous)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["result"]


def _node_progress() -> tuple[Callable[[str, int, Any], None], dict[str, list[int]], Progress | None]:
    """Step 1 of :func:`_run_flow`: the listener of finished nodes, the (done, cached) counts per phase it keeps, and the progress
    bars it advances (``None`` when stderr is not a terminal: plain lines instead)."""
    terminal = err_console.is_terminal
    bars: dict[str, int] = {}
    counts: dict[str, list[int]] = {}
    progress = progress_bars("{task.fields[hits]} cached", description="{task.description:>10}") if terminal else None

    def listen(phase: str, total: int, result) -> None:
        done = counts.setdefault(phase, [0, 0])
        if result is not None:
            done[0], done[1] = done[0] + 1, done[1] + int(result.hit)
        if progress is None:
            if result is not None:
                milestone(phase, done[0], total, f" nodes done ({done[1]} cached)")
            return
        if phase not in bars:
            bars[phase] = progress.add_task(phase, total=total, hits=0)
        if result is not None:
            progress.update(bars[phase], advance=1, hits=done[1])

    return listen, counts, progress


def _raise_stopped(signum, frame) -> None:
    """:func:`_run_flow`'s SIGTERM handler: :class:`_Stopped` in the main thread."""
    raise _Stopped(signum)


def _exit_stopped(interrupt: BaseException, counts: Mapping[str, list[int]]) -> NoReturn:
    """Step 2 of :func:`_run_flow` on SIGINT or SIGTERM: say how to resume, stop the server, exit at once (130 / 143)."""
    import os

    from mergelab_flows.runtime import stop_ephemeral_server

    published = sum(done for done, _ in counts.values())
    err_console.print(f"stopped; rerun the same command to resume from {published} published node{'' if published == 1 else 's'}",
                      highlight=False)
    stop_ephemeral_server()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(143 if isinstance(interrupt, _Stopped) else 130)  # running nodes are abandoned, not awaited


WideOpt = Annotated[bool, typer.Option("--wide", help="Configurations inline in the results table (wider than 80 columns).")]


def _print_results(spec, run, wide: bool = False) -> None:
    """The results table, 80 columns wide: configurations are numbered and listed under it (``wide``:
    inline), a merge below zero-shot is marked ``↓``, grid edges are warned about."""
    from rich import box

    from mergelab.store import Store
    from mergelab.study import grid_edges, results_table, unselected

    if not run.get("results"):
        console.print(f"study {spec.name} merges nothing: no results table (its analyses are under studies/{spec.name}/)", highlight=False)
        return
    ds = Store(run["store"]).get_dataset(run["results"])
    frame = results_table(ds)
    zeroshot = float(frame.loc[frame["method"] == "zeroshot", "norm_acc"].iloc[0])
    configs = [c for c in dict.fromkeys(frame["config"]) if c != "-"]
    below = [m not in ("zeroshot", "finetuned") and a < zeroshot for m, a in zip(frame["method"], frame["norm_acc"])]
    if not wide:
        frame["config"] = [c if c == "-" else str(configs.index(c) + 1) for c in frame["config"]]
        frame = frame.rename(columns={"config": "cfg", "norm_acc": "norm", "peak_mb": "MiB"})
        if "vs TA 95%" in frame:  # 80 columns: the gap over TA with its significance mark, the interval in --wide
            ta = frame.loc[frame["method"] == "task_arithmetic", "norm"]
            frame["vs TA 95%"] = [label if label != label or label == "—" or ta.empty else f"{n - ta.iloc[0]:+.1f}" + "*" * label.endswith("*")
                                  for n, label in zip(frame["norm"], frame["vs TA 95%"])]
            frame = frame.rename(columns={"vs TA 95%": "ΔTA"})
    console.print(f"{spec.name}: selected configuration per method × space ({ds.attrs['note']}; test split, "
                  f"selection on {ds.attrs['selection']})", highlight=False, soft_wrap=wide)
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), pad_edge=False)
    for column in frame.columns:
        text = column in ("method", "space", "config", "cfg")
        table.add_column(column, justify="left" if text else "right", overflow="fold", no_wrap=column != "config")
    norm = list(frame.columns).index("norm" if not wide else "norm_acc")
    for low, row in zip(below, frame.itertuples(index=False)):
        cells = [v if isinstance(v, str) else ("—" if v != v else f"{v:.1f}" if abs(v) >= 1 else f"{v:.3f}") for v in row]
        cells[norm] += "↓" if low else " "
        table.add_row(*cells)
    console.print(table)
    if not wide:
        for i, config in enumerate(configs, 1):
            console.print(f"  cfg {i}: {config}", highlight=False, soft_wrap=True)
    console.print("norm(_acc), acc, hits@1: % (mean over tasks; ↓: below zero-shot); merge_s: wall seconds of the merge; "
                  "MiB: its peak extra memory; |Δcoef|: mean change of an adaptive run's coefficients from its start; "
                  + ("ΔTA: gain over task arithmetic in points (*: its 95 % paired bootstrap interval excludes 0; --wide shows it)"
                     if not wide else "vs TA 95%: paired bootstrap interval of the gain over task arithmetic in points (*: significant)"),
                  highlight=False)
    missing = unselected(ds)
    zero = [t for t in ds.attrs["tasks"] if missing
            and float(ds["reference_score"].sel(reference="finetuned", task=t, metric="val_acc")) == 0]
    for method, space in missing:
        why = f" ({', '.join(zero)}: fine-tuned val accuracy 0, so normalised accuracy is undefined)" if zero else ""
        console.print(f"warning: {method}/{space} merged but no configuration could be selected on val{why}; it has no row "
                      "above (its scores are in the results Dataset; selection: tas needs no accuracy)", style="yellow",
                      highlight=False, soft_wrap=True)
    for (method, space, config), names in grid_edges(ds).items():
        console.print(f"warning: {method}/{space} selected {config}, on the edge of its grid in {', '.join(names)}; "
                      "widen that grid in the study", style="yellow", highlight=False)


@app.command(cls=_Command)
def run(
    study: Annotated[Path, typer.Argument(help="A study YAML file (see studies/micro.yaml).")],
    store: StoreOpt = None,
    runner: RunnerOpt = "thread",
    wide: WideOpt = False,
) -> None:
    """Run a whole study: stage, merge sweep, adaptation, evaluation, selection, analyses, results.

    Every node is cached in the store under its content key: a rerun computes only what changed.
    """
    spec, result = _run_study(study, store, runner)
    _print_results(spec, result, wide)


@app.command(cls=_Command)
def demo(store: StoreOpt = None, runner: RunnerOpt = "thread", wide: WideOpt = False) -> None:
    """Run the embedded default study (studies/micro.yaml, the shipped micro benchmark) and print its table."""
    spec, result = _run_study(_default_study(), store, runner)
    _print_results(spec, result, wide)


def _analysis_choices() -> str:
    from mergelab.experiments.registry import ANALYSES

    return f"Analyses (--analysis): {', '.join(ANALYSES)}."


class _AnalyzeCommand(RegistryHelp):
    listing = staticmethod(_analysis_choices)


@app.command(cls=_AnalyzeCommand)
def analyze(
    study: Annotated[Path, typer.Argument(help="A study YAML file (see studies/micro.yaml).")],
    analyses: Annotated[Optional[list[str]], typer.Option("--analysis", help="Run this analysis (repeatable; default: the study's analyses:).")] = None,
    store: StoreOpt = None,
    runner: RunnerOpt = "thread",
) -> None:
    """Run a study's analyses (weight statistics, spectra, coverage, Jacobians, proxies) into the store.

    Each Dataset is published as ``studies/<name>/analysis/<analysis>`` (schemas in docs/store.md);
    analyses of merged models use the selected merges of the study's last ``mergelab run``.
    """
    from mergelab.experiments.registry import ANALYSES
    from mergelab.config import load_study
    from mergelab.study import analyses_up_to_date

    spec = load_study(study)
    names = list(analyses or spec.analyses)
    ANALYSES.require(*names)
    if not names:
        raise InputError(f"study {spec.name} lists no analyses:; pass --analysis NAME (one of {', '.join(ANALYSES)})")
    from mergelab.model.placement import resolve_device
    from mergelab_flows.runtime import parse_runner

    resolve_device(spec.device)
    parse_runner(runner)
    url = announce_store(spec.store_url(store))
    cached = analyses_up_to_date(spec, url, names)  # fails in seconds, before Prefect starts, when the study has not run
    if cached is not None:
        run = {"nodes": cached, "store": url}
    else:
        from mergelab_flows.study import analyze_flow

        run = _run_flow(analyze_flow, runner, study=str(study), store=url, analyses=names)
    _summary(spec.name, run)
    table = Table(title=f"{spec.name}: analyses (xr.open_zarr of the store's dataset_url; schemas in docs/store.md)", title_justify="left")
    for column in ("analysis", "ref", "dims"):
        table.add_column(column)
    from mergelab.store import Store

    published = Store(url)
    for result in (r for r in run["nodes"] if r.node == "analysis"):
        ds = published.get_dataset(result.key, load=False)
        table.add_row(result.label, f"studies/{spec.name}/analysis/{result.label}", ", ".join(f"{d} {n}" for d, n in ds.sizes.items()))
    console.print(table)


@app.command(cls=_Command)
def serve(
    study: Annotated[Path, typer.Argument(help="A study YAML file; re-read on every scheduled run.")],
    cron: Annotated[str, typer.Option("--cron", help="Cron schedule, e.g. \"0 3 * * *\" (03:00 every day).")] = "0 3 * * *",
    name: Annotated[Optional[str], typer.Option(help="Deployment name (default: the study's name).")] = None,
    store: StoreOpt = None,
    register_only: Annotated[bool, typer.Option("--register-only", help="Register the deployment and return instead of serving it.")] = False,
) -> None:
    """Register the study as a scheduled Prefect deployment and serve it (runs until interrupted).

    Needs a Prefect server that outlives this command (``prefect server start``; set
    ``PREFECT_API_URL``). With ``--register-only`` a worker of your work pool runs it instead.
    """
    from mergelab.config import load_study

    spec = load_study(study)
    from mergelab_flows.study import check_server, deployment, register_deployment, serve_deployments

    scheduled = deployment(study, spec, cron=cron, name=name, store=announce_store(spec.store_url(store)))
    url = check_server("--register-only" if register_only else "serve", warn=warn)
    if register_only:
        deployment_id = register_deployment(scheduled)
        console.print(f"registered deployment study/{scheduled.name} ({deployment_id}) on cron {cron!r}", highlight=False)
        return
    console.print(f"serving study/{scheduled.name} on cron {cron!r}; Ctrl-C stops", highlight=False)
    serve_deployments(scheduled, url=url, warn=warn)


@app.command(cls=_Command)
def report(
    store: StoreOpt = None,
    study: Annotated[str, typer.Option(help="The study whose Datasets the notebooks draw: a study file or a name (studies/NAME.yaml gives its store).")] = "micro",
    out: Annotated[Path, typer.Option(help="Where the HTML pages, figures (PNG, PDF) and tables are written.")] = Path("data/reports"),
    notebooks: Annotated[Optional[list[Path]], typer.Option("--notebook", help="Run only these notebooks (default: notebooks/*.ipynb).")] = None,
    jobs: Annotated[Optional[int], typer.Option("--jobs", min=1, max=MAX_JOBS, help="Notebooks run at once (default: half the CPU cores, at most one per notebook).")] = None,
) -> None:
    """Execute the notebooks against the store; write each as HTML plus its figures (PNG and PDF) and tables under --out.

    A figure drawn by a cell tagged paper:<item> is written as <notebook>/<item>.png and .pdf, other
    figures as <notebook>/fig-NN.png and .pdf, a tagged cell's tables as <notebook>/<item>.html;
    index.html lists the paper figures and tables drawn. One progress line per notebook goes to stderr.
    """
    import contextlib

    from mergelab.config import load_study
    from mergelab.outputs import check_apart, check_own_folder
    from mergelab.store import Store, default_store_url
    from mergelab.study_files import find_study

    found = find_study(study)
    if found is not None:
        spec = load_study(found)
        study, url = spec.name, spec.store_url(store)
    else:
        url = store or default_store_url()
    announce_store(url)
    if f"studies/{study}/results" not in Store(url).refs() and not any(r.startswith(f"studies/{study}/") for r in Store(url).refs()):
        raise InputError(f"store {url} has no study {study!r}; run `mergelab run` (or `make demo`) first, or pass --store/--study")
    check_writable(out, "--out", directory=True)  # before the notebooks run, not after
    check_apart(out, store=Store(url).local_root)  # its pages would land among the store's objects (issue 30 probe 628)
    check_own_folder(out, "index.html")  # not among a folder of other files (issue 30 fresh probe 629: the shipped adapters)
    from mergelab_app.report import list_notebooks  # nbformat and Jupyter: after the checks (issue 30 probe 626-627)
    from mergelab_app.report import report as run_report
    from mergelab_app.report_export import INDEX

    paths = notebooks or list_notebooks()
    params = {"STORE": str(Path(url).resolve()) if "://" not in url else url, "STUDY": study}
    # a spinner under a terminal; in a log, only the plain progress lines
    status = (err_console.status(f"executing {len(paths)} notebooks against {url} (study {study})") if err_console.is_terminal
              else contextlib.nullcontext())
    with status:
        written = run_report(paths, params, out_dir=out, jobs=jobs,
                             progress=lambda line: err_console.print(line, markup=False, highlight=False, soft_wrap=True))
    pages = sum(p.suffix == ".html" and p.parent == out and p.name != INDEX for p in written)
    tables = sum(p.suffix == ".html" and p.parent != out for p in written)
    pngs, pdfs = (sum(p.suffix == suffix for p in written) for suffix in (".png", ".pdf"))
    console.print(f"wrote {pages} HTML reports, {pngs} figures ({pngs} PNG, {pdfs} PDF) and {tables} tables under {out}; "
                  f"the paper figures and tables drawn are listed in {out / INDEX}", highlight=False, soft_wrap=True)


