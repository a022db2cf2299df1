"""retfm's packages form layers, and every import points down them: a package may use the ones below it, never
one above or beside it. The order is written once, here; docs/architecture.md draws the same map."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "retfm"

# Bottom first. A name is a package or a top-level module of retfm ("" is retfm/__init__.py, the version).
LAYERS = [
    {"", "errors", "hashing"},
    {"config"},
    {"runs"},
    {"data"},
    {"knowledge"},
    {"models"},
    {"evaluate"},
    {"pretrain"},
    {"adapt"},
    {"retrieval", "zeroshot"},
    {"synth"},
    {"share"},
    {"federated"},
    {"serve"},
    {"demo"},
    {"cli"},
]
LAYER = {name: level for level, names in enumerate(LAYERS) for name in names}


def _module(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(retfm module imported, line, whether the import sits inside a function) for every import of retfm code."""
    tree = ast.parse(path.read_text(), str(path))
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names if a.name.split(".")[0] == "retfm")
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] == "retfm":
                modules = [f"{child.module}.{a.name}" for a in child.names]
                # ``from retfm.x import y`` names module retfm.x.y when that is a file, else a name in retfm.x
                found.extend((m if _exists(m) else child.module, child.lineno, in_function) for m in modules)
            visit(child, nested)

    visit(tree, False)
    return found


def _exists(module: str) -> bool:
    path = SRC.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _graph() -> dict[str, list[tuple[str, int, bool]]]:
    return {_module(path): _imports(path) for path in sorted(SRC.rglob("*.py"))}


def test_every_package_has_a_layer():
    packages = {_package(module) for module in _graph()}
    assert packages == set(LAYER), f"give each package a layer: {sorted(packages ^ set(LAYER))}"


def test_imports_point_down_the_layers():
    upward = [f"{module}:{line} imports {target} ({_package(module) or 'retfm'} is not above "
              f"{_package(target) or 'retfm'})"
              for module, imports in _graph().items() for target, line, _ in imports
              if _package(target) != _package(module) and LAYER[_package(target)] >= LAYER[_package(module)]]
    assert not upward, "\n".join(upward)


def test_no_import_cycle_between_files():
    graph = {module: {target for target, _, _ in imports if target != module} for module, imports in _graph().items()}
    done: set[str] = set()

    def walk(module: str, path: list[str]) -> None:
        if module in path:
            pytest.fail("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done or module not in graph:
            return
        for target in sorted(graph[module]):
            walk(target, path + [module])
        done.add(module)

    for module in graph:
        walk(module, [])


def test_function_local_imports_say_why():
    """Outside the command line, retfm code is imported at the top of a file; an import kept inside a function
    for start-up time says so in a comment on its line or the line above."""
    silent = []
    for path in sorted(SRC.rglob("*.py")):
        if _package(_module(path)) == "cli":
            continue
        lines = path.read_text().splitlines()
        for _, line, in_function in _imports(path):
            above = line - 2
            while lines[above].strip().startswith(("from ", "import ")):
                above -= 1
            if in_function and "#" not in lines[line - 1] and not lines[above].strip().startswith("#"):
                silent.append(f"{path.relative_to(SRC.parent)}:{line}")
    assert not silent, "function-local imports of retfm code without a reason: " + ", ".join(silent)
