"""One shape for every registry of the project: methods, spaces, adaptive methods,
benches, analyses, adaptation studies and selection rules.

A :class:`Registry` is a ``dict`` of named entries of one concept. Looking up a name it does not
hold raises one :class:`~mergelab.errors.InputError` line naming the concept, the name and the
allowed names, so study validation, the CLI and library calls all fail the same way; what the
CLI help and study validation list comes from the registry itself. A new entry is one
:meth:`Registry.register` call (or one line in the registry's literal).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from mergelab.errors import InputError

__all__ = ["Registry"]

E = TypeVar("E")


class Registry(dict[str, E]):
    """``{name: entry}`` of one ``concept`` (e.g. ``"merge method"``); ``hint`` ends the unknown-name error."""

    def __init__(self, concept: str, entries: Mapping[str, E] | None = None, *, hint: str = "") -> None:
        super().__init__()
        self.concept, self.hint = concept, hint
        for name, entry in (entries or {}).items():
            self.register(name, entry)

    def __missing__(self, name: str) -> E:
        raise InputError(f"unknown {self.concept} {name!r}; allowed: {', '.join(self)}{self.hint}")

    def require(self, *names: str) -> None:
        """InputError (one line, the allowed names) unless every one of ``names`` is registered."""
        for name in names:
            self[name]

    def register(self, name: str, entry: E) -> E:
        """Add ``entry`` under ``name`` (a name already taken is a programming error: ValueError)."""
        if not name or name in self:
            raise ValueError(f"{self.concept} name {name!r} is empty or taken")
        self[name] = entry
        return entry
