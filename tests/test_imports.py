"""No import circle inside src/nanoseek: its modules form layers, each importing those below it.

The graph is read from the source with ast, not by importing anything. An edge A -> B means that
loading A loads B at import time: an `import` or `from ... import` at module level (in the module
body, or inside a class body, an `if` or a `try` there), naming B, a submodule of B (`from
nanoseek.train import dist` is an edge to nanoseek.train.dist) or a module inside package B (which
loads B's __init__ first). A package that contains A is not an edge: Python has started loading it
before A.

Imports inside functions are not counted. They run when the function is called, after every module
has loaded, so they cannot leave a module half-initialised; the code uses them on purpose to keep a
heavy or optional dependency (FastAPI, matplotlib, the engine) out of a command that does not need
it. The commands live in cli/, which no library module imports (tests/test_cli.py). That the
library (model/, data/, train/, eval/) imports nothing from stages/ is checked separately below.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "nanoseek"


def module_name(path: Path) -> str:
    parts = ["nanoseek", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module loads: everything but function bodies."""
    found = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            stack.append(child)
    return found


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of nanoseek that loading `name` loads directly."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in top_level_imports(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
            continue
        base = node.module or ""
        if node.level:  # relative: from the importing module's package
            package = name.split(".") if is_package else name.split(".")[:-1]
            anchor = package[: len(package) - node.level + 1]
            base = ".".join([*anchor, base] if base else anchor)
        targets.add(base)
        targets |= {f"{base}.{alias.name}" for alias in node.names}
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    edges = set()
    for target in targets:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):  # the target and the packages above it
            prefix = ".".join(parts[:i])
            if prefix in known and prefix not in ancestors and prefix != name:
                edges.add(prefix)
    return edges


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported_modules(name, path, set(found)) for name, path in found.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert "nanoseek.checkpoint" in graph["nanoseek"]  # __init__ re-exports load_model
    assert "nanoseek.config" in graph["nanoseek.checkpoint"]
    # from nanoseek.train import dist: the submodule
    assert "nanoseek.train.dist" in graph["nanoseek.stages.common"]


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_library_does_not_import_the_stages():
    """train/ and the library below it know nothing of the pipeline that drives them."""
    graph = import_graph()
    for name, edges in graph.items():
        if name.startswith(("nanoseek.train", "nanoseek.data", "nanoseek.eval", "nanoseek.model")):
            upward = sorted(e for e in edges if e.startswith("nanoseek.stages"))
            assert not upward, f"{name} imports {upward}"
