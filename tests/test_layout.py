"""The package keeps its plan: Hydra only at the edges, no import circles, one level of folders.

The rules read the source with ``ast`` rather than importing each module in an interpreter of
its own: that takes a second instead of a minute, and it also sees the imports inside
functions, which importing a module never runs.
"""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "nanogpt"
COMMANDS = ("train", "sample", "chat", "eval", "data", "export", "bench", "report", "serve", "explain")
HYDRA = ("hydra", "omegaconf")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(module_name(p) for p in PACKAGE.rglob("*.py"))
# Below the edge: everything but the commands and the cli folder, which are where Hydra belongs.
PLAIN = [m for m in MODULES if m.split(".")[1:2] != ["cli"] and m.removeprefix("nanogpt.") not in COMMANDS]


def test_the_top_holds_the_lesson_the_face_and_the_commands():
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert len(top) <= 16, top
    assert {"__init__", "model", *[c for c in COMMANDS if c != "chat"]} <= set(top)
    for folder in (p for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"):
        assert not [p for p in folder.iterdir() if p.is_dir() and p.name != "__pycache__"], \
            f"{folder.name}/ nests folders"
        modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
        assert len(modules) >= 2, f"{folder.name}/ has one file"


def imports_in(source: str, package: list[str]) -> set[str]:
    """Every name a source imports, anywhere: at the top, inside functions, under TYPE_CHECKING.

    ``from a.b import c`` names a.b and a.b.c (c may be a module or not); relative
    imports are resolved against package, the source's package as a list of names.
    """
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, node.module] if node.module else anchor)
            found |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
    return found


@functools.cache
def imported_names(module: str) -> frozenset[str]:
    """Every name one of the package's modules imports (imports_in)."""
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    if path.is_file():
        return frozenset(imports_in(path.read_text(), module.split(".")[:-1]))
    return frozenset(imports_in((path.with_suffix("") / "__init__.py").read_text(), module.split(".")))


def imports_of(module: str) -> set[str]:
    """The package's modules that a module imports, by name."""
    return {name for name in imported_names(module) if name in MODULES and name != module}


def loaded_with(module: str) -> set[str]:
    """The package's modules that importing module runs: it, and each package above it."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & set(MODULES)


def hydra_path(module: str) -> list[str] | None:
    """A chain of imports from module to one that imports Hydra or OmegaConf itself; None if none.

    Importing a module runs its packages' __init__ too, so those are followed as well.
    """
    seen, stack = {module}, [[module]]
    while stack:
        path = stack.pop()
        names = imported_names(path[-1])
        hydra = sorted(n for n in names if n.split(".")[0] in HYDRA)
        if hydra:
            return [*path, hydra[0]]
        for name in sorted(set().union(*(loaded_with(n) for n in names)) - seen):
            seen.add(name)
            stack.append([*path, name])
    return None


def test_only_the_edges_import_hydra():
    """No module below the edge reaches Hydra, however deep the import or inside whatever function."""
    assert len(PLAIN) > 30
    assert {module: " -> ".join(path) for module in PLAIN if (path := hydra_path(module))} == {}


def test_importing_every_module_below_the_edge_loads_no_hydra():
    """What the interpreter really loads: a package we import may bring Hydra in with it."""
    code = (f"import sys, {', '.join(PLAIN)}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('hydra', 'omegaconf'))[:3])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_rules_see_imports_in_functions_and_for_type_checking_only():
    source = ("from typing import TYPE_CHECKING\n"
              "if TYPE_CHECKING:\n    from nanogpt.dataset import sources\n"
              "def f():\n    import omegaconf\n    from . import sibling\n"
              "    from ..text.tokenizers import x\n")
    assert imports_in(source, ["nanogpt", "dataset"]) >= {
        "nanogpt.dataset.sources", "omegaconf", "nanogpt.dataset.sibling", "nanogpt.text.tokenizers"}


def test_no_import_circles():
    """Type-only imports count: a circle of them still ties the modules' designs together."""
    graph = {module: imports_of(module) for module in MODULES}
    circles = []

    def visit(module: str, path: list[str]) -> None:
        for imported in graph[module]:
            if imported in path:
                circles.append(path[path.index(imported):] + [imported])
            elif imported not in done:
                visit(imported, path + [imported])
        done.add(module)

    done: set[str] = set()
    for module in MODULES:
        visit(module, [module])
    assert circles == []


def test_the_lesson_and_the_loop_stay_short():
    texts = {m: (PACKAGE.parent / (m.replace(".", "/") + ".py")).read_text().splitlines()
             for m in ("nanogpt.model", "nanogpt.training.trainer")}
    assert sum(len(lines) for lines in texts.values()) <= 740, {m: len(lines) for m, lines in texts.items()}
    # Short by reading well, not by packing: no line past 100 characters (ruff allows 110 elsewhere).
    packed = [(m, n) for m, lines in texts.items() for n, line in enumerate(lines, 1) if len(line) > 100]
    assert packed == []


def test_the_servers_routes_are_short_functions_of_their_own():
    """Each route, and the function that builds the app, is a module-level function of at most 60 lines.

    Routes written as closures inside one factory grow into a function nobody can read whole, and
    near-copies hide in it; at module level each is read, and reused, on its own.
    """
    source = (PACKAGE / "serving" / "app.py").read_text()
    tree = ast.parse(source)
    top = {node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    routes = {call.args[1].id for call in ast.walk(top["create_app"]) if isinstance(call, ast.Call)
              and getattr(call.func, "attr", "") == "add_api_route"}
    assert {"completions", "chat_completions", "health", "tokenize"} <= routes <= set(top)
    long = {name: node.end_lineno - node.lineno + 1 for name, node in top.items()
            if node.end_lineno - node.lineno + 1 > 60}
    assert long == {}
    nested = [node.name for function in top.values() for node in ast.walk(function)
              if node is not function and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    assert nested == []
