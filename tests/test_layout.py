"""The package keeps its plan: Hydra only at the edges, no import circles, one level of folders."""

from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "nanogpt"
COMMANDS = ("train", "sample", "chat", "eval", "data", "export", "bench", "report", "serve")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(module_name(p) for p in PACKAGE.rglob("*.py"))
# Below the edge: everything but the commands and the cli folder, which are where Hydra belongs.
PLAIN = [m for m in MODULES if m.split(".")[1:2] != ["cli"] and m.removeprefix("nanogpt.") not in COMMANDS]


def test_the_top_holds_the_lesson_the_face_and_the_commands():
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert len(top) <= 14, top
    assert {"__init__", "model", *[c for c in COMMANDS if c != "chat"]} <= set(top)
    for folder in (p for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"):
        assert not [p for p in folder.iterdir() if p.is_dir() and p.name != "__pycache__"], \
            f"{folder.name}/ nests folders"
        modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
        assert len(modules) >= 2, f"{folder.name}/ has one file"


def hydra_loaded_by(module: str) -> str | None:
    """The Hydra modules that importing module (alone, in a fresh interpreter) loads, if any."""
    code = (f"import sys, {module}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('hydra', 'omegaconf'))[:3])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stderr
    return None if result.stdout.strip() == "[]" else result.stdout.strip()


def test_only_the_edges_import_hydra():
    with ThreadPoolExecutor(max_workers=2) as pool:
        loaded = dict(zip(PLAIN, pool.map(hydra_loaded_by, PLAIN), strict=True))
    assert len(PLAIN) > 30
    assert {module: found for module, found in loaded.items() if found} == {}


def imports_of(module: str) -> set[str]:
    """The nanogpt modules a module imports anywhere (in functions too), except for type checking only."""
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    if not path.is_file():
        path = path.with_suffix("") / "__init__.py"
    tree = ast.parse(path.read_text())
    checking_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                     and getattr(block.test, "id", getattr(block.test, "attr", "")) == "TYPE_CHECKING"
                     for node in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in checking_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in MODULES and name != module}


def test_no_import_circles():
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
    lines = {m: len((PACKAGE.parent / (m.replace(".", "/") + ".py")).read_text().splitlines())
             for m in ("nanogpt.model", "nanogpt.training.trainer")}
    assert sum(lines.values()) <= 700, lines
