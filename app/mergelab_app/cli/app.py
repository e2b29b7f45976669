"""The ``mergelab`` command line (Typer). ``mergelab --help`` lists every command.

Bad input (:class:`~mergelab.errors.InputError`) prints one line on stderr and exits with code
2, and so does a filesystem or decoding error below the checked paths (``OSError``,
``UnicodeError``, ``RecursionError``: :func:`system_error`); other unexpected errors keep their traceback.
"""

from __future__ import annotations

import errno
import re
import warnings
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from typer._click.exceptions import NoArgsIsHelpError, UsageError  # Typer 0.29 vendors Click: its usage errors
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from mergelab import __version__
from mergelab.errors import InputError

__all__ = ["BaseModuleOpt", "StoreOpt", "announce_store", "app", "console", "err_console", "invocation", "key_values", "main", "milestone",
           "progress_bars", "store_app", "warn"]

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


class RegistryHelp(_Command):
    """Appends the choices of the registries a command reads (``listing()``) to its help, importing
    them only when the help is shown; the help ends, as click's does, where a ``\\f`` line starts the
    docstring's notes for readers of the code."""

    listing: staticmethod

    def format_help(self, ctx, formatter):
        own = self.__dict__.setdefault("_own_help", (self.help or "").partition("\f")[0].rstrip())
        self.help = f"{own}\n\n{self.listing()}"  # read now: entries registered after import are listed too
        return super().format_help(ctx, formatter)


def warn(line: str) -> None:
    """One ``warning:`` line on stderr."""
    err_console.print(f"warning: {line}", style="yellow", markup=False, highlight=False, soft_wrap=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for a command: the message as one :func:`warn` line, without the
    source line Python prints (``adapter 'x' sets fan_in_fan_out: true, but …``)."""
    warn(" ".join(str(message).split()))


#: What to do about a filesystem error, by errno (:func:`system_error`).
_FIXES = {errno.ENOSPC: "free some space or choose another location (--out / --store)",
          errno.EDQUOT: "free some space or choose another location (--out / --store)",
          errno.ENAMETOOLONG: "choose shorter names", errno.ELOOP: "fix the symbolic link (it points to itself)",
          errno.EACCES: "check the permissions", errno.EPERM: "check the permissions",
          errno.EROFS: "choose a location on a writable filesystem", errno.EISDIR: "pass a file, not a folder",
          errno.ENOTDIR: "a part of the path is a file, not a folder; fix the path"}


def system_error(err: OSError | UnicodeError | RecursionError) -> InputError:
    """A filesystem or decoding error below the checked paths as one line naming the path and a fix
    (a path already checked can still be unreadable, full, too long or a link loop when it is used)."""
    if isinstance(err, OSError):
        where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None) or "a file"
        fix = _FIXES.get(err.errno or 0, "check the path")
        return InputError(f"{where}: {err.strerror or type(err).__name__}; {fix}")
    if isinstance(err, UnicodeError):
        return InputError(f"an input is not UTF-8 text ({err}); save it as UTF-8")
    return InputError("an input nests deeper than Python can read; flatten it")


def usage_error(err: UsageError) -> InputError:
    """Click's usage error (a bad option value or type, a missing option, an unknown command) as one
    line naming the command's ``--help``, instead of Click's boxed usage block."""
    command = err.ctx.command_path if err.ctx is not None else "mergelab"
    return InputError(f"{err.format_message().rstrip('.')}; see {command} --help")


class _Group(_TidyHelp, TyperGroup):
    """Turns InputError raised anywhere below, filesystem and decoding errors (:func:`system_error`)
    and Click's usage errors (:func:`usage_error`) into a one-line message and exit code 2; Python
    warnings into one ``warning:`` line each."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except NoArgsIsHelpError:
            raise
        except UsageError as err:  # the group's own options (mergelab --bogus)
            _fail(usage_error(err))

    def invoke(self, ctx):
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            try:
                return super().invoke(ctx)
            except NoArgsIsHelpError:
                raise
            except UsageError as err:
                _fail(usage_error(err))
            except (OSError, UnicodeError, RecursionError) as err:
                _fail(system_error(err))
            except InputError as err:
                _fail(err)


def _fail(err: InputError) -> None:
    err_console.print(f"error: {err}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code=2) from None


app = typer.Typer(cls=_Group, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="mergelab: merge fine-tuned models and LoRA adapters in full, KnOTS and Core space.")
store_app = typer.Typer(cls=_Group, no_args_is_help=True, help="List and clean the artifact store.")
app.add_typer(store_app, name="store")

BaseModuleOpt = Annotated[Optional[str], typer.Option("--base-module", help="The sub-module of a whole-model --base the adapters were trained on (e.g. visual: open_clip's image tower; default: found from the names and the adapter config).")]
StoreOpt = Annotated[Optional[str], typer.Option("--store", help="Store URL or path (default: $MERGELAB_STORE, else a study's store: or store/ next to the study file; without a study the checkout's data/store, the demo's, or ~/.cache/mergelab/store outside a checkout).")]


def progress_bars(*fields: str, description: str = "{task.description}", out: Console = err_console, transient: bool = False):
    """The CLI's one progress display (on stderr): a description, a bar, ``k/n``, one text column per
    entry of ``fields`` (rich templates such as ``"{task.fields[hits]} cached"``) and the elapsed time."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), *map(TextColumn, fields), TimeElapsedColumn(),
                    console=out, transient=transient)


class PlainProgress:
    """What the long builds report through when stderr is not a terminal: ``add_task`` / ``advance``
    as rich's ``Progress`` takes them, each task's :func:`milestone` lines in place of a live bar."""

    def __init__(self) -> None:
        self._tasks: list[list] = []  # [description, done, total]

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, **fields: object) -> int:
        self._tasks.append([description, 0, total])
        return len(self._tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        task = self._tasks[task_id]
        task[1] += advance
        if task[2]:
            milestone(task[0], int(task[1]), int(task[2]), " steps")


def build_progress(out: Console) -> Any:
    """The builds' progress: live bars on a terminal, plain milestone lines otherwise (a log, ``nohup``)."""
    return progress_bars(out=out) if out.is_terminal else PlainProgress()


def milestone(what: str, done: int, total: int, detail: str = "") -> None:
    """A plain progress line on stderr, ``WHAT: DONE/TOTAL DETAIL``, at every tenth of ``total`` and at
    its end: what a log shows in place of a live bar when stderr is not a terminal (CI, ``nohup``,
    a redirected run)."""
    if done % max(1, total // 10) == 0 or done == total:
        err_console.print(f"{what}: {done}/{total}{detail}", markup=False, highlight=False, soft_wrap=True)


def announce_store(url: str) -> str:
    """Print the first line of a command that uses a store, ``store <path or URL>`` (a local path
    absolute), and return ``url``: which store a command reads and writes is never a guess."""
    import os

    console.print(f"store {url if '://' in url else os.path.abspath(url)}", markup=False, highlight=False, soft_wrap=True)
    return url


def key_values(items: list[str] | None, flag: str) -> dict[str, str]:
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


def invocation(ctx: typer.Context) -> str:
    """The shell command that reproduces this invocation of a command: ``mergelab <command>``, every
    option given a value other than its default by its first name (a repeatable one repeated), in
    declaration order, then the arguments."""
    import shlex

    words, arguments = ["mergelab", ctx.info_name or ""], []
    for param in ctx.command.params:
        value = ctx.params.get(param.name or "")
        if value is None or value == param.default or value in ((), []):
            continue
        values = [str(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        if isinstance(param, TyperArgument):
            arguments += values
        elif getattr(param, "is_flag", False):
            words.append(param.opts[0])
        else:
            words += [word for v in values for word in (param.opts[0], v)]
    return shlex.join([*words, *arguments])


def _version(value: bool) -> None:
    if value:
        console.print(f"mergelab {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """mergelab: merge fine-tuned models and LoRA adapters in full, KnOTS and Core space."""



def main() -> None:
    app()


if __name__ == "__main__":
    main()

