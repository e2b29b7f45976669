"""docs/extending.md's recipes stay true: every code block of the page runs as written.

Each file block (``# lib/…/name.py``, ``# analysis/mergelab_figures/name.py``) is written into a temporary folder
that the package it names also searches, so ``from mergelab.merging.median import median`` (or
``from mergelab_figures.ranks_figures import lora_rank_bars``) imports it as it would from the
checkout; each registry block (``# …: one line in NAME``) runs its imports in the registry
module's namespace and adds its lines to ``NAME``; each ``# tests/…`` block's test runs. The toys
are then used as the page says: in ``mergelab merge`` / ``adapt`` (in-process, CliRunner), in a
study run through the study graph, in its results table, its figure and in the overview notebook
executed against the study's store. Everything is removed afterwards.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import REPO

DOC = REPO / "docs" / "extending.md"
MICRO = REPO / "data" / "micro"
ADAPTERS = [str(MICRO / "adapters" / "r4" / t) for t in ("digits", "textures")]


@dataclass(frozen=True)
class Block:
    """A code block of the page: where it goes (its first line), what it says of it, its code."""

    path: str
    note: str
    code: str

    @property
    def registry(self) -> str | None:
        found = re.fullmatch(r"one line in (\w+)", self.note)
        return found and found.group(1)

    @property
    def module(self) -> str:
        """The module a ``lib/…`` or ``analysis/…`` path imports as (below its wing's folder)."""
        _, *parts = Path(self.path).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def blocks() -> list[Block]:
    found = []
    for code in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S):
        first, _, rest = code.partition("\n")
        head = re.fullmatch(r"# (\S+?)(?::\s*(.*))?", first)
        assert head, f"a code block of docs/extending.md does not say where it goes: {first!r}"
        found.append(Block(head.group(1), head.group(2) or "", rest))
    return found


BLOCKS = blocks()
FILES = [b for b in BLOCKS if b.path.startswith("lib/") and not b.registry]
ENTRIES = [b for b in BLOCKS if b.registry]
FIGURES = [b for b in BLOCKS if b.path.startswith("analysis/")]
TESTS = [b for b in BLOCKS if b.path.startswith("tests/")]
TEST_NAMES = [name for b in TESTS for name in re.findall(r"^def (test_\w+)", b.code, re.M)]


def test_every_recipe_is_a_file_a_registry_line_and_a_test():
    assert [b.registry for b in ENTRIES] == ["METHODS", "SPACES", "ADAPTERS", "ANALYSES", "BENCHES"]
    assert [Path(b.path).parent.name for b in FILES] == ["merging", "spaces", "adaptation", "analysis", "kinds"]
    assert [b.path for b in FIGURES] == ["analysis/mergelab_figures/ranks_figures.py"] and len(TEST_NAMES) == 6
    assert all(b.note == "" for b in FILES + FIGURES + TESTS), "a file or test block is the whole of what it adds"


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    """Every block of the page in place (module scope: the toys are registered once); undone after."""
    from mergelab.registry import Registry

    root = tmp_path_factory.mktemp("extending")
    packages, registered, modules = [], [], set(sys.modules)
    try:
        for b in FILES + FIGURES:
            (root / b.path).parent.mkdir(parents=True, exist_ok=True)
            (root / b.path).write_text(b.code)
            package = importlib.import_module(Block(str(Path(b.path).parent / "__init__.py"), "", "").module)
            if str((root / b.path).parent) not in package.__path__:
                package.__path__.append(str((root / b.path).parent))
                packages.append((package, str((root / b.path).parent)))
        for b in ENTRIES:
            module = importlib.import_module(b.module)
            registry = getattr(module, b.registry)
            assert isinstance(registry, Registry)
            namespace = dict(vars(module))
            lines = b.code.strip().splitlines()
            exec(compile("\n".join(line for line in lines if not line.startswith(" ")), f"{DOC} ({b.path})", "exec"), namespace)
            entries = eval("{" + "\n".join(line for line in lines if line.startswith(" ")) + "}", namespace)
            for name, entry in entries.items():
                registry.register(name, entry)
                registered.append((registry, name))
        tests = {}
        for b in TESTS:
            namespace = {"__name__": f"extending_docs.{Path(b.path).stem}"}
            exec(compile(b.code, f"{DOC} ({b.path})", "exec"), namespace)
            tests.update({k: v for k, v in namespace.items() if k.startswith("test_")})
        yield tests
    finally:
        for registry, name in registered:
            del registry[name]
        for package, path in packages:
            package.__path__.remove(path)
        for name in {b.module for b in FILES + FIGURES} - modules:
            sys.modules.pop(name, None)


@pytest.mark.parametrize("name", TEST_NAMES)
def test_each_recipes_own_test_passes(recipes, name):
    recipes[name]()


def _study(tmp_path: Path) -> Path:
    """The page's few.yaml: the recipe's bench kind (two tasks, 16 images per split), the toy method in
    the full and the toy space, the toy adaptive method and the toy analysis."""
    path = tmp_path / "few.yaml"
    path.write_text(yaml.safe_dump({
        "name": "few", "store": str(tmp_path / "store"), "tasks": ["digits", "textures"],
        "bench": {"kind": "micro_few", "root": str(MICRO), "images": 16},
        "methods": [{"method": "median", "spaces": ["full", "rows"], "grid": {"alpha": [1.0]}}],
        "adaptive": [{"method": "shared_scale", "iters": 1, "batch_size": 4}], "analyses": ["lora_ranks"], "joint": False}))
    return path


def test_the_toys_work_on_the_command_line(recipes, tmp_path, one_thread):
    from typer.testing import CliRunner

    from mergelab_app.cli import app

    runner = CliRunner()

    def shown(*args: str) -> str:  # the help text with rich's wrapping undone
        return " ".join(runner.invoke(app, [*args, "--help"], terminal_width=400).output.replace("│", " ").split())

    assert "median (alpha=1.0)" in shown("merge") and "rows" in shown("merge")
    assert "shared_scale (init=0.3)" in shown("adapt") and "lora_ranks" in shown("analyze")
    study, store = str(_study(tmp_path)), str(tmp_path / "store")
    merged = runner.invoke(app, ["merge", "--base", str(MICRO / "base"), "--adapters", *ADAPTERS, "--method", "median", "--space", "rows",
                                 "--select", "val", "--grid", "alpha=0.5,1.0", "--bench", study, "--store", store, "--out", str(tmp_path / "m")])
    assert merged.exit_code == 0, merged.output
    record = json.loads((tmp_path / "m" / "merge.json").read_text())
    assert (record["method"], record["space"]) == ("median", "rows") and "few.yaml" in json.dumps(record["command"])
    assert set(record["selection"]["criterion"]) == {"alpha=0.5", "alpha=1.0"}  # both configurations scored on the few val images
    adapted = runner.invoke(app, ["adapt", "--base", str(MICRO / "base"), "--adapters", *ADAPTERS, "--method", "shared_scale", "--iters", "2",
                                  "--batch-size", "4", "--bench", study, "--store", store, "--out", str(tmp_path / "a")])
    assert adapted.exit_code == 0, adapted.output
    assert "shared_scale" in (tmp_path / "a" / "README.md").read_text()


def test_the_toys_run_in_a_study_its_tables_a_figure_and_the_overview_notebook(recipes, tmp_path, one_thread):
    from mergelab_figures import ranks_figures, tables
    from mergelab_figures.layout import layout_problems
    from mergelab_app.report import execute_notebook

    from mergelab.config import load_study
    from mergelab.store import Store
    from mergelab.study import Run, local_submit, run_graph

    ctx = Run(load_study(_study(tmp_path)), str(tmp_path / "store"))
    _, done = run_graph(ctx, local_submit(ctx))
    store = Store(ctx.store.url)
    results = store.get_dataset(done.key)
    assert list(results.merge_method.values) == ["median", "shared_scale"] and {"full", "rows"} <= set(results.space.values)
    assert {("median", "full"), ("median", "rows"), ("shared_scale", "full")} <= set(tables.paper_table(results, delta=None).data.index)
    ranks = store.get_dataset(store.ref("studies/few/analysis/lora_ranks"))
    assert layout_problems(ranks_figures.lora_rank_bars(ranks)) == []
    nb = execute_notebook(REPO / "notebooks" / "00_overview.ipynb", {"STORE": ctx.store.url, "STUDY": "few"}, cwd=tmp_path,
                          figure_formats=("png",))
    shown = json.dumps([o for c in nb.cells if c.cell_type == "code" for o in c.outputs])
    assert "median" in shown and "rows" in shown and "shared_scale" in shown
