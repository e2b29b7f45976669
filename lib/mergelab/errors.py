"""The one exception type for bad user input.

Validation happens at the edges (checkpoint loading, study specs, the CLI); inner code trusts
its inputs. An :class:`InputError` message is a single line that names the problem and the fix;
the CLI prints it on stderr and exits with code 2.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["InputError", "check_writable"]


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
    fails in a second instead of after a long computation.
    """
    path = Path(path)
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
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{what} {path}: no permission to write in {parent}; choose a location you can write to")
