"""``mergelab inspect``, ``check``, ``merge`` and ``adapt``: the user's adapters, outside a study."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from mergelab_app.cli.app import (announce_store, invocation, key_values, milestone, progress_bars, BaseModuleOpt, RegistryHelp, StoreOpt,
                                  _Command, app, console, err_console)
from mergelab.errors import InputError

if TYPE_CHECKING:
    import xarray as xr

    from mergelab.study.one_method import Adapted, Selection


def _written_kind(fmt: str, written: Path) -> str:
    """What ``save_merged`` wrote: one adapter / weights file, or one per task (tasks with their own heads)."""
    kind = "PEFT adapter" if fmt == "peft" else "merged weights"
    per_task = sorted(d.name for d in Path(written).iterdir() if d.is_dir())
    return f"{kind} per task, each with its own head: {', '.join(per_task)}" if per_task else kind


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
    study: Annotated[Optional[Path], typer.Option("--study", help="A real-model study YAML file (e.g. studies/papers/real/*.yaml): "
                                                                   "its files exist, its adapters fit its base, its data fit its class names.")] = None,
) -> None:
    """Preflight from metadata only, in seconds: ranks, α, rsLoRA, targets, dtypes, module overlap,
    shapes against the base and val/test overlap of the data. Exit 1 when something would stop or
    skew a merge. ``--study FILE`` checks a study instead: the study validated, then its tasks'
    adapters against its bench's weights and its image folders against its class names."""
    from mergelab.preflight import check as preflight, check_study

    if study is not None:
        if paths or base or data or base_module:
            raise InputError("--study takes the adapters, base and data from the study file; pass it alone")
        from mergelab.config import load_study

        found = check_study(load_study(study))
    else:
        found = preflight(paths or [], base=base, base_module=base_module, data=key_values(data, "--data"))
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



# merge -------------------------------------------------------------------------------------------


def _show_selection(method: str, space: str, bench, run):
    """Run a ``--select`` sweep with a progress bar (plain lines when stderr is not a terminal), then
    print every candidate's val criterion."""
    import contextlib

    from mergelab.selection import SELECTION_RULES

    terminal = err_console.is_terminal
    progress = progress_bars("{task.fields[hits]} cached", description="select {task.description}") if terminal else None
    done = [0, 0]  # nodes, cache hits

    def listen(result, total: int) -> None:
        done[0], done[1] = done[0] + 1, done[1] + int(result.hit)
        if progress is None:
            milestone(f"select {method}/{space}", done[0], total, f" nodes done ({done[1]} cached)")
        else:
            progress.update(bar, total=total, completed=done[0], hits=done[1])

    with progress if progress is not None else contextlib.nullcontext():
        bar = progress.add_task(f"{method}/{space}", total=None, hits=0) if progress is not None else None
        chosen = run(progress=listen)
    rule = SELECTION_RULES[chosen.rule]
    console.print(selection_table(chosen, f"{method}/{space} on {bench.name}: chosen by the "
                                          f"{'largest' if rule.higher_is_better else 'smallest'} mean {rule.metric} (val); "
                                          "test is recorded, never selects"))
    if chosen.edges:
        console.print(f"warning: {method}/{space} selected {chosen.label}, on the edge of its grid in {', '.join(chosen.edges)}; "
                      "widen it with --grid", style="yellow", highlight=False)
    return chosen


def adaptation_table(result: Adapted, method: str) -> Table:
    """An adaptive run's scores per task in the study tables' style (%, val beside test, normalised
    by each fine-tuned model), each beside its starting merge's (``start → adapted``), so the table
    shows whether adapting helped."""
    start = result.start
    origin = ", ".join(f"{k}={v}" for k, v in result.start_config.items()) or "the method's default"
    table = Table(title=f"{method} on {result.bench} ({'adapted now' if result.computed else 'cached run'}); "
                        + (f"start {origin} → adapted" if start is not None else "start not recorded for this cached run"),
                  title_justify="left")
    columns = (("val_norm_acc", "val norm acc %"), ("norm_acc", "test norm acc %"), ("acc", "test acc %"))
    table.add_column("task")
    for _, header in columns:
        table.add_column(header, justify="right")
    for task in [*map(str, result.scores.task.values), "mean"]:
        def at(scores: xr.DataArray, metric: str) -> float:
            values = scores.mean("task") if task == "mean" else scores.sel(task=task)
            return 100 * float(values.sel(metric=metric))
        table.add_row(task, *(f"{at(start, m):.1f} → {at(result.scores, m):.1f}" if start is not None else f"{at(result.scores, m):.1f}"
                              for m, _ in columns))
    return table


#: A selection table's columns: (metric, header, as a percentage).
SELECTION_COLUMNS = (("val_norm_acc", "val norm acc %", True), ("tas", "val TAS", False), ("norm_acc", "test norm acc %", True))


def selection_table(chosen: Selection, title: str) -> Table:
    """Every candidate of a ``--select`` sweep, in the style of a study's tables: normalised
    accuracies in %, val (what selects) beside test (recorded only); the chosen row marked, with
    ``(edge)`` when it sits on an end of its grid. TAS appears when it is the criterion."""
    columns = [c for c in SELECTION_COLUMNS if c[0] != "tas" or chosen.rule == "tas"]
    table = Table(title=title, title_justify="left")
    table.add_column("config")
    for _, header, _ in columns:
        table.add_column(header, justify="right")
    table.add_column("chosen")
    for label in map(str, chosen.candidates.config.values):
        row = chosen.candidates.sel(config=label)
        cells = [f"{(100 if pct else 1) * float(row.sel(metric=m)):.{1 if pct else 4}f}" for m, _, pct in columns]
        mark = ("✓" + (" (edge)" if chosen.edges else "")) if label == chosen.label else ""
        table.add_row(label, *cells, mark)
    return table


def _checked_sources(adapters: list[str] | None, paths: list[str] | None) -> list[str]:
    """``--adapters`` then the positional paths, their ``NAME=PATH`` task names and paths checked before
    torch or a model library loads (an empty list is the command's own error)."""
    from mergelab.checkpoints.files import named_sources

    sources = [*(adapters or []), *(paths or [])]
    if sources:
        named_sources(sources, None)
    return sources


def _merge_choices() -> str:
    from mergelab.merging import METHODS
    from mergelab.selection import SELECTION_RULES
    from mergelab.serving import SERVING_RANKS
    from mergelab.spaces import SPACES

    described = "; ".join(f"{name} ({', '.join(f'{p.name}={p.default}' for p in method.params.values()) or 'none'})"
                          for name, method in METHODS.items())
    rules = "; ".join(f"{name}: {rule.description}" for name, rule in SELECTION_RULES.items())
    engines = "; ".join(f"{name}: {', '.join(map(str, ranks))}" for name, ranks in SERVING_RANKS.items())
    return (f"Methods and their hyper-parameters (defaults; set with --set KEY=VALUE): {described}. "
            f"Compose with '+', e.g. tsv+iso_c. Spaces: {', '.join(SPACES)}. Selection rules (--select): {rules}. "
            f"Serving engines (--max-rank ENGINE or ENGINE:CAP) and the max_lora_rank values they accept: {engines}.")


def _adapt_choices() -> str:
    from mergelab.adaptation import ADAPTERS

    described = "; ".join(f"{name} ({', '.join(f'{k}={v}' for k, v in adapter.settings.items()) or 'none'})"
                          for name, adapter in ADAPTERS.items())
    return f"Adaptive methods and their settings (defaults; set with --set KEY=VALUE): {described}."


class _MergeCommand(RegistryHelp):
    listing = staticmethod(_merge_choices)


class _AdaptCommand(RegistryHelp):
    listing = staticmethod(_adapt_choices)


@app.command("merge", cls=_MergeCommand)
def merge_command(
    ctx: typer.Context,
    paths: Annotated[Optional[list[str]], typer.Argument(help="More adapter directories (so that --adapters A B C works).", show_default=False)] = None,
    adapters: Annotated[Optional[list[str]], typer.Option("--adapters", help="PEFT adapter directories or full checkpoints (NAME=PATH names a task): --adapters A B C.")] = None,
    base: Annotated[str, typer.Option("--base", help="Base model weights (file or directory).")] = ...,  # type: ignore[assignment]
    base_module: BaseModuleOpt = None,
    method: Annotated[str, typer.Option("--method", help="A merge method (the list above) or a '+' composition such as tsv+iso_c.")] = ...,  # type: ignore[assignment]
    space: Annotated[str, typer.Option("--space", help="Merge space (the spaces above).")] = "full",
    sets: Annotated[Optional[list[str]], typer.Option("--set", help="Hyper-parameter KEY=VALUE (repeatable); composed methods take METHOD.KEY=VALUE.")] = None,
    space_sets: Annotated[Optional[list[str]], typer.Option("--space-option", help="Space option KEY=VALUE, e.g. naive=true, variant=per_layer.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Output directory.")] = ...,  # type: ignore[assignment]
    fmt: Annotated[str, typer.Option("--format", help="peft (a LoRA adapter; needs a low-rank result) or weights (merged full weights).")] = "peft",
    max_rank: Annotated[Optional[str], typer.Option("--max-rank", help="Cap the PEFT adapter's rank for a server's max_lora_rank: an integer R (a warning when vLLM would not accept it), 'vllm' (the smallest rank vLLM accepts, listed below, at or above the merged rank) or 'vllm:C' (at most the largest accepted rank <= C). Modules above the rank keep their best rank-R approximation; the rank and each module's relative error go to merge.json and the card.")] = None,
    shard_size: Annotated[str, typer.Option("--shard-size", help="With --format weights: the largest weights file; a larger model is written as Hugging Face shards with model.safetensors.index.json (bytes, or KB / MB / GB / KiB / MiB / GiB).")] = "5GB",
    grams: Annotated[Optional[Path], typer.Option("--grams", help="RegMean input Gram matrices: safetensors with keys '<task>::<module>'.")] = None,
    modules: Annotated[Optional[list[str]], typer.Option("--modules", help="Regular expressions over parameter names to merge (repeatable).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
    select: Annotated[Optional[str], typer.Option("--select", help="Pick the hyper-parameters from the method's grid on the val split by a selection rule (above).")] = None,
    grid: Annotated[Optional[list[str]], typer.Option("--grid", help="With --select: KEY=V1,V2,... replaces the values swept for KEY (repeatable).")] = None,
    bench: Annotated[str, typer.Option("--bench", help="With --select: the benchmark that evaluates, micro or a study YAML (its bench: and tasks:).")] = "micro",
    store: StoreOpt = None,
) -> None:
    """Merge adapters / fine-tunes with one method in one space; write a PEFT adapter or merged weights.

    The configuration (method, space, hyper-parameters with defaults filled in, task hashes)
    and the result's provenance go to the store as a JSON artifact, to OUT/merge.json and to the
    model card OUT/README.md (with the command that reproduces the merge). With ``--select`` every
    configuration of the method's grid (less the ``--set`` ones) is merged and evaluated on the
    benchmark's val split first (cached in the store; the test split never selects).
    \f
    It takes 20 parameters because it is the ``merge`` command: Typer makes each parameter one CLI argument or option.
    """
    import yaml

    sources = _checked_sources(adapters, paths)

    from mergelab.onbench import merge_adapters
    from mergelab.store import default_store_url

    store = announce_store(store or default_store_url())
    grid_values = {k: [yaml.safe_load(v) for v in values.split(",")] for k, values in key_values(grid, "--grid").items()}
    done = merge_adapters(sources, base, method, space, out=out, fixed=key_values(sets, "--set"),
                          space_options=key_values(space_sets, "--space-option"), fmt=fmt, max_rank=max_rank, grams=grams,
                          modules=modules, force=force, select=select, grid=grid_values, bench=bench, store=store,
                          base_module=base_module, shard_size=shard_size, command=invocation(ctx), on_selection=_show_selection)
    record, selection = done.record, done.selection
    kind = _written_kind(fmt, done.written)
    chosen = "" if selection is None else f" ({selection.label}, selected by {selection.rule})"
    console.print(f"merged {len(record['tasks'])} tasks with {record['method']}{chosen} in {record['space']} space -> "
                  f"{done.written} ({kind}); configuration stored as {done.key} in {done.store}", soft_wrap=True)
    if max_rank is not None:
        worst = f", largest relative error {max(done.capped.values()):.3g}" if done.capped else ""
        rule = "" if record["max_rank_rule"] == str(record["max_rank"]) else f" (--max-rank {record['max_rank_rule']})"
        console.print(f"rank capped at {record['max_rank']}{rule}: {len(done.capped)} of {len(record['ranks'])} modules "
                      f"truncated{worst} (per module in merge.json)", highlight=False)


def _adapt_progress(method: str, iters: int):
    """The progress display of ``adapt`` (on stderr) and its callbacks for :func:`~mergelab.onbench.adapt_adapters`:
    a bar for the steps and one for the starting point searched before step 1 (AdaRank-CART's λ);
    when stderr is not a terminal, plain lines for those and for every node done (references, the
    run, its evaluation). Bars appear with their first update, so bad input prints one line."""
    terminal = err_console.is_terminal
    progress = progress_bars("loss {task.fields[loss]}", description="adapt {task.description}")
    bars: dict[str, int] = {}

    def update(bar: str, done: int, total: int, loss: str) -> None:
        progress.start()
        if bar not in bars:
            bars[bar] = progress.add_task(bar, total=total, loss=loss)
        progress.update(bars[bar], completed=done, loss=loss)

    def step(iteration: int, loss: float) -> None:
        if terminal:
            update(method, iteration, iters, f"{loss:.4f}")
        else:
            milestone(f"adapt {method}", iteration, iters, f" steps, loss {loss:.4f}")

    def scored(done: int, total: int) -> None:
        if terminal:
            update(f"{method} start", done, total, "")
        else:
            milestone(f"adapt {method}", done, total, " starting points scored on val")

    def node(result) -> None:
        if not terminal:
            err_console.print(f"adapt {method}: {result.node} {result.label} {'cached' if result.hit else 'done'}",
                              markup=False, highlight=False, soft_wrap=True)

    return progress, {"progress": step, "start_progress": scored, "on_node": node}


@app.command("adapt", cls=_AdaptCommand)
def adapt_command(
    ctx: typer.Context,
    paths: Annotated[Optional[list[str]], typer.Argument(help="More adapter directories (so that --adapters A B C works).", show_default=False)] = None,
    adapters: Annotated[Optional[list[str]], typer.Option("--adapters", help="PEFT adapter directories (NAME=PATH names a task after a benchmark task).")] = None,
    base: Annotated[str, typer.Option("--base", help="Base model weights (file or directory): the benchmark's pre-trained model.")] = ...,  # type: ignore[assignment]
    base_module: BaseModuleOpt = None,
    method: Annotated[str, typer.Option("--method", help="An adaptive method (the list above).")] = ...,  # type: ignore[assignment]
    preference: Annotated[Optional[str], typer.Option("--preference", help="Task preference ρ, one weight per task on the simplex: 0.5,0.25,0.25 (default: uniform).")] = None,
    iters: Annotated[int, typer.Option("--iters", help="Optimisation steps (the papers: 250 or 500).")] = 250,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate.")] = 1e-3,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Unlabeled val images per task and step.")] = 16,
    objective: Annotated[Optional[str], typer.Option("--objective", help="entropy, tas or labels (labels needs --allow-labels); default: the method's.")] = None,
    scalarization: Annotated[Optional[str], typer.Option("--scalarization", help="sum, stch (smooth Tchebycheff, 001 Eq. 10 as printed: |f_t - z_t|) or stch_signed (f_t - z_t, TARA's code); default: the method's.")] = None,
    alpha: Annotated[float, typer.Option("--alpha", help="STCH smoothing α.")] = 1.0,
    sets: Annotated[Optional[list[str]], typer.Option("--set", help="Method option KEY=VALUE (repeatable), e.g. space=core, origin=cart, init=0.3.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the batch order and the initialisation.")] = 0,
    allow_labels: Annotated[bool, typer.Option("--allow-labels", help="Allow --objective labels (uses val labels).")] = False,
    bench: Annotated[str, typer.Option("--bench", help="The benchmark whose unlabeled val images adapt and whose splits evaluate: micro or a study YAML.")] = "micro",
    out: Annotated[Path, typer.Option("--out", help="Output directory.")] = ...,  # type: ignore[assignment]
    fmt: Annotated[str, typer.Option("--format", help="peft (a LoRA adapter; low-rank results) or weights (merged full weights).")] = "peft",
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
    shard_size: Annotated[str, typer.Option("--shard-size", help="With --format weights: the largest weights file; a larger model is written as Hugging Face shards with model.safetensors.index.json (bytes, or KB / MB / GB / KiB / MiB / GiB).")] = "5GB",
    store: StoreOpt = None,
) -> None:
    """Adapt merge coefficients at test time on a benchmark's unlabeled val images; write the merge.

    The run and its history (loss curve, coefficients or masks) are cached in the store and
    published as the study ``adapt-<method>-<taskset>``; the test split only evaluates.
    \f
    It takes 22 parameters because it is the ``adapt`` command: Typer makes each parameter one CLI argument or option.
    """
    import yaml

    sources = _checked_sources(adapters, paths)

    from mergelab.onbench import adapt_adapters
    from mergelab.store import default_store_url

    store = announce_store(store or default_store_url())
    weights = None
    if preference is not None:
        try:
            weights = [float(w) for w in preference.split(",")]
        except ValueError:
            raise InputError(f"--preference {preference!r} is not comma-separated numbers, e.g. 0.5,0.5") from None
    adaptive = {"method": method, "iters": iters, "lr": lr, "batch_size": batch_size, "alpha": alpha, "preference": weights,
                "objective": objective, "scalarization": scalarization,
                "hp": {k: yaml.safe_load(v) for k, v in key_values(sets, "--set").items()}}
    adaptive = {k: v for k, v in adaptive.items() if v is not None}
    progress, listeners = _adapt_progress(method, iters)
    try:
        result, written, url = adapt_adapters(sources, base, adaptive, out=out, fmt=fmt, force=force,
                                              seed=seed, allow_labels=allow_labels, bench=bench, store=store,
                                              base_module=base_module, shard_size=shard_size, command=invocation(ctx), **listeners)
    finally:
        progress.stop()
    console.print(adaptation_table(result, method))
    kind = _written_kind(fmt, written)
    console.print(f"adapted {result.scores.sizes['task']} tasks with {method} ({iters} iterations, {1000 * result.seconds_per_iter:.0f} ms "
                  f"each) -> {written} ({kind}); history studies/{result.name}/adapt/{method} in {url}", soft_wrap=True, highlight=False)


