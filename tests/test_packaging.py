"""The two install specs agree, and CI runs exactly the README's test command."""

from __future__ import annotations

import os
import re
import subprocess
import tomllib

import pytest
import yaml

from conftest import REPO


def _pins(requirements: list[str]) -> dict[str, str]:
    pins = {}
    for req in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*([=<>!~].*)", req.strip())
        if match:
            pins[match.group(1).lower().replace("_", "-")] = match.group(2).replace(" ", "")
    return pins


def test_environment_yml_pins_match_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = _pins(project["dependencies"] + project["optional-dependencies"]["dev"])
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    conda_pins = _pins([p for p in pip_section if not p.startswith("-")])
    assert conda_pins == declared
    assert any(d == "python=3.11" for d in env["dependencies"] if isinstance(d, str))


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    assert "make test" in readme.split("\n## ", 1)[0], "README's first screen must show `make test`"
    assert "make demo" in readme.split("\n## ", 1)[0], "README's first screen must show `make demo`"
    commands = [line.strip() for line in (REPO / ".ci/run").read_text().splitlines()
                if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert commands == ["make test"]


def test_every_package_installs_under_a_mergelab_name_from_its_wing():
    """Each wing folder holds one package named as it imports; every package of it is listed."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = {"mergelab": "lib/mergelab", **{k: v for k, v in setuptools["package-dir"].items() if k}}
    assert setuptools["package-dir"] == {"": "lib", "mergelab_flows": "flows/mergelab_flows",
                                         "mergelab_figures": "analysis/mergelab_figures", "mergelab_app": "app/mergelab_app"}
    found = {".".join((top, *p.parent.relative_to(REPO / folder).parts)) for top, folder in roots.items()
             for p in (REPO / folder).rglob("__init__.py")}
    assert set(setuptools["packages"]) == found
    links = [p for folder in ("lib", "flows", "analysis", "app") for p in (REPO / folder).rglob("*") if p.is_symlink()]
    assert not links, "a wing is a real folder, not a link"


@pytest.mark.parametrize(("uid", "as_root"), [("0", True), ("1000", False)])
def test_make_lab_passes_allow_root_only_as_root(tmp_path, uid, as_root):
    """Jupyter refuses to run as root unless given --allow-root: `make lab` passes it (and says so)
    exactly when `id -u` is 0 (faked here by an `id` first on PATH)."""
    fake = tmp_path / "id"
    fake.write_text(f"#!/bin/sh\necho {uid}\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    recipe = subprocess.run(["make", "-n", "lab"], cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    lab = next(line for line in recipe.splitlines() if "jupyter lab" in line and "--ServerApp" in line)
    assert ("--allow-root" in lab) is as_root
    assert ("passing --allow-root" in recipe) is as_root


def test_the_repository_points_nowhere_outside_itself():
    """No text of the repository (docs, docstrings, comments, studies, notebooks) names a file or
    section beside the checkout (the team's shared folder and its design, references and
    conventions notes), and every relative Markdown link of the docs resolves to a file in the
    repository."""
    outside = re.compile(r"\.\./shared|/shared/|shared folder|DESIGN\.md|REFERENCES\.md|(?:DESIGN|REFERENCES) §|CONVENTIONS")
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    texts = [REPO / f for f in tracked if f.endswith((".py", ".md", ".yaml", ".yml", ".ipynb", ".toml", "Makefile"))
             and f != "tests/test_packaging.py"]
    assert len(texts) > 100
    assert [f"{p.relative_to(REPO)}: {m[0]}" for p in texts for m in outside.finditer(p.read_text())] == []
    docs = [REPO / "README.md", REPO / "notebooks" / "README.md", *(REPO / "docs").glob("*.md")]
    links = [(p, target) for p in docs for target in re.findall(r"\]\(([^)\s#:,]+)(?:#[^)]*)?\)", p.read_text())]
    assert links, "the docs link each other"
    assert [f"{p.relative_to(REPO)} -> {t}" for p, t in links
            if not (p.parent / t).exists() or REPO not in (p.parent / t).resolve().parents] == []
