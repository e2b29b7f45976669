"""The one exception type for bad user input.

Validation happens at the edges (checkpoint loading, study specs, the CLI); inner code trusts
its inputs. An :class:`InputError` message is a single line that names the problem and the fix;
the CLI prints it on stderr and exits with code 2.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["InputError", "check_writable", "read_text", "safetensors_os_errors"]


class InputError(ValueError):
    """Bad input from a user: a path, a checkpoint, a config value or a flag.

    The message is flattened to one line so the CLI can print it as is.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def check_writable(path: str | os.PathLike[str], what: str, *, directory: bool = False) -> None:
    """Raise :class:`InputError` unless ``path`` can be created (or, when it exists, written) here.

    ``what`` names the flag or field in the message ("--out", "store"). With ``directory`` an
    existing ``path`` must be a directory. Checked before work starts, so that a bad location
    fails in a second instead of after a long computation. Writing is probed by creating (and
    removing) a temporary file there.
    """
    path = Path(path)
    dead = next((p for p in (path, *path.parents) if p.is_symlink() and not p.exists()), None)
    if dead is not None:
        raise InputError(f"{what} {path}: {dead} is a symbolic link that leads nowhere (its target is missing or it loops); "
                         "fix or remove the link")
    if path.exists():
        if directory and not path.is_dir():
            raise InputError(f"{what} {path} is a file, not a directory; pass a directory or a new path")
        parent = path if path.is_dir() else path.parent
    else:
        parent = path.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise InputError(f"{what} {path} lies under {parent}, which is a file; choose a path under a directory")
    try:  # a probe, not os.access: /proc, read-only mounts and ACLs answer os.access wrongly
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise InputError(f"{what} {path}: cannot write in {parent} ({err.strerror or err}); choose a location you can write to") from None


def read_text(path: str | os.PathLike[str], what: str) -> str:
    """The UTF-8 text of the file ``path``; a file that cannot be read or is not UTF-8 is an
    :class:`InputError` naming ``what`` (``"study file"``) and the path."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{what} {path} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from None
    except OSError as err:
        raise InputError(f"cannot read {what} {path}: {err.strerror or err}; check that it is a file you may read") from None


@contextlib.contextmanager
def safetensors_os_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """safetensors reports a failed write or read (a full disk, a vanished folder) as a ``SafetensorError``
    ending in ``(os error N)``; inside this block it becomes the ``OSError`` it is, naming ``path``, which
    the CLI prints as one line (:func:`mergelab_app.cli.app.system_error`)."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as err:
        found = re.search(r"os error (\d+)", str(err))
        if found is None:
            raise
        code = int(found[1])
        raise OSError(code, os.strerror(code), os.fspath(path)) from None
