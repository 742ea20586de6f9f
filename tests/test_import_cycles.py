"""How the modules may depend on each other, checked on their source (no imports run)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(tree: ast.AST, package: str) -> set[str]:
    """Modules of ``package`` that ``tree`` imports, at any depth (a function-level
    import is a dependency too, only a later one), except under ``if TYPE_CHECKING:``
    (annotations only: nothing runs)."""
    found: set[str] = set()
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            pending.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # "from adloop.streams import follower" names a module, too.
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            names = []
        for name in names:
            if name.startswith(f"{package}."):
                found.add(name.removeprefix(f"{package}.").split(".")[0])
        pending.extend(ast.iter_child_nodes(node))
    return found


def import_graph(folder: Path, package: str) -> dict[str, set[str]]:
    modules = {path.stem: path for path in folder.glob("*.py")}
    return {
        name: _imported(ast.parse(path.read_text(), str(path)), package) & set(modules) - {name}
        for name, path in modules.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules (depth-first)."""
    found: list[list[str]] = []
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            found.append([*path[path.index(node) :], node])
            return
        if node in done:
            return
        for target in sorted(graph.get(node, ())):
            visit(target, [*path, node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])
    return found


def test_the_cycle_finder_finds_a_circle() -> None:
    graph = {"controller": {"serving"}, "serving": {"steering"}, "steering": {"controller"}}
    assert cycles(graph) == [["controller", "serving", "steering", "controller"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import adloop.streams.x\n"
    assert _imported(ast.parse(source), "adloop.streams") == set()
    lazy = "def f():\n    from adloop.streams import y\n    from adloop.streams.z import q\n"
    assert _imported(ast.parse(lazy), "adloop.streams") == {"y", "z"}


def test_no_import_cycles_in_streams() -> None:
    graph = import_graph(REPO / "streams", "adloop.streams")
    assert {"follower", "topology", "config", "controller", "serving"} <= set(graph)
    assert cycles(graph) == []


@pytest.mark.parametrize(
    ("folder", "package"),
    [
        ("schemas", "adloop.schemas"),
        ("bandit", "adloop.bandit"),
        ("generator", "adloop.generator"),
        ("bench", "adloop.bench"),
        ("src/adloop", "adloop"),
    ],
)
def test_no_import_cycles_in_any_folder(folder: str, package: str) -> None:
    assert cycles(import_graph(REPO / folder, package)) == []
