"""The tables of merge methods, spaces and adaptive methods in ``docs/methods.md``, rendered from
the registries (:data:`~mergelab.merging.METHODS`, :data:`~mergelab.spaces.SPACES`,
:data:`~mergelab.adaptation.ADAPTERS`), so that the docs list exactly what is registered.

Each row reads the entry itself: the paper is the title of the function's (a space's: its module's)
docstring, with the citation it carries (``"TIES-Merging (Yadav et al., 2023; 001 Sec. 4 (iii); 003
Sec. 5)"``: the summary line up to its first ``:`` or ``.`` outside parentheses); defaults come
from the signature, grids and flags from the registry entry. A document holds each table between
``<!-- catalog:<name>:begin … -->`` and ``<!-- catalog:<name>:end -->``; :func:`render` rewrites those
blocks and :func:`update` the file (``python -m mergelab.catalog docs/methods.md``).
``tests/test_method_tables.py`` fails when the committed tables differ from the rendering.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["TABLES", "adaptive_table", "citation", "method_table", "render", "space_table", "update"]


def citation(doc: str | None, *, ends: str = ":.") -> str:
    """The title of a docstring: its summary up to the first of ``ends`` (``":."``; ``"."``: the first
    sentence) followed by a space or the end, outside parentheses; whitespace collapsed, reST literals
    as Markdown code."""
    text = " ".join((inspect.cleandoc(doc or "").split("\n\n")[0]).split())
    depth = 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if depth == 0 and ch in ends and text[i + 1:i + 2] in ("", " "):
            text = text[:i]
            break
    return text.replace("``", "`")


def _value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _values(values: Sequence[Any]) -> str:
    """A grid's values, the middle elided when there are more than four."""
    shown = [_value(v) for v in values]
    return ", ".join(shown) if len(shown) <= 4 else f"{shown[0]}, {shown[1]} … {shown[-1]} ({len(shown)})"


def _settings(pairs: Iterable[tuple[str, Any]]) -> str:
    return ", ".join(f"`{k}={_value(v)}`" for k, v in pairs) or "—"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows])


def method_table() -> str:
    """One row per registered merge method: paper, defaults, the grid selection searches, what the
    function receives and whether it may follow ``+``."""
    from mergelab.merging import METHODS

    rows = []
    for name, m in METHODS.items():
        grid = "; ".join(f"`{k}`: {_values(v)}" for k, v in m.grid.items()) or "— (closed form)"
        inputs = m.inputs + "".join(f" + {s}" for s in m.side)
        rows.append((f"`{name}`", citation(m.fn.__doc__), _settings((k, p.default) for k, p in m.params.items()), grid, inputs,
                     "yes" if m.post else "—"))
    return _table(("method", "paper (the function's docstring)", "defaults", "grid searched by selection", "receives", "after `+`"),
                  rows)


def space_table() -> str:
    """One row per registered space: what it is (its module docstring's first sentence), its options
    and their defaults."""
    from mergelab.spaces import SPACES

    rows = []
    for name, space in SPACES.items():
        module = sys.modules[type(space).__module__]
        options = _settings((f.name, getattr(space, f.name)) for f in dataclasses.fields(space))
        rows.append((f"`{name}`", citation(module.__doc__, ends="."), options, f"`{module.__name__}`"))
    return _table(("space", "what it is (the module's docstring)", "options (`--space-option`)", "module"), rows)


def adaptive_table() -> str:
    """One row per registered adaptive method: paper (its builder's docstring), default objective,
    scalarisation and optimiser, the spaces it runs in, and its settings with their defaults."""
    from mergelab.adaptation import ADAPTERS

    rows = [(f"`{name}`", citation(a.build.__doc__), a.objective, a.scalarization, a.optimizer, ", ".join(a.spaces),
             _settings(a.settings.items())) for name, a in ADAPTERS.items()]
    return _table(("method", "paper (the builder's docstring)", "objective", "scalarization", "optimizer", "spaces", "settings"), rows)


#: The blocks :func:`render` fills: ``<!-- catalog:<name>:begin … -->`` → the table.
TABLES: dict[str, Callable[[], str]] = {"methods": method_table, "spaces": space_table, "adaptive": adaptive_table}
_BLOCK = re.compile(r"(<!-- catalog:(\w+):begin[^>]*-->\n).*?(<!-- catalog:\2:end -->)", re.S)


def render(text: str) -> str:
    """``text`` with every catalog block holding its table as the registries give it now."""
    return _BLOCK.sub(lambda m: m.group(1) + TABLES[m.group(2)]() + "\n" + m.group(3), text)


def update(path: str | Path) -> bool:
    """Rewrite the catalog blocks of the Markdown file ``path``; whether anything changed."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    new = render(text)
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(f"{arg}: {'rewritten' if update(arg) else 'up to date'}")
