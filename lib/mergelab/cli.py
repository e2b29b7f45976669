"""The ``mergelab`` command line (Typer). ``mergelab --help`` lists every command.

Bad input (:class:`~mergelab.errors.InputError`) prints one line on stderr and exits with code
2; unexpected errors keep their traceback.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from mergelab import __version__
from mergelab.errors import InputError, check_writable

__all__ = ["app", "main"]

console = Console()
err_console = Console(stderr=True)


def _tidy_metavar(param: TyperOption | TyperArgument, ctx: typer.Context) -> None:
    """A flag shows no value placeholder; a repeatable value shows ``<str>...``, not ``<list[str]>``."""
    if param.metavar is not None or not isinstance(param, (TyperOption, TyperArgument)):
        return
    if isinstance(param, TyperOption) and param.is_flag:
        param.metavar = ""
        return
    repeated = re.fullmatch(r"<list\[(\w+)\]>", param.display_type(ctx))
    if repeated and isinstance(param, TyperOption):
        param.metavar = f"<{repeated[1]}>..."
    elif repeated:  # an argument's metavar would replace its name; its type column is display_type's
        param.display_type = lambda ctx, shown=f"<{repeated[1]}>": shown


class _TidyHelp:
    """Mixed into the CLI's command classes: ``--help`` metavars through :func:`_tidy_metavar`."""

    def get_params(self, ctx: typer.Context) -> list:
        params = super().get_params(ctx)
        for param in params:
            _tidy_metavar(param, ctx)
        return params


class _Command(_TidyHelp, TyperCommand):
    """Every command of the CLI (``@app.command(cls=_Command)``)."""


class _Group(_TidyHelp, TyperGroup):
    """Turns InputError raised anywhere below into a one-line message and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except InputError as err:
            err_console.print(f"error: {err}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None


app = typer.Typer(cls=_Group, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="mergelab: merge fine-tuned models and LoRA adapters in full, KnOTS and Core space.")
store_app = typer.Typer(cls=_Group, no_args_is_help=True, help="List and clean the artifact store.")
app.add_typer(store_app, name="store")

BaseModuleOpt = Annotated[Optional[str], typer.Option("--base-module", help="The sub-module of a whole-model --base the adapters were trained on (e.g. visual: open_clip's image tower; default: found from the names and the adapter config).")]
StoreOpt = Annotated[Optional[str], typer.Option("--store", help="Store URL or path (default: $MERGELAB_STORE, else the study's store: or store/ next to the study file; without a study ~/.cache/mergelab/store).")]


def _version(value: bool) -> None:
    if value:
        console.print(f"mergelab {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """mergelab: merge fine-tuned models and LoRA adapters in full, KnOTS and Core space."""


# inspect ----------------------------------------------------------------------------------------


@app.command(cls=_Command)
def inspect(
    paths: Annotated[Optional[list[str]], typer.Argument(help="PEFT adapter directories or full checkpoints (NAME=PATH to name a task).")] = None,
    base: Annotated[Optional[str], typer.Option(help="Base model weights (file or directory); required for full checkpoints.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")] = False,
    base_module: BaseModuleOpt = None,
) -> None:
    """Show each source's targeted modules, ranks, alphas, scaling and per-module update norms."""
    from mergelab.checkpoints import describe_sources

    report = describe_sources(paths or [], base=base, base_module=base_module)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    for source in report:
        table = Table(title=f"{source['task']}  ({source['format']}, {len(source['modules'])} modules, hash {source['content_hash'][:12]})",
                      title_justify="left")
        for column in ("module", "shape", "rank", "alpha", "scaling", "‖ΔW‖_F"):
            table.add_column(column, justify="left" if column == "module" else "right", overflow="fold")
        for m in source["modules"]:
            table.add_row(m["name"], "×".join(map(str, m["shape"])), str(m.get("rank", "—")), _fmt(m.get("alpha")),
                          _fmt(m.get("scaling")), f"{m['norm']:.4g}")
        console.print(table)
        console.print(f"source: {source['source']}   total ‖τ‖: {source['total_norm']:.4g}\n")


@app.command(cls=_Command)
def check(
    paths: Annotated[Optional[list[str]], typer.Argument(help="PEFT adapter directories or full checkpoints (NAME=PATH to name a task).")] = None,
    base: Annotated[Optional[str], typer.Option(help="Base model weights: the adapters' shapes are checked against its header.")] = None,
    base_module: BaseModuleOpt = None,
    data: Annotated[Optional[list[str]], typer.Option("--data", help="NAME=ROOT of a task's ImageFolder data (ROOT/val, ROOT/test; repeatable): images in two splits are reported.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")] = False,
) -> None:
    """Preflight from metadata only, in seconds: ranks, α, rsLoRA, targets, dtypes, module overlap,
    shapes against the base and val/test overlap of the data. Exit 1 when something would stop or
    skew a merge."""
    from mergelab.preflight import check as preflight

    found = preflight(paths or [], base=base, base_module=base_module, data=_key_values(data, "--data"))
    if as_json:
        sys.stdout.write(json.dumps(found.to_json(), indent=2) + "\n")
    else:
        table = Table(title=f"{len(found.tasks)} adapters", title_justify="left")
        for column in ("task", "r", "alpha", "rsLoRA", "scaling", "modules", "dtypes"):
            table.add_column(column, justify="left" if column in ("task", "dtypes") else "right", overflow="fold")
        for t in found.tasks:
            rank = f"{t.rank}" + (f" ({len(t.rank_pattern)} patterns)" if t.rank_pattern else "")
            table.add_row(t.task, rank, _fmt(t.alpha), "yes" if t.rslora else "no", _fmt(t.scaling), str(len(t.modules)), ", ".join(t.dtypes))
        console.print(table)
        for note in found.notes:
            console.print(f"note: {note}", highlight=False, soft_wrap=True)
        for problem in found.problems:
            console.print(f"problem: {problem}", style="yellow", highlight=False, soft_wrap=True)
        console.print("ready to merge" if not found.problems else f"{len(found.problems)} problem(s)", highlight=False)
    if found.problems:
        raise typer.Exit(code=1)


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


# run / demo -------------------------------------------------------------------------------------

RunnerOpt = Annotated[str, typer.Option("--runner", help="Task runner: thread[=WORKERS] (default), dask (a local cluster) or dask=ADDRESS.")]
#: The embedded default study, found from the working directory or the source checkout.
DEFAULT_STUDY = Path("studies/micro.yaml")


def _study_file(study: str | Path) -> Path | None:
    """``study`` itself if it is a file, else ``studies/<study>.yaml`` in the working directory or the
    source checkout; None when neither exists."""
    named = Path(study) if Path(study).is_file() else DEFAULT_STUDY.with_name(f"{study}.yaml")
    for candidate in (named, Path(__file__).resolve().parents[2] / named):
        if candidate.is_file():
            return candidate
    return None


def _default_study() -> Path:
    found = _study_file(DEFAULT_STUDY)
    if found is None:
        raise InputError(f"{DEFAULT_STUDY} not found; run from the mergelab checkout or pass a study file to `mergelab run`")
    return found


def _run_study(study: Path, store: str | None, runner: str):
    """Run the ``study`` flow with rich progress bars; print what ran and what was cached.

    An unchanged study (every node's artifact already in the store) is confirmed in this
    process without starting Prefect, so a rerun costs seconds.
    """
    from mergelab.config import load_study
    from mergelab.store import Store
    from mergelab.study import up_to_date

    spec = load_study(study)  # validate before Prefect starts: bad input fails in a second
    from flows.runtime import parse_runner

    parse_runner(runner)
    url = spec.store_url(store)
    cached = up_to_date(spec, url)
    if cached is not None:
        run_nodes, done = cached
        run = {"nodes": run_nodes, "results": done.key if done else None, "store": Store(url).url}
    else:
        from flows.study import study_flow

        run = _run_flow(study_flow, runner, study=str(study), store=url)
    _summary(spec.name, run)
    return spec, run


def _summary(name: str, run) -> None:
    """One line: what ran, what was cached, per node kind, and where the results are."""
    from flows.runtime import summarize

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
    import os
    import signal
    import threading

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from flows.runtime import start_ephemeral_server, stop_ephemeral_server, task_runner

    chosen = task_runner(runner)
    from flows.study import set_progress

    terminal = err_console.is_terminal
    bars: dict[str, int] = {}
    counts: dict[str, list[int]] = {}
    progress = Progress(TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[hits]} cached"),
                        TimeElapsedColumn(), console=err_console, transient=False) if terminal else None

    def listen(phase: str, total: int, result) -> None:
        done = counts.setdefault(phase, [0, 0])
        if result is not None:
            done[0], done[1] = done[0] + 1, done[1] + int(result.hit)
        if progress is None:
            if result is not None and (done[0] % max(1, total // 10) == 0 or done[0] == total):
                err_console.print(f"{phase}: {done[0]}/{total} nodes done ({done[1]} cached)", highlight=False)
            return
        if phase not in bars:
            bars[phase] = progress.add_task(phase, total=total, hits=0)
        if result is not None:
            progress.update(bars[phase], advance=1, hits=done[1])

    def stop(signum, frame) -> None:
        raise _Stopped(signum)

    outcome: dict[str, object] = {}

    def work() -> None:
        try:
            outcome["result"] = flow.with_options(task_runner=chosen)(**params)
        except BaseException as err:  # handed to the main thread below
            outcome["error"] = err

    start_ephemeral_server()
    previous = signal.signal(signal.SIGTERM, stop)
    worker = threading.Thread(target=work, name="mergelab-flow", daemon=True)
    try:
        with progress if progress is not None else contextlib.nullcontext():
            set_progress(listen)
            worker.start()
            while worker.is_alive():
                worker.join(0.2)
    except (KeyboardInterrupt, _Stopped) as interrupt:
        published = sum(done for done, _ in counts.values())
        err_console.print(f"stopped; rerun the same command to resume from {published} published node{'' if published == 1 else 's'}", highlight=False)
        stop_ephemeral_server()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(143 if isinstance(interrupt, _Stopped) else 130)  # running nodes are abandoned, not awaited
    finally:
        set_progress(None)
        signal.signal(signal.SIGTERM, previous)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["result"]


WideOpt = Annotated[bool, typer.Option("--wide", help="Configurations inline in the results table (wider than 80 columns).")]


def _print_results(spec, run, wide: bool = False) -> None:
    """The results table, 80 columns wide: configurations are numbered and listed under it (``wide``:
    inline), a merge below zero-shot is marked ``↓``, grid edges are warned about."""
    from rich import box

    from mergelab.store import Store
    from mergelab.study import grid_edges, results_table

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
                  "MiB: its peak extra memory; |Δcoef|: mean change of an adaptive run's coefficients from its start",
                  highlight=False)
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


@app.command(cls=_Command)
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
    from mergelab.analysis.registry import ANALYSES
    from mergelab.config import load_study
    from mergelab.study import analyses_up_to_date

    spec = load_study(study)
    names = list(analyses or spec.analyses)
    unknown = [n for n in names if n not in ANALYSES]
    if unknown:
        raise InputError(f"unknown analysis {unknown[0]!r}; allowed: {', '.join(ANALYSES)}")
    if not names:
        raise InputError(f"study {spec.name} lists no analyses:; pass --analysis NAME (one of {', '.join(ANALYSES)})")
    from flows.runtime import parse_runner

    parse_runner(runner)
    url = spec.store_url(store)
    cached = analyses_up_to_date(spec, url, names)  # fails in seconds, before Prefect starts, when the study has not run
    if cached is not None:
        run = {"nodes": cached, "store": url}
    else:
        from flows.study import analyze_flow

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
    from flows.study import deployment, register_deployment, serve_deployments

    scheduled = deployment(study, spec, cron=cron, name=name, store=spec.store_url(store))
    if register_only:
        deployment_id = register_deployment(scheduled)
        console.print(f"registered deployment study/{scheduled.name} ({deployment_id}) on cron {cron!r}", highlight=False)
        return
    console.print(f"serving study/{scheduled.name} on cron {cron!r}; Ctrl-C stops", highlight=False)
    serve_deployments(scheduled)


@app.command(cls=_Command)
def report(
    store: StoreOpt = None,
    study: Annotated[str, typer.Option(help="The study whose Datasets the notebooks draw: a study file or a name (studies/NAME.yaml gives its store).")] = "micro",
    out: Annotated[Path, typer.Option(help="Where HTML and PNG files are written.")] = Path("data/reports"),
    notebooks: Annotated[Optional[list[Path]], typer.Option("--notebook", help="Run only these notebooks (default: notebooks/*.ipynb).")] = None,
    jobs: Annotated[Optional[int], typer.Option("--jobs", min=1, help="Notebooks run at once (default: half the CPU cores, at most one per notebook).")] = None,
) -> None:
    """Execute the notebooks against the store; write each as HTML plus its figures as PNG under --out.

    A figure drawn by a cell tagged paper:<item> is written as <notebook>/<item>.png, other figures
    as <notebook>/fig-NN.png; index.html lists the paper figures and tables drawn. One progress line
    per notebook goes to stderr.
    """
    import contextlib

    from analysis.report import INDEX, list_notebooks
    from analysis.report import report as run_report
    from mergelab.config import load_study
    from mergelab.store import Store, default_store_url

    found = _study_file(study)
    if found is not None:
        spec = load_study(found)
        study, url = spec.name, spec.store_url(store)
    else:
        url = store or default_store_url()
    if f"studies/{study}/results" not in Store(url).refs() and not any(r.startswith(f"studies/{study}/") for r in Store(url).refs()):
        raise InputError(f"store {url} has no study {study!r}; run `mergelab run` (or `make demo`) first, or pass --store/--study")
    paths = notebooks or list_notebooks()
    params = {"STORE": str(Path(url).resolve()) if "://" not in url else url, "STUDY": study}
    # a spinner under a terminal; in a log, only the plain progress lines
    status = err_console.status(f"executing {len(paths)} notebooks against {url} (study {study})") if err_console.is_terminal else contextlib.nullcontext()
    with status:
        written = run_report(paths, params, out_dir=out, jobs=jobs,
                             progress=lambda line: err_console.print(line, markup=False, highlight=False, soft_wrap=True))
    pngs = sum(p.suffix == ".png" for p in written)
    console.print(f"wrote {len(written) - pngs - 1} HTML reports and {pngs} figures under {out}; "
                  f"the paper figures and tables drawn are listed in {out / INDEX}", highlight=False, soft_wrap=True)


# merge -------------------------------------------------------------------------------------------


def _key_values(items: list[str] | None, flag: str) -> dict[str, str]:
    """``KEY=VALUE`` strings into a dict (values stay strings; the registry coerces them)."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"{flag} {item!r} is not KEY=VALUE; e.g. {flag} alpha=0.3")
        if key.strip() in out:
            raise InputError(f"{flag} sets {key.strip()!r} twice")
        out[key.strip()] = value.strip()
    return out


def _read_grams(path: Path, taskset) -> dict[str, dict[str, object]]:
    """A safetensors file of ``"<task>::<module>"`` Gram matrices -> ``{task: {module: G}}``."""
    from mergelab.checkpoints import load_state_dict

    if not path.is_file():
        raise InputError(f"--grams {path} is not a file; pass a safetensors file of '<task>::<module>' Gram matrices")
    grams: dict[str, dict[str, object]] = {name: {} for name in taskset.names}
    for key, tensor in load_state_dict(path).items():
        task, sep, module = key.partition("::")
        if not sep or task not in grams:
            raise InputError(f"--grams {path}: key {key!r} is not '<task>::<module>' for a task in {list(taskset.names)}")
        grams[task][module] = tensor
    return grams


def _check_output(fmt: str, out: Path, force: bool) -> None:
    """``--format`` and ``--out`` checked before any work (``save_merged`` checks again when writing)."""
    if fmt not in ("peft", "weights"):
        raise InputError(f"--format {fmt!r} is not one of peft, weights")
    if out.exists() and not force:
        raise InputError(f"output {out} already exists; choose another path or pass --force")
    check_writable(out, "--out")


def _grid(items: list[str] | None) -> dict[str, list]:
    """``--grid KEY=V1,V2`` into ``{KEY: [V1, V2]}`` (values parsed as YAML scalars: numbers stay numbers)."""
    import yaml

    return {k: [yaml.safe_load(v) for v in values.split(",")] for k, values in _key_values(items, "--grid").items()}


def _bench(bench: str, taskset, base: str):
    """``--bench``: ``micro`` (the shipped benchmark) or a study YAML whose bench and tasks evaluate;
    returns its section and the bench set up to run ``taskset``'s adapters."""
    from mergelab.bench import load_bench
    from mergelab.checkpoints import load_state_dict
    from mergelab.config import BenchSpec, load_study
    from mergelab.onbench import bench_for

    if bench == "micro":
        root = next((c for c in (Path("data/micro"), Path(__file__).resolve().parents[2] / "data/micro") if c.is_dir()), Path("data/micro"))
        spec, tasks = BenchSpec(root=root), None
    else:
        if not Path(bench).is_file():
            raise InputError(f"--bench {bench!r} is neither 'micro' nor a study YAML file; pass micro or a study whose bench: and tasks: evaluate")
        study = load_study(Path(bench))
        spec, tasks = study.bench, study.tasks
    return spec, bench_for(load_bench(spec, tasks), taskset, load_state_dict(base))


def _select(taskset, base: str, method: str, space: str, rule: str, bench: str, fixed: dict[str, str], grid: dict[str, list], store: str):
    """Pick ``method``'s hyper-parameters by ``rule`` on the benchmark's val split (progress on stderr)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mergelab.onbench import RULES, select_hyper_parameters, swept_grid

    swept_grid(method, fixed, grid)  # a too-large grid fails before the benchmark loads
    spec, evaluating = _bench(bench, taskset, base)
    with Progress(TextColumn("select {task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[hits]} cached"),
                  TimeElapsedColumn(), console=err_console) as progress:
        bar = progress.add_task(f"{method}/{space} by {rule}", total=None, hits=0)

        def listen(result, total: int) -> None:
            progress.update(bar, total=total, advance=1, hits=progress.tasks[bar].fields["hits"] + int(result.hit))

        chosen = select_hyper_parameters(evaluating, spec, method, space, rule, fixed, store, grid=grid, progress=listen)
    metric, higher = RULES[rule]
    table = Table(title=f"{method}/{space} on {evaluating.name} val: {'max' if higher else 'min'} mean {metric} selects",
                  title_justify="left")
    table.add_column("config")
    table.add_column(metric, justify="right")
    table.add_column("")
    for label, value in zip(chosen.criterion.config.values, chosen.criterion.values, strict=True):
        table.add_row(str(label), f"{value:.4f}", "selected" if label == chosen.label else "")
    console.print(table)
    return chosen


class _MergeCommand(_Command):
    """Appends the registries' method and space names to the help, importing them only then."""

    def format_help(self, ctx, formatter):
        if "Methods:" not in (self.help or ""):
            self.help = f"{self.help}\n\n{_method_list()}"
        return super().format_help(ctx, formatter)


@app.command("merge", cls=_MergeCommand)
def merge_command(
    paths: Annotated[Optional[list[str]], typer.Argument(help="More adapter directories (so that --adapters A B C works).", show_default=False)] = None,
    adapters: Annotated[Optional[list[str]], typer.Option("--adapters", help="PEFT adapter directories or full checkpoints (NAME=PATH names a task): --adapters A B C.")] = None,
    base: Annotated[str, typer.Option("--base", help="Base model weights (file or directory).")] = ...,  # type: ignore[assignment]
    base_module: BaseModuleOpt = None,
    method: Annotated[str, typer.Option("--method", help="A merge method (the list above) or a '+' composition such as tsv+iso_c.")] = ...,  # type: ignore[assignment]
    space: Annotated[str, typer.Option("--space", help="Merge space: full, knots or core.")] = "full",
    sets: Annotated[Optional[list[str]], typer.Option("--set", help="Hyper-parameter KEY=VALUE (repeatable); composed methods take METHOD.KEY=VALUE.")] = None,
    space_sets: Annotated[Optional[list[str]], typer.Option("--space-option", help="Space option KEY=VALUE, e.g. naive=true, variant=per_layer.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Output directory.")] = ...,  # type: ignore[assignment]
    fmt: Annotated[str, typer.Option("--format", help="peft (a LoRA adapter; needs a low-rank result) or weights (merged full weights).")] = "peft",
    max_rank: Annotated[Optional[int], typer.Option("--max-rank", help="Cap the PEFT adapter's rank (a server's max_lora_rank): modules above it keep their best rank-R approximation; the relative error per module goes to merge.json.")] = None,
    grams: Annotated[Optional[Path], typer.Option("--grams", help="RegMean input Gram matrices: safetensors with keys '<task>::<module>'.")] = None,
    modules: Annotated[Optional[list[str]], typer.Option("--modules", help="Regular expressions over parameter names to merge (repeatable).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
    select: Annotated[Optional[str], typer.Option("--select", help="Pick the hyper-parameters from the method's grid on the val split: val (normalised accuracy) or tas (task alignment score, unlabeled).")] = None,
    grid: Annotated[Optional[list[str]], typer.Option("--grid", help="With --select: KEY=V1,V2,... replaces the values swept for KEY (repeatable).")] = None,
    bench: Annotated[str, typer.Option("--bench", help="With --select: the benchmark that evaluates, micro or a study YAML (its bench: and tasks:).")] = "micro",
    store: StoreOpt = None,
) -> None:
    """Merge adapters / fine-tunes with one method in one space; write a PEFT adapter or merged weights.

    The configuration (method, space, hyper-parameters with defaults filled in, task hashes)
    and the result's provenance go to the store as a JSON artifact. With ``--select`` every
    configuration of the method's grid (less the ``--set`` ones) is merged and evaluated on the
    benchmark's val split first (cached in the store; the test split never selects).
    """
    import time

    from mergelab.checkpoints import cap_rank, load_taskset, save_merged
    from mergelab.merging import METHODS, merge
    from mergelab.onbench import RULES
    from mergelab.spaces import get_space
    from mergelab.store import Store

    sources = [*(adapters or []), *(paths or [])]
    if not sources:
        raise InputError("no adapters given; pass --adapters DIR [DIR ...]")
    if max_rank is not None and (fmt != "peft" or max_rank < 1):
        raise InputError(f"--max-rank {max_rank} caps a PEFT adapter's rank; give an integer >= 1 with --format peft")
    _check_output(fmt, out, force)
    spec = METHODS[method]
    fixed = _key_values(sets, "--set")
    hyper_parameters = spec.resolve(fixed)
    sp = get_space(space, **_key_values(space_sets, "--space-option"))
    if grid and select is None:
        raise InputError("--grid lists values to select from; add --select val or --select tas")
    if select is not None and select not in RULES:
        raise InputError(f"--select {select!r} is not one of {', '.join(RULES)}")
    if select is not None and (grams or modules or space_sets):
        raise InputError("--select evaluates whole models merged with default space options; drop --grams, --modules and --space-option")
    s = Store(store)
    taskset = load_taskset(base, sources, modules=modules, base_module=base_module)
    selection = None
    if select is not None:
        selection = _select(taskset, base, spec.name, sp.name, select, bench, fixed, _grid(grid), s.url)
        hyper_parameters = spec.resolve({**fixed, **selection.config})
    side_inputs = {"grams": _read_grams(grams, taskset)} if grams is not None else None
    start = time.perf_counter()
    merged = merge(taskset, spec.name, sp, side_inputs=side_inputs, **hyper_parameters)
    merge_time = time.perf_counter() - start
    capped: dict[str, float] = {}
    if max_rank is not None:
        merged, capped = cap_rank(merged, max_rank)
    written = save_merged(merged, out, format=fmt, base=base, overwrite=force)  # type: ignore[arg-type]
    config = {"method": spec.name, "space": sp.name, "space_options": sp.options(), "hyper_parameters": merged.meta["hyper_parameters"],
              **({"max_rank": max_rank} if max_rank is not None else {})}
    key = s.key("merge.config", "1", taskset=taskset, **config, **({"selection": select} if select else {}))
    record = {**config, "tasks": [{"name": t.name, "source": t.source, "content_hash": t.content_hash} for t in taskset],
              "base": taskset.base.__dict__, "result_content_hash": merged.content_hash, "output": str(written.resolve()),
              "format": fmt, "ranks": {m: getattr(u, "rank", None) for m, u in merged.modules.items()},
              "merge_time_s": round(merge_time, 4)}
    if selection is not None:
        record["selection"] = {"rule": selection.rule, "chosen": selection.label, "results": str(selection.results),
                               "ref": f"studies/{selection.name}/results",
                               "criterion": dict(zip(map(str, selection.criterion.config.values), map(float, selection.criterion.values)))}
    if not s.exists(key):
        s.put_json(key, record)
    kind = "PEFT adapter" if fmt == "peft" else "merged weights"
    chosen = "" if selection is None else f" ({selection.label}, selected by {selection.rule})"
    console.print(f"merged {len(taskset)} tasks with {spec.name}{chosen} in {sp.name} space -> {written} ({kind}); "
                  f"configuration stored as {key} in {s.url}", soft_wrap=True)
    if max_rank is not None:
        worst = f", largest relative error {max(capped.values()):.3g}" if capped else ""
        console.print(f"rank capped at {max_rank}: {len(capped)} of {len(merged.modules)} modules truncated{worst} (per module in merge.json)",
                      highlight=False)


def _method_list() -> str:
    from mergelab.merging import METHODS
    from mergelab.spaces import SPACES

    described = "; ".join(f"{name} ({', '.join(f'{p.name}={p.default}' for p in method.params.values()) or 'none'})"
                          for name, method in METHODS.items())
    return (f"Methods and their hyper-parameters (defaults; set with --set KEY=VALUE): {described}. "
            f"Compose with '+', e.g. tsv+iso_c. Spaces: {', '.join(SPACES)}.")


@app.command("adapt", cls=_Command)
def adapt_command(
    paths: Annotated[Optional[list[str]], typer.Argument(help="More adapter directories (so that --adapters A B C works).", show_default=False)] = None,
    adapters: Annotated[Optional[list[str]], typer.Option("--adapters", help="PEFT adapter directories (NAME=PATH names a task after a benchmark task).")] = None,
    base: Annotated[str, typer.Option("--base", help="Base model weights (file or directory): the benchmark's pre-trained model.")] = ...,  # type: ignore[assignment]
    base_module: BaseModuleOpt = None,
    method: Annotated[str, typer.Option("--method", help="adamerging, adamerging_tas, tara_a, tara_b or adarank.")] = ...,  # type: ignore[assignment]
    preference: Annotated[Optional[str], typer.Option("--preference", help="Task preference ρ, one weight per task on the simplex: 0.5,0.25,0.25 (default: uniform).")] = None,
    iters: Annotated[int, typer.Option("--iters", help="Optimisation steps (the papers: 250 or 500).")] = 250,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate.")] = 1e-3,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Unlabeled val images per task and step.")] = 16,
    objective: Annotated[Optional[str], typer.Option("--objective", help="entropy, tas or labels (labels needs --allow-labels); default: the method's.")] = None,
    scalarization: Annotated[Optional[str], typer.Option("--scalarization", help="sum or stch (smooth Tchebycheff, 001 Eq. 10); default: the method's.")] = None,
    alpha: Annotated[float, typer.Option("--alpha", help="STCH smoothing α.")] = 1.0,
    sets: Annotated[Optional[list[str]], typer.Option("--set", help="Method option KEY=VALUE (repeatable), e.g. space=core, origin=cart, init=0.3.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the batch order and the initialisation.")] = 0,
    allow_labels: Annotated[bool, typer.Option("--allow-labels", help="Allow --objective labels (uses val labels).")] = False,
    bench: Annotated[str, typer.Option("--bench", help="The benchmark whose unlabeled val images adapt and whose splits evaluate: micro or a study YAML.")] = "micro",
    out: Annotated[Path, typer.Option("--out", help="Output directory.")] = ...,  # type: ignore[assignment]
    fmt: Annotated[str, typer.Option("--format", help="peft (a LoRA adapter; low-rank results) or weights (merged full weights).")] = "peft",
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
    store: StoreOpt = None,
) -> None:
    """Adapt merge coefficients at test time on a benchmark's unlabeled val images; write the merge.

    The run and its history (loss curve, coefficients or masks) are cached in the store and
    published as the study ``adapt-<method>-<taskset>``; the test split only evaluates.
    """
    import yaml

    from mergelab.adaptation.objectives import validate_preference
    from mergelab.checkpoints import load_taskset, save_merged
    from mergelab.config import load_study
    from mergelab.onbench import adapt_on_bench
    from mergelab.store import Store

    sources = [*(adapters or []), *(paths or [])]
    if not sources:
        raise InputError("no adapters given; pass --adapters DIR [DIR ...]")
    _check_output(fmt, out, force)
    weights = None
    if preference is not None:
        try:
            weights = [float(w) for w in preference.split(",")]
        except ValueError:
            raise InputError(f"--preference {preference!r} is not comma-separated numbers, e.g. 0.5,0.5") from None
    adaptive = {"method": method, "iters": iters, "lr": lr, "batch_size": batch_size, "alpha": alpha, "preference": weights,
                "objective": objective, "scalarization": scalarization,
                "hp": {k: yaml.safe_load(v) for k, v in _key_values(sets, "--set").items()}}
    adaptive = {k: v for k, v in adaptive.items() if v is not None}
    load_study({"name": "adapt", "adaptive": [adaptive], "allow_labels": allow_labels})  # bad options fail before anything loads
    validate_preference(weights, len(sources))
    taskset = load_taskset(base, sources, base_module=base_module)
    spec, evaluating = _bench(bench, taskset, base)
    s = Store(store)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(f"adapt {method}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                  TimeElapsedColumn(), console=err_console) as progress:
        bar = progress.add_task(method, total=iters, loss="…")
        result = adapt_on_bench(evaluating, spec, taskset, adaptive, s.url, seed=seed, allow_labels=allow_labels,
                                progress=lambda it, loss: progress.update(bar, completed=it, loss=f"{loss:.4f}"))
        progress.update(bar, completed=iters)
    written = save_merged(result.merged, out, format=fmt, base=base, overwrite=force)
    table = Table(title=f"{method} on {evaluating.name} ({'adapted now' if result.computed else 'cached run'}; "
                        "normalised by each fine-tuned model)", title_justify="left")
    for column in ("task", "val acc %", "test acc %", "test norm acc %"):
        table.add_column(column, justify="left" if column == "task" else "right")
    columns = ("val_acc", "acc", "norm_acc")
    for task in [*map(str, result.scores.task.values), "mean"]:
        values = result.scores.mean("task") if task == "mean" else result.scores.sel(task=task)
        table.add_row(task, *(f"{100 * float(values.sel(metric=c)):.1f}" for c in columns))
    console.print(table)
    kind = "PEFT adapter" if fmt == "peft" else "merged weights"
    console.print(f"adapted {len(taskset)} tasks with {method} ({iters} iterations, {1000 * result.seconds_per_iter:.0f} ms each) "
                  f"-> {written} ({kind}); history studies/{result.name}/adapt/{method} in {s.url}", soft_wrap=True, highlight=False)


# build-micro ---------------------------------------------------------------------------------------


@app.command("build-micro", cls=_Command)
def build_micro_command(
    quick: Annotated[bool, typer.Option("--quick", help="Fewer images and steps (proves the build path in minutes).")] = False,
    out: Annotated[Path, typer.Option(help="Where the benchmark's artifacts are exported.")] = Path("data/micro"),
    store: StoreOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of the task generators and every training run.")] = 0,
    threads: Annotated[int, typer.Option(help="torch threads (1 avoids oversubscribing a shared 2-core machine).")] = 1,
) -> None:
    """Build the embedded micro benchmark: pre-trained tiny CLIP, LoRA adapters, dense suite, README."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mergelab.micro.build import build_micro

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        result = build_micro(out, store, profile="quick" if quick else "full", seed=seed, threads=threads,
                             progress=progress)
    metrics = result.manifest["metrics"]
    mean = lambda d: 100 * sum(d.values()) / len(d)  # noqa: E731
    state = "wrote" if result.wrote else "up to date, nothing written:"
    ft = ", ".join(f"r{r} {mean(d):.1f} %" for r, d in metrics["finetuned"].items())
    console.print(f"{state} {out} ({result.elapsed_s:.1f} s). Micro-benchmark mean accuracy: zero-shot "
                  f"{mean(metrics['zero_shot']):.1f} %, LoRA fine-tuned {ft}. See {out / 'README.md'}.")


# store -------------------------------------------------------------------------------------------


@store_app.command("ls", cls=_Command)
def store_ls(store: StoreOpt = None, as_json: Annotated[bool, typer.Option("--json", help="A JSON list of the artifacts (key, kind, producer, created, name) instead of the table.")] = False) -> None:
    """List published artifacts: key, kind, producer, creation time."""
    from mergelab.store import Store

    s = Store(store)
    items = s.ls()
    refs = {v: k for k, v in s.refs().items()}
    if as_json:
        sys.stdout.write(json.dumps([{"key": a.key, "kind": a.kind, "producer": a.producer, "created": a.created,
                                      "name": refs.get(a.key)} for a in items], indent=2) + "\n")
        return
    table = Table(title=f"{s.url}: {len(items)} artifacts", title_justify="left")
    for column in ("key", "kind", "producer", "created", "name"):
        table.add_column(column, overflow="fold")
    for a in items:
        table.add_row(a.key, a.kind, a.producer, a.created, refs.get(a.key, ""))
    console.print(table)


@store_app.command("gc", cls=_Command)
def store_gc(
    store: StoreOpt = None,
    keep: Annotated[Optional[Path], typer.Option(help="File with the keys still in use, one per line; others are removed too.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be removed.")] = False,
    lease: Annotated[float, typer.Option(help="Seconds a write may be in flight: younger leftovers are kept (a live run's).")] = 3600.0,
) -> None:
    """Remove unpublished leftovers older than --lease (and, with --keep, every unreferenced artifact)."""
    from mergelab.store import Store

    if lease < 0:
        raise InputError(f"--lease {lease} is negative; give the seconds a write may take (default 3600)")

    keys = None
    if keep is not None:
        if not keep.is_file():
            raise InputError(f"--keep file {keep} does not exist; write the keys to keep one per line")
        keys = {line.strip() for line in keep.read_text().splitlines() if line.strip()}
    removed = Store(store).gc(keys, dry_run=dry_run, lease_s=lease)
    verb = "would remove" if dry_run else "removed"
    console.print(f"{verb} {len(removed)} entries" + "".join(f"\n  {r}" for r in removed))


@store_app.command("verify", cls=_Command)
def store_verify(
    store: StoreOpt = None,
    quarantine: Annotated[bool, typer.Option("--quarantine", help="Move corrupt objects to quarantine/ so that a rerun recomputes them.")] = False,
) -> None:
    """Check every published artifact's payload against its digest; exit 1 when one is corrupt."""
    from mergelab.store import Store

    s = Store(store)
    problems = s.verify(quarantine=quarantine)
    for key, problem in problems:
        console.print(f"{key}: {problem}", highlight=False, soft_wrap=True)
    moved = "; moved to quarantine/, a rerun recomputes them" if quarantine and problems else ""
    console.print(f"{s.url}: {len(problems)} corrupt artifacts{moved}", highlight=False, soft_wrap=True)
    if problems:
        raise typer.Exit(code=1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
