"""Every third-party module the code imports comes from a distribution pyproject.toml declares.

Read with ast (nothing is imported): `moedream/` may import only the run-time dependencies,
`tests/` and `benchmarks/` also the `dev` extra that `make test` installs. A module that merely
arrives with another package (psutil with DeepSpeed, click with Ray) would vanish from a fresh
install the day that package drops it.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Installed by the Makefile with --no-deps (its own pins clash): required, not in the list.
INSTALLED_BY_MAKEFILE = {"overcooked-ai"}
OWN_TOP_LEVEL = {"moedream", "tests", "benchmarks"}


def distribution_name(requirement: str) -> str:
    """'ray[rllib,train]==2.60.0' -> 'ray' (normalised as PEP 503 does)."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


RUNTIME = {distribution_name(r) for r in PYPROJECT["project"]["dependencies"]}
DEV = {distribution_name(r) for r in PYPROJECT["project"]["optional-dependencies"]["dev"]}


def _importorskip_target(node: ast.AST) -> str | None:
    """The module of a `pytest.importorskip("x.y")` call, else None."""
    if not (isinstance(node, ast.Call) and node.args):
        return None
    func, arg = node.func, node.args[0]
    named = isinstance(func, ast.Attribute) and func.attr == "importorskip"
    return arg.value if named and isinstance(arg, ast.Constant) else None


def top_level_imports(path: Path) -> set[str]:
    """Absolute top-level module names ``path`` imports (importorskip targets included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
        elif (target := _importorskip_target(node)) is not None:
            names.add(target)
    return {name.split(".")[0] for name in names}


@functools.cache
def third_party_imports(folder: str) -> dict[str, list[str]]:
    """{top-level module: files importing it} for the non-stdlib, non-local imports under
    ``folder`` (a benchmark's sibling modules, e.g. `_common`, are local)."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        siblings = {p.stem for p in path.parent.glob("*.py")}
        for name in top_level_imports(path) - set(sys.stdlib_module_names) - siblings:
            if name not in OWN_TOP_LEVEL:
                found.setdefault(name, []).append(str(path.relative_to(ROOT)))
    return found


@functools.cache
def providers() -> dict[str, list[str]]:
    """{top-level module: installed distributions providing it} (scans every install once)."""
    return importlib.metadata.packages_distributions()


def undeclared(folder: str, declared: set[str]) -> list[str]:
    problems = []
    for module, files in sorted(third_party_imports(folder).items()):
        dists = {distribution_name(d) for d in providers().get(module, [])}
        if not dists & (declared | INSTALLED_BY_MAKEFILE):
            problems.append(f"{module} (from {sorted(dists) or 'nothing installed'}) in {files}")
    return problems


def test_the_scan_sees_known_imports():
    assert {"torch", "ray", "numpy"} <= set(third_party_imports("moedream"))
    assert {"pytest", "psutil"} <= set(third_party_imports("tests"))
    assert "os" not in third_party_imports("moedream")  # stdlib
    assert "_common" not in third_party_imports("benchmarks")  # a sibling module


@pytest.mark.parametrize(
    "folder, declared",
    [("moedream", RUNTIME), ("tests", RUNTIME | DEV), ("benchmarks", RUNTIME | DEV)],
    ids=["moedream", "tests", "benchmarks"],
)
def test_every_third_party_import_is_declared(folder, declared):
    problems = undeclared(folder, declared)
    assert not problems, (
        f"{folder}/ imports modules pyproject.toml does not declare; add their distribution "
        f"(pinned to the installed version) to {'dependencies' if folder == 'moedream' else 'the dev extra'}: "
        + "; ".join(problems)
    )
