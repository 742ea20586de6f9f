"""The layering of adloop's folders, checked from the code's own imports.

``schemas`` ← ``bandit`` ← ``generator`` ← ``streams`` ← ``bench`` ← the root
(``src/adloop``: the ``adloop`` command and the demo). A folder imports only the
folders to its left; the root's leaf modules (logging set-up) may be used by all.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {
    "schemas": "schemas",
    "bandit": "bandit",
    "generator": "generator",
    "streams": "streams",
    "bench": "bench",
    "root": "src/adloop",
}
ALLOWED: dict[str, set[str]] = {
    "schemas": set(),
    "bandit": {"schemas"},
    "generator": {"schemas", "bandit"},
    "streams": {"schemas", "bandit", "generator"},
    "bench": {"schemas", "bandit", "generator", "streams"},
    "root": {"schemas", "bandit", "generator", "streams", "bench"},
}
#: Modules of the root package that import nothing of adloop, usable from every layer.
ROOT_LEAVES = {"adloop.log_setup"}


def _adloop_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "adloop"}
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and node.module
            and node.module.split(".")[0] == "adloop"
        ):
            found.add(node.module)
    return found


def _folder_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in FOLDERS and parts[1] != "root":
        return parts[1]
    return "root"


@pytest.mark.parametrize("folder", sorted(FOLDERS))
def test_a_folder_imports_only_the_layers_below_it(folder: str) -> None:
    wrong = []
    for path in sorted((REPO / FOLDERS[folder]).glob("*.py")):
        for module in _adloop_imports(path):
            target = _folder_of(module)
            if target == folder or module in ROOT_LEAVES or module == "adloop":
                continue
            if target not in ALLOWED[folder]:
                wrong.append(f"{path.relative_to(REPO)} imports {module}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_root_leaves_import_nothing_of_adloop() -> None:
    for module in ROOT_LEAVES:
        path = REPO / "src" / (module.replace(".", "/") + ".py")
        assert _adloop_imports(path) == set(), module


def test_only_adloop_is_installed_at_the_top() -> None:
    """pyproject maps every folder under the one `adloop` import package."""
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert all(p == "adloop" or p.startswith("adloop.") for p in config["packages"])
    assert set(config["package-dir"]) == set(config["packages"])
