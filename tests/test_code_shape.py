"""The code's shape, checked statically (no imports of diffrl, so it runs in a second): no function in diffrl/ over
60 lines, and no import cycle among diffrl's modules, counting the imports made inside functions too."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "diffrl"
MAX_LINES = 60


def modules() -> dict[str, Path]:
    """Dotted module name → file, for every module of diffrl (a package by its ``__init__``)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def test_no_function_is_longer_than_60_lines():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_LINES} lines (split them into named steps):\n" + "\n".join(long)


def import_graph() -> dict[str, set[str]]:
    """Module → the diffrl modules it imports, at the top or inside a function (a lazy import still ties the two
    modules together); importing ``a.b.c`` also runs the packages ``a`` and ``a.b``."""
    known = modules()

    def resolve(target: str) -> str | None:  # the module a dotted name lives in (``from m import name``: m or m.name)
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target or None

    graph = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package up level − 1
                    base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *filter(None, [base])])
                targets.update([base, *(f"{base}.{alias.name}" for alias in node.names)])
        edges = set()
        for target in targets:
            if target.split(".")[0] == "diffrl" and (module := resolve(target)) is not None:
                parts = module.split(".")
                edges.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))  # the module and its packages
        graph[name] = edges - {name, *(".".join(name.split(".")[:i]) for i in range(1, len(name.split("."))))}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_diffrl():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles (a module reaches itself; lazy imports count):\n" + "\n".join(
        " ↔ ".join(c) for c in found)


def test_nothing_imports_the_cli():
    importers = sorted(m for m, edges in import_graph().items() if "diffrl.cli" in edges)
    assert not importers, f"diffrl.cli is the entry point; imported by {importers}"
