"""The package's structure: no import cycles, no private names imported across modules, light --help."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cnncli"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(imported cnncli module, names taken from it) for every import in the file, function-level ones too."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name in modules]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("cnncli"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.append((sub, []) if sub in modules else (node.module, [alias.name]))
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {target for target, _ in _imports(path, modules) if target != name}
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_no_private_names_imported_across_modules():
    modules = _modules()
    private = [f"{name} imports {target}.{n}" for name, path in modules.items()
               for target, names in _imports(path, modules) for n in names if n.startswith("_") and n != "__version__"]
    assert private == []


@pytest.mark.parametrize("name", ["run", "data", "models", "train", "transfer", "adversarial", "inspect", "tools"])
def test_lower_layers_never_import_the_cli(name):
    graph = import_graph()
    offenders = [m for m, targets in graph.items() if m.startswith(f"cnncli.{name}")
                 for t in targets if t.startswith("cnncli.cli")]
    assert offenders == []


def test_visualize_names_agree_with_the_library():
    from cnncli.cli import visualize as cli
    from cnncli.inspect import visualize as lib

    assert cli.WHATS == lib.WHATS and cli.TSNE_LIMIT == lib.TSNE_LIMIT and cli.NORMALIZE == tuple(lib.NORMALIZED)
