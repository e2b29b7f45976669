"""The ``mergelab`` command line (Typer). ``mergelab --help`` lists every command.

Bad input (:class:`~mergelab.errors.InputError`) prints one line on stderr and exits with code
2; unexpected errors keep their traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from mergelab import __version__
from mergelab.errors import InputError

__all__ = ["app", "main"]

console = Console()
err_console = Console(stderr=True)


class _Group(TyperGroup):
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

StoreOpt = Annotated[Optional[str], typer.Option("--store", help="Store URL or path (default: $MERGELAB_STORE or data/store).")]


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


@app.command()
def inspect(
    paths: Annotated[Optional[list[str]], typer.Argument(help="PEFT adapter directories or full checkpoints (NAME=PATH to name a task).")] = None,
    base: Annotated[Optional[str], typer.Option(help="Base model weights (file or directory); required for full checkpoints.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")] = False,
) -> None:
    """Show each source's targeted modules, ranks, alphas, scaling and per-module update norms."""
    from mergelab.checkpoints import describe_sources

    report = describe_sources(paths or [], base=base)
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


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


# demo --------------------------------------------------------------------------------------------


@app.command()
def demo(store: StoreOpt = None, workdir: Annotated[Path, typer.Option(help="Where the demo's adapters are written.")] = Path("data/demo")) -> None:
    """Build a tiny PEFT adapter set, inspect it and store its per-module statistics."""
    from mergelab.analysis.geometry import norms
    from mergelab.checkpoints import load_taskset
    from mergelab.store import Store
    from mergelab.synthetic import tiny_vision_transformer, write_peft_adapters

    s = Store(store)
    model = tiny_vision_transformer(seed=0)
    names = ["digits", "textures", "signs"]
    with console.status("writing 3 PEFT LoRA adapters on a tiny open_clip ViT"):
        paths = write_peft_adapters(model, workdir / "adapters", names, target_modules=["attn"], rank=4, alpha=8)
    taskset = load_taskset(model, paths)
    inspect([str(p) for p in paths], base=None, as_json=False)
    key = s.key("geometry.norms", "1", taskset=taskset)
    if not s.exists(key):
        s.put_dataset(key, norms(taskset))
    s.set_ref("demo/norms", key)
    console.print(f"stored per-module norms of {len(taskset)} tasks × {len(taskset.module_names)} modules in {s.url} as {key}")


# build-micro ---------------------------------------------------------------------------------------


@app.command("build-micro")
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


@store_app.command("ls")
def store_ls(store: StoreOpt = None, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
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
        table.add_column(column)
    for a in items:
        table.add_row(a.key, a.kind, a.producer, a.created, refs.get(a.key, ""))
    console.print(table)


@store_app.command("gc")
def store_gc(
    store: StoreOpt = None,
    keep: Annotated[Optional[Path], typer.Option(help="File with the keys still in use, one per line; others are removed too.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be removed.")] = False,
) -> None:
    """Remove unpublished leftovers (and, with --keep, every unreferenced artifact)."""
    from mergelab.store import Store

    keys = None
    if keep is not None:
        if not keep.is_file():
            raise InputError(f"--keep file {keep} does not exist; write the keys to keep one per line")
        keys = {line.strip() for line in keep.read_text().splitlines() if line.strip()}
    removed = Store(store).gc(keys, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    console.print(f"{verb} {len(removed)} entries" + "".join(f"\n  {r}" for r in removed))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
