"""mergelab.lazy_mapping: values made on every read, never kept; unknown names never reach make."""

from __future__ import annotations

import pytest

from mergelab.lazy_mapping import LazyMapping


def test_every_read_makes_the_value_again_and_an_unknown_name_never_reaches_make():
    made = []
    lazy = LazyMapping(["b", "a"], lambda name: made.append(name) or name.upper())
    assert list(lazy) == ["b", "a"] and len(lazy) == 2 and "a" in lazy and "c" not in lazy
    assert lazy["a"] == lazy["a"] == "A" and made == ["a", "a"]
    with pytest.raises(KeyError):
        lazy["c"]
    assert dict(lazy) == {"b": "B", "a": "A"} and made == ["a", "a", "b", "a"]


def test_a_subclass_makes_its_own_values_and_adds_names():
    class Squares(LazyMapping[int]):
        def __init__(self) -> None:
            super().__init__(())

        def _make(self, name: str) -> int:
            return int(name) ** 2

    squares = Squares()
    assert len(squares) == 0
    squares._add("3")
    assert dict(squares) == {"3": 9}
