"""The shape of the four wings' code (issue 32 item 7): no module over 400 lines, no function over 60
lines or with more than 6 parameters, except where the function's docstring says why.

A parameter is any entry of the signature (positional, keyword-only, ``*args``, ``**kwargs``) but a
method's ``self`` / ``cls``. The reason is a sentence of the docstring that names the number:
``takes <N> parameters`` for a wide signature, ``is <N> lines`` for a long body (for ``__init__``, the
class docstring counts too), so that a reason goes stale, and fails here, when the function changes.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO
from test_wings import WINGS, files

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
MAX_PARAMETERS = 6

Function = ast.FunctionDef | ast.AsyncFunctionDef


def parameter_count(args: ast.arguments) -> int:
    """Every entry of a signature, less a leading ``self`` or ``cls``."""
    positional = [*args.posonlyargs, *args.args]
    bound = 1 if positional and positional[0].arg in ("self", "cls") else 0
    return len(positional) - bound + len(args.kwonlyargs) + (args.vararg is not None) + (args.kwarg is not None)


def functions(tree: ast.Module) -> Iterator[tuple[Function, str]]:
    """Every function and method, with the docstring text that may give its reasons (whitespace
    folded; an ``__init__``'s class docstring appended)."""
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, Function):
                docs = [ast.get_docstring(child) or ""]
                if child.name == "__init__" and isinstance(node, ast.ClassDef):
                    docs.append(ast.get_docstring(node) or "")
                yield child, " ".join(" ".join(docs).split())


def offences(path: Path) -> list[str]:
    """What in ``path`` is over a bound without the docstring sentence that says why."""
    text = path.read_text()
    where = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    found = []
    if len(text.splitlines()) > MAX_MODULE_LINES:
        found.append(f"{where}: {len(text.splitlines())} lines (at most {MAX_MODULE_LINES})")
    for fn, doc in functions(ast.parse(text, str(path))):
        n, length = parameter_count(fn.args), fn.end_lineno - fn.lineno + 1
        if n > MAX_PARAMETERS and f"takes {n} parameters" not in doc:
            found.append(f"{where}:{fn.lineno} {fn.name} has {n} parameters and no docstring sentence 'takes {n} parameters' saying why")
        if length > MAX_FUNCTION_LINES and f"is {length} lines" not in doc:
            found.append(f"{where}:{fn.lineno} {fn.name} is {length} lines and no docstring sentence 'is {length} lines' says why")
    return found


@pytest.mark.parametrize("wing", list(WINGS))
def test_no_module_function_or_signature_over_its_bound(wing):
    assert [o for p in files(wing) for o in offences(p)] == []


def test_the_checker_sees_long_modules_functions_and_signatures(tmp_path):
    """Every bound is caught, a reason with the wrong number excuses nothing, ``self`` is not counted."""
    body = "\n".join(["    x = 0"] * 60)
    sample = tmp_path / "m.py"
    sample.write_text(
        "def wide(a, b, c, d, *e, f, **g):\n    pass\n"
        "def excused(a, b, c, d, e, f, g):\n    '''It takes 7 parameters because each is one CLI option.'''\n"
        "def stale(a, b, c, d, e, f, g, h):\n    '''It takes 7 parameters because each is one CLI option.'''\n"
        f"def long():\n{body}\n"
        f"def long_excused():\n    '''It is 63\n    lines because it is a table.'''\n{body}\n"
        "class C:\n    '''It takes 7 parameters: the paper's settings.'''\n"
        "    def __init__(self, a, b, c, d, e, f, g):\n        pass\n"
        "    def method(self, a, b, c, d, e, f):\n        pass\n"
        + "# filler\n" * 300)
    found = offences(sample)
    assert [line.split()[1] for line in found[1:]] == ["wide", "stale", "long"]
    assert found[0].endswith("lines (at most 400)") and "has 7 parameters" in found[1] and "has 8 parameters" in found[2]
    assert "is 61 lines" in found[3]
