"""The package's layout: who may import whom. Read from the source with ast, so function-level imports count too."""

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "ft"
# Function-level imports allowed to close a circle, each justified where it is written:
ALLOWED_CIRCLES = {
    # ft/__init__.py: the public ft.run_stage, imported when called so that `import ft` stays light
    ("ft", "ft.runner"),
    # ft/__init__.py: the public ft.run_pipeline, imported when called for the same reason
    ("ft", "ft.pipeline"),
}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict) -> set[str]:
    """The ft modules `name` imports anywhere in its file (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names} & set(known)
            # `from ft import models` imports the module ft.models; `from ft import __version__` the package ft
            out |= submodules if len(submodules) == len(node.names) else submodules | ({base} & set(known))
    return out - {name}


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_stage_registry_imports_nothing_from_ft():
    graph = import_graph()
    assert graph["ft.stages.registry"] == set()
    assert graph["ft.stages"] == set()  # the package file: a docstring
    assert graph["ft.hub_id"] == set()  # the Hub-id rule is a leaf too: loading a model needs no push client


def test_no_module_of_ft_is_reached_in_a_circle():
    graph = import_graph()
    for edge in ALLOWED_CIRCLES:
        assert edge[1] in graph[edge[0]], f"{edge} is allowed but no longer there: drop it from ALLOWED_CIRCLES"
        graph[edge[0]] = graph[edge[0]] - {edge[1]}
    assert circles(graph) == []


def test_the_circle_check_finds_a_circle_through_a_function_level_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_models_and_data_do_not_import_the_push_client():
    graph = import_graph()
    assert "ft.hub" not in graph["ft.models"] and "ft.hub" not in graph["ft.data"]
    assert "ft.hub_id" in graph["ft.models"] and "ft.hub_id" in graph["ft.data"]
