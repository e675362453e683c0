"""The package's shape, checked: no import circle, small classes and functions, no probing of
optional methods. docs/ARCHITECTURE.md describes the shape these tests keep."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "streamcast"
CLASS_LINES_MAX = 300
FUNCTION_LINES_MAX = 60
# declarative tables, long by nature: one line a metric
LONG_ALLOWED = {("metrics.py", "__init__")}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(path: Path) -> set[str]:
    """The streamcast modules ``path`` imports at run time (a TYPE_CHECKING block is not)."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(n) for block in ast.walk(tree) if _type_checking_only(block) for n in ast.walk(block)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("streamcast"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("streamcast"))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        # a package's __init__ only re-exports its modules: `from streamcast.daemon import X`
        # depends on the module that defines X, which the edges to the package then stand for
        targets = {t for t in imports_of(path) if t in modules and t != name}
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle_in_the_package():
    graph = import_graph()
    assert graph.get("streamcast.daemon.loop")
    # the packages' own __init__ re-exports would make every `from streamcast.daemon import`
    # in a submodule a circle through the package: submodules import modules, not the package
    inside = [
        m
        for m, targets in graph.items()
        if m.startswith("streamcast.daemon.") and "streamcast.daemon" in targets
    ]
    assert inside == [], "modules of streamcast.daemon import streamcast.daemon itself"
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph) or [])}"


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None


def long_definitions() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                limit = CLASS_LINES_MAX
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                limit = FUNCTION_LINES_MAX
            else:
                continue
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            if lines > limit and (path.name, node.name) not in LONG_ALLOWED:
                found.append(
                    f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines} lines)"
                )
    return found


def test_no_class_over_300_lines_and_no_function_over_60():
    assert long_definitions() == []


def test_no_getattr_probing_for_optional_methods():
    """One protocol declares what is called on an engine, a source or a sink: nothing is
    looked up by name at run time (the package's lazy ``__getattr__`` aside)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            name = (
                node.func.id
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                else ""
            )
            # getattr with a default, or hasattr: asking whether it is there
            probing = name == "hasattr" or (name == "getattr" and len(node.args) == 3)
            if probing:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {ast.unparse(node)}")
    assert found == []


def test_the_architecture_page_names_every_module_and_no_other():
    """docs/ARCHITECTURE.md is the map: its file tree lists every module of the package, and
    every module it lists exists."""
    page = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text()
    tree = page.split("```")[1]
    listed = set()
    folder = ""
    for line in tree.splitlines():
        names = [w.rstrip(",") for w in line.split() if w.rstrip(",").endswith((".py", "/"))]
        for name in names:
            if name.endswith("/") and line.startswith("  ") and not line.startswith("    "):
                # a sub-package (daemon/, cli/), not a folder of assets (web/)
                folder = name if any((PACKAGE / name).glob("*.py")) else ""
            elif name.endswith(".py"):
                indented = line.startswith("    ")
                listed.add((folder if indented else "") + name)
    modules = {
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    }
    assert modules - listed == set(), "modules missing from docs/ARCHITECTURE.md"
    assert listed - modules == set(), "docs/ARCHITECTURE.md lists modules that do not exist"
