"""The shape the code keeps (issue 13): one writer of a task's state, no import cycle,
no function too long to read at once, a dispatcher that stays small."""
from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "comfylb_ext"
LONGEST = 80  # lines
LONG_ALLOWED = {"validation.py"}  # mirrors ComfyUI's own validate_inputs, branch for branch


def modules() -> dict[str, ast.Module]:
    return {".".join(f.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"):
            ast.parse(f.read_text()) for f in PACKAGE.rglob("*.py")}


def imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """Modules of the package `name` imports, type-only imports included."""
    package = name.split(".") if name in ("comfylb_ext", "comfylb_ext.api", "comfylb_ext.hosts") else \
        name.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else [])) if node.level else (node.module or "")
            out.update(m for m in [mod, *(f"{mod}.{a.name}" for a in node.names)] if m in known)
    return out - {name}


def test_no_import_cycle():
    trees = modules()
    graph = {name: imports(name, tree, set(trees)) for name, tree in trees.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            assert state.get(d) != 1, " -> ".join(path[path.index(d):] + [d]) if d in path else d
            if d not in state:
                visit(d, path + [d])
        state[m] = 2
    for m in graph:
        if m not in state:
            visit(m, [m])


def test_no_function_is_too_long():
    long = [f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
            for name, tree in modules().items() if name.rsplit(".", 1)[-1] + ".py" not in LONG_ALLOWED
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > LONGEST]
    assert not long, long


def test_only_the_ledger_changes_a_tasks_state():
    writers = sorted(f.name for f in PACKAGE.rglob("*.py")
                     if re.search(r"\btask\.state\s*(,[^=]*)?=[^=]|\btask\.state,\s*\w+(\.\w+)?\s*=[^=]", f.read_text()))
    assert writers == ["ledger.py"], writers


def test_the_dispatcher_stays_small():
    assert len((PACKAGE / "dispatcher.py").read_text().splitlines()) < 500
