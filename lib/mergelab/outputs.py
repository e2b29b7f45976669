"""Output directories that commands replace (``merge --out X --force``, ``adapt``): which ones may
be deleted, and the leftovers of writes that were killed.

One rule for every writer of an output directory (:func:`check_replaceable`): an existing target
is replaced only when it is a previous mergelab output (a directory holding a readable
:data:`OUTPUT_MARKER`), is not the working directory or a folder above it, and neither is,
contains nor lies inside a protected path (the store, the command's inputs). Anything else is
bad input: one line naming the problem and the fix, and nothing is deleted.

A write goes to a hidden sibling ``.X.<8 random characters>`` (``tempfile.mkdtemp``) that its
writer holds locked (``flock``) until it is renamed into place; a kill leaves it behind, unlocked.
:func:`remove_leftovers` removes such siblings that no live writer holds: the next write to ``X``
does, and ``mergelab store gc`` for those inside a store. Before the rename, :func:`follow_umask` gives
the written tree the modes a plain ``mkdir`` / ``open`` would (``mkdtemp`` makes ``drwx------`` and
safetensors writes ``-rw-------``), so others read an output as they read any file the user writes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from mergelab.errors import InputError

__all__ = ["OUTPUT_MARKER", "check_apart", "check_own_folder", "check_replaceable", "claimed", "follow_umask", "remove_leftovers",
           "temporary_sibling"]

#: The file every output directory of ``save_merged`` holds (the merge's provenance): what marks a
#: directory as a previous mergelab output that ``--force`` may replace.
OUTPUT_MARKER = "merge.json"
#: A leftover younger than this may be a write whose directory was made but not yet locked.
GRACE_S = 5.0


def _real(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _is_output(path: Path) -> bool:
    try:
        record = json.loads((path / OUTPUT_MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(record, dict) and {"method", "content_hash"} <= set(record)


def check_replaceable(out: str | os.PathLike[str], *, store: str | os.PathLike[str] | None = None,
                      inputs: Mapping[str, str | os.PathLike[str]] | None = None, flag: str = "--out") -> None:
    """Raise :class:`InputError` unless the existing ``out`` may be deleted and replaced (module
    docstring): ``store`` is the local store's root (``out`` may neither be, contain nor lie inside
    it), ``inputs`` maps what each input is (``"adapter 'digits'"``, ``"the base"``) to its path
    (``out`` may neither be nor contain one). ``flag`` names the option in the message."""
    target = _real(out)
    shown = os.fspath(out)
    cwd = _real(os.getcwd())
    if _within(cwd, target):
        where = "the working directory" if target == cwd else f"a folder above the working directory {cwd}"
        raise InputError(f"{flag} {shown} --force would delete {where}; choose a new folder for the output")
    if store is not None and (_within(_real(store), target) or _within(target, _real(store))):
        relation = "is" if _real(store) == target else "contains" if _within(_real(store), target) else "lies inside"
        raise InputError(f"{flag} {shown} {relation} the store {os.fspath(store)}, which --force would damage; "
                         "choose an output folder outside the store")
    for what, path in (inputs or {}).items():
        if _within(_real(path), target):
            relation = "is" if _real(path) == target else "contains"
            raise InputError(f"{flag} {shown} {relation} the {what} ({os.fspath(path)}), which --force would delete; "
                             "choose an output folder apart from the inputs")
    if not target.is_dir():
        raise InputError(f"{flag} {shown} is not a folder, so not a previous mergelab output; remove it yourself or choose another {flag}")
    if not _is_output(target):
        raise InputError(f"{flag} {shown} is not a previous mergelab output (no readable {OUTPUT_MARKER}), so --force will not "
                         f"delete it; remove it yourself or choose another {flag}")


def check_apart(out: str | os.PathLike[str], *, store: str | os.PathLike[str] | None = None,
                inputs: Mapping[str, str | os.PathLike[str]] | None = None, flag: str = "--out") -> None:
    """Raise :class:`InputError` when a new ``out`` would lie inside the local ``store`` or inside an
    input's folder (``inputs`` as :func:`check_replaceable` takes them): writing there changes what
    the store or the input holds (a ``merge.json`` under ``refs/`` reads as a broken ref)."""
    target = _real(out)
    if store is not None and _within(target, _real(store)):
        raise InputError(f"{flag} {os.fspath(out)} lies inside the store {os.fspath(store)}; choose an output folder outside the store")
    for what, path in (inputs or {}).items():
        if _real(path).is_dir() and _within(target, _real(path)):
            raise InputError(f"{flag} {os.fspath(out)} lies inside the {what} ({os.fspath(path)}); "
                             "choose an output folder apart from the inputs")


def check_own_folder(out: str | os.PathLike[str], marker: str, *, flag: str = "--out") -> None:
    """Raise :class:`InputError` unless ``out`` is new, an empty folder or a previous output of the same
    command (it holds that command's ``marker`` file, as ``mergelab report``'s folders hold ``index.html``):
    a command that writes its files among a folder's own must not scatter them through a folder of other
    files (the shipped adapters, a user's documents)."""
    path = Path(out)
    if path.is_dir() and next(path.iterdir(), None) is not None and not (path / marker).is_file():
        raise InputError(f"{flag} {os.fspath(out)} is a folder of other files (no {marker} of a previous output); "
                         "pass a new or empty folder, or a previous output of this command")


def _leftover_pattern(name: str | None) -> re.Pattern[str]:
    stem = re.escape(name) if name is not None else r"[^/]+"
    return re.compile(rf"\.{stem}\.(?:old-)?[a-z0-9_]{{8}}")


def temporary_sibling(out: Path, *, old: bool = False) -> Path:
    """A new hidden directory beside ``out`` that :func:`remove_leftovers` recognises as its leftover."""
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{'old-' if old else ''}", dir=out.parent))


@functools.cache
def _umask() -> int:
    """The process's umask, read once (reading it means setting it for an instant)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Give ``path`` (a file, or a folder and everything under it) the modes a plain ``mkdir`` or
    ``open`` gives under the umask: folders ``0o777``, files ``0o666``, less the umask's bits."""
    mask = _umask()
    for entry in [path, *(path.rglob("*") if path.is_dir() else ())]:
        if not entry.is_symlink():
            entry.chmod((0o777 if entry.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def claimed(path: Path) -> Iterator[None]:
    """Hold ``path`` (a directory being written) locked, so :func:`remove_leftovers` leaves it alone.
    Where the filesystem cannot lock, the write goes on unlocked (its leftover then stays)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _abandoned(path: Path) -> bool:
    """Whether no live writer holds ``path`` (a lock can be taken now) and it is past the grace time."""
    import fcntl

    try:
        if time.time() - path.lstat().st_mtime < GRACE_S:
            return False
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # a live write (or a filesystem that cannot tell): keep it
    finally:
        os.close(fd)
    return True


def remove_leftovers(parent: str | os.PathLike[str], name: str | None = None, *, dry_run: bool = False) -> list[Path]:
    """Remove the hidden temporary directories of killed writes in ``parent`` (of the output ``name``,
    or of any output), keeping those a live writer holds. Returns what was (or would be) removed."""
    pattern = _leftover_pattern(name)
    try:
        entries = sorted(Path(parent).iterdir())
    except OSError:
        return []
    removed = []
    for path in entries:
        if pattern.fullmatch(path.name) and path.is_dir() and not path.is_symlink() and _abandoned(path):
            removed.append(path)
            if not dry_run:
                shutil.rmtree(path, ignore_errors=True)
    return removed
