"""A read-only mapping whose values are made when they are read and never kept: the one shape of the
model-sized mappings (a merge's replacement parameters formed a block at a time, the tensors of a
safetensors file read one at a time, a spooled merge, its updates rebuilt module by module), so that
nothing model-sized is held whole."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

__all__ = ["LazyMapping"]

V = TypeVar("V")


class LazyMapping(Mapping[str, V]):
    """``names`` (in their order) mapped to ``make(name)``, called on every read; a name not in
    ``names`` is a ``KeyError`` and never reaches ``make``. A subclass may instead override
    :meth:`_make` (no callable that refers back to the mapping, so that it is freed as soon as it is
    dropped) and add names later with what it keeps for each (:meth:`_add`; ``self._names[name]``)."""

    def __init__(self, names: Iterable[str], make: Callable[[str], V] | None = None) -> None:
        self._names: dict[str, Any] = dict.fromkeys(names)
        self._maker = make

    def _make(self, name: str) -> V:
        assert self._maker is not None, "a LazyMapping without make overrides _make"
        return self._maker(name)

    def _add(self, name: str, entry: Any = None) -> None:
        self._names[name] = entry

    def __getitem__(self, name: str) -> V:
        if name not in self._names:
            raise KeyError(name)
        return self._make(name)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
