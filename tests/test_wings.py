"""The static import graph of the checkout: four wings, imports running one way.

``lib/mergelab`` (the library) imports no other wing and none of the orchestration, notebook or
command-line stacks, not even inside a function; ``flows/mergelab_flows`` imports the library only;
``analysis/mergelab_figures`` the library only (no Prefect); ``app/mergelab_app`` may import every
wing, and no wing imports it. Every ``mergelab*`` import resolves to a module file of a wing, so a
static tool given the four folders sees the whole graph, and that graph has no cycle.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

from conftest import REPO

#: Each wing's package, its folder, and the top-level names it must never import.
STACKS = ("prefect", "prefect_dask", "dask", "distributed", "nbclient", "nbformat", "nbconvert", "papermill", "ipykernel",
          "jupyter_client", "jupyterlab", "typer", "rich", "seaborn", "matplotlib")
WINGS = {
    "mergelab": ("lib/mergelab", {"mergelab_flows", "mergelab_figures", "mergelab_app", *STACKS}),
    "mergelab_flows": ("flows/mergelab_flows", {"mergelab_figures", "mergelab_app", "nbclient", "nbformat", "papermill",
                                                "typer", "seaborn", "matplotlib"}),
    "mergelab_figures": ("analysis/mergelab_figures", {"mergelab_flows", "mergelab_app", "prefect", "prefect_dask", "typer",
                                                       "nbclient", "papermill"}),
    "mergelab_app": ("app/mergelab_app", set()),
}


def imported(path: Path) -> list[tuple[int, str]]:
    """Every absolute module a file imports, wherever the statement stands (module level, a
    function, a ``TYPE_CHECKING`` block), with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def imported_modules(path: Path) -> set[str]:
    """The ``mergelab*`` modules a file imports, wherever the statement stands; ``from package import
    module`` is an import of that module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] in WINGS:
            found |= {f"{node.module}.{a.name}" if resolves(f"{node.module}.{a.name}") else node.module for a in node.names}
    return {name for name in found if name.split(".")[0] in WINGS}


def module_name(path: Path) -> str:
    wing = next(w for w, (folder, _) in WINGS.items() if path.is_relative_to(REPO / folder))
    parts = path.relative_to(REPO / WINGS[wing][0]).with_suffix("").parts
    return ".".join((wing, *parts[: -1 if parts[-1] == "__init__" else None]))


def import_cycle(paths: list[Path]) -> list[str] | None:
    """One cycle of the import graph of ``paths`` (module-level, lazy and ``TYPE_CHECKING`` imports alike), or ``None``."""
    graph = {module_name(p): imported_modules(p) - {module_name(p)} for p in paths}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        return err.args[1]
    return None


def resolves(module: str) -> bool:
    top, *rest = module.split(".")
    folder = REPO / WINGS[top][0]
    target = folder.joinpath(*rest)
    return target.with_suffix(".py").is_file() or (target / "__init__.py").is_file()


def files(wing: str) -> list[Path]:
    return sorted((REPO / WINGS[wing][0]).rglob("*.py"))


@pytest.mark.parametrize("wing", list(WINGS))
def test_a_wing_imports_nothing_above_it(wing):
    forbidden = WINGS[wing][1]
    offenders = [f"{p.relative_to(REPO)}:{line} imports {name}" for p in files(wing) for line, name in imported(p)
                 if name.split(".")[0] in forbidden]
    assert not offenders


@pytest.mark.parametrize("wing", list(WINGS))
def test_every_mergelab_import_resolves_to_a_file_of_a_wing(wing):
    unresolved = [f"{p.relative_to(REPO)}:{line} imports {name}" for p in files(wing) for line, name in imported(p)
                  if name.split(".")[0] in WINGS and not resolves(name)]
    assert not unresolved


def test_the_import_graph_has_no_cycle():
    assert import_cycle([p for wing in WINGS for p in files(wing)]) is None


def test_the_cycle_check_sees_a_lazy_cycle(tmp_path, monkeypatch):
    root = tmp_path / "lib" / "mergelab"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("from mergelab.pkg.a import f\n")
    (root / "pkg" / "a.py").write_text("def f():\n    from mergelab.pkg import g\n")
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    assert import_cycle(sorted(root.rglob("*.py"))) is not None


def test_the_checker_sees_lazy_imports(tmp_path):
    """A function-level import is found (the rule holds "even lazily")."""
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    from mergelab_app.cli import app\n    import prefect.flows\n")
    assert imported(sample) == [(2, "mergelab_app.cli"), (3, "prefect.flows")]
    assert resolves("mergelab_app.cli") and resolves("mergelab.merging.registry") and not resolves("mergelab.nothing")
