"""The import graph of moedream, read from the source with ast (nothing is imported).

Module-level imports (run when the module loads, including class bodies and try/if blocks,
but not ``if TYPE_CHECKING:``) and function-level imports (run on first call) are kept apart:
module-level imports must form no cycle (the policies modules none even with function-level
ones); the world model and the coherence kernel must not import ray at either level, nor
through a moedream module they import at module level.
An edge goes to the most specific moedream module named (``from a.b import c`` -> ``a.b.c``
when that is a module, else ``a.b``); the package ``__init__`` files Python runs on the way
are not edges, since a package that imports its own submodules is no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "moedream"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def find_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


MODULES = find_modules()


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST, in_function: bool, out: list[tuple[ast.AST, bool]]) -> None:
    """(import node, inside a function?) for every import under ``node``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            out.append((child, in_function))
        elif isinstance(child, ast.If) and _is_type_checking(child):
            continue  # never runs
        else:
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            _imports(child, nested, out)


def imported_names(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    """Absolute dotted names an import statement loads (modules, or module.attribute)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the module's package, one level up per extra dot
        package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    return [f"{base}.{alias.name}" for alias in node.names]  # resolve() finds the module


def resolve(name: str) -> str | None:
    """The most specific moedream module a dotted name falls in (None outside moedream)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def build_graph() -> tuple[dict[str, set[str]], dict[str, set[str]], dict[str, set[str]]]:
    """(module-level edges, function-level edges, top-level packages each module imports)."""
    module_edges: dict[str, set[str]] = {m: set() for m in MODULES}
    function_edges: dict[str, set[str]] = {m: set() for m in MODULES}
    externals: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        found: list[tuple[ast.AST, bool]] = []
        _imports(ast.parse(path.read_text(), str(path)), False, found)
        for node, in_function in found:
            edges = function_edges if in_function else module_edges
            for name in imported_names(node, module):
                target = resolve(name)
                if target is None:
                    top = name.split(".")[0]
                    externals[module].add(f"{top}@{'function' if in_function else 'module'}")
                elif target != module:
                    edges[module].add(target)
    return module_edges, function_edges, externals


MODULE_EDGES, FUNCTION_EDGES, EXTERNALS = build_graph()


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def reachable(start: str, edges: dict[str, set[str]]) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_graph_sees_known_imports():
    """The parser finds what is there (a test of the test)."""
    assert len(MODULES) > 30
    assert "moedream.config" in MODULE_EDGES["moedream.policies.imagination_config"]
    assert "moedream.policies.names" in MODULE_EDGES["moedream.policies.connectors"]
    assert "ray@module" in EXTERNALS["moedream.policies.algorithm"]
    assert "torch@module" in EXTERNALS["moedream.world_model.moe"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_cycle_among_module_level_imports():
    cycle = find_cycle(MODULE_EDGES)
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle or [])


def test_no_cycle_among_policies_modules_even_through_function_level_imports():
    """A function-level import hides a cycle from the loader, not from a reader: the policies
    share their names through policies/names.py instead."""
    policies = [m for m in MODULES if m.startswith(f"{PACKAGE}.policies")]
    edges = {m: (MODULE_EDGES[m] | FUNCTION_EDGES[m]) & set(policies) for m in policies}
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle in moedream.policies: " + " -> ".join(cycle or [])


RAY_FREE = [m for m in MODULES if m.startswith(f"{PACKAGE}.world_model")] + [
    f"{PACKAGE}.coherence.kernel"
]


@pytest.mark.parametrize("module", RAY_FREE)
def test_world_model_and_coherence_kernel_never_import_ray(module):
    direct = {e for e in EXTERNALS[module] if e.startswith("ray@")}
    assert not direct, f"{module} imports ray ({direct})"
    loaded = reachable(module, MODULE_EDGES)  # what loading it loads, inside moedream
    via = sorted(m for m in loaded if "ray@module" in EXTERNALS[m])
    assert not via, f"{module} imports ray through {via}"


def test_diffusers_is_imported_only_where_a_scheduler_is_built():
    """diffusers takes seconds to import: a module-level import would charge it to every Ray
    worker that loads the world model's modules, most of which never build a scheduler."""
    eager = sorted(m for m in MODULES if "diffusers@module" in EXTERNALS[m])
    assert not eager, f"import diffusers inside the function that needs it, not in {eager}"
    assert "diffusers@function" in EXTERNALS[f"{PACKAGE}.world_model.diffusion.denoiser"]
