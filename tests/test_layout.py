"""The library's shape: every module has its place in the layers, and imports make no cycle.

The layers contract itself (no module imports from a layer above its own) is checked by
import-linter (``lint-imports``, run by ./dev test); these tests keep that contract whole.
"""

from __future__ import annotations

import sys
from pathlib import Path

import grimp
import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
(LAYERS,) = [c for c in CONFIG["contracts"] if c["type"] == "layers"]


def _placed() -> list[str]:
    return [name.strip() for layer in LAYERS["layers"] for name in layer.split("|")]


def _graph() -> grimp.ImportGraph:
    return grimp.build_graph("nbbgtask", include_external_packages=False)


def test_every_module_of_the_library_has_a_layer():
    modules = {m for m in _graph().modules if m != "nbbgtask"}
    placed = _placed()
    # a package placed in a layer places its modules there too (import-linter's reading)
    unplaced = {m for m in modules if not any(m == p or m.startswith(p + ".") for p in placed)}
    assert sorted(unplaced) == [], "modules missing from the layers in pyproject.toml"
    assert sorted(set(placed) - modules) == [], "layers name modules that do not exist"
    assert len(placed) == len(set(placed)), "a module is placed in two layers"


def test_each_allowed_exception_says_why():
    text = (ROOT / "pyproject.toml").read_text()
    for rule in LAYERS.get("ignore_imports", []):
        before = text[: text.index(f'"{rule}"')].rstrip().splitlines()
        assert before[-1].lstrip().startswith("#"), f"{rule}: write its reason in a comment above it"


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle in the graph, as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def _edges(graph: grimp.ImportGraph) -> dict[str, set[str]]:
    ignored = {tuple(part.strip() for part in rule.split("->")) for rule in LAYERS.get("ignore_imports", [])}
    return {
        m: {t for t in graph.find_modules_directly_imported_by(m) if t != "nbbgtask" and (m, t) not in ignored}
        for m in graph.modules
        if m != "nbbgtask"
    }


def test_no_import_cycle_among_the_modules_but_the_allowed_exceptions():
    assert _cycle(_edges(_graph())) is None


def test_the_cycle_check_finds_a_cycle():
    graph = _graph()
    graph.add_import(importer="nbbgtask._states", imported="nbbgtask._api")  # a made-up upward import
    found = _cycle(_edges(graph))
    assert found is not None and found[0] == found[-1] and "nbbgtask._states" in found


@pytest.mark.parametrize("limit", [500])
def test_no_module_is_long_without_saying_why(limit):
    """A module over the limit holds one responsibility, and its docstring says so ("one job:")."""
    for path in sorted((ROOT / "nbbgtask").glob("*.py")):
        text = path.read_text()
        if text.count("\n") > limit:
            assert "one job:" in text.lower().split('"""')[1], f"{path.name}: {text.count(chr(10))} lines; split it or say why not"
