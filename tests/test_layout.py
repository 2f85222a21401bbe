"""The library's shape: sub-packages in layers, imports that run one way, modules one can read.

The contracts themselves (no sub-package imports from a layer above its own; the local and the
Dask backend independent) are checked by import-linter (``lint-imports``, run by ./dev test);
these tests keep them whole and check what import-linter does not: that every module sits in a
layered sub-package, that no import is ignored, and that the import graph, imports inside
functions included, has no cycle at all.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "nbbgtask"
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
(LAYERS,) = [c for c in CONFIG["contracts"] if c["type"] == "layers"]
MAX_LINES = 500


def _layered() -> list[str]:
    return [name.strip() for layer in LAYERS["layers"] for name in layer.split("|")]


def _graph() -> grimp.ImportGraph:
    return grimp.build_graph("nbbgtask", include_external_packages=False)


def test_every_module_of_the_library_sits_in_a_layered_sub_package():
    layered = _layered()
    assert len(layered) <= 10 + 1, "at most ten layers of sub-packages (and __main__)"
    unplaced = sorted(
        m for m in _graph().modules if m != "nbbgtask" and not any(m == p or m.startswith(p + ".") for p in layered)
    )
    assert unplaced == [], "modules outside every layer in pyproject.toml"
    missing = sorted(p for p in layered if p not in _graph().modules)
    assert missing == [], "layers name packages that do not exist"


def test_no_contract_ignores_an_import():
    for contract in CONFIG["contracts"]:
        assert not contract.get("ignore_imports"), f"{contract['name']}: ignores imports"


def test_the_local_and_the_dask_backend_are_independent():
    assert any(
        c["type"] == "independence" and set(c["modules"]) == {"nbbgtask.local", "nbbgtask.dask"} for c in CONFIG["contracts"]
    )


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
    """Module -> the modules it imports, at module level or inside a function (grimp sees both);
    a package's ``__init__`` only re-exports, so an import of the root package counts for nothing."""
    return {
        m: {t for t in graph.find_modules_directly_imported_by(m) if t != "nbbgtask"}
        for m in graph.modules
        if m != "nbbgtask"
    }


def test_no_import_cycle_among_the_modules():
    assert _cycle(_edges(_graph())) is None


def test_the_cycle_check_finds_a_cycle():
    graph = _graph()
    graph.add_import(importer="nbbgtask.core.states", imported="nbbgtask.api.functions")  # a made-up upward import
    found = _cycle(_edges(graph))
    assert found is not None and found[0] == found[-1] and "nbbgtask.core.states" in found


def test_function_level_imports_are_in_the_graph():
    """The cycle check counts imports inside functions: grimp reports one we know is there."""
    graph = _graph()
    assert "nbbgtask.commands.magic" in graph.find_modules_directly_imported_by("nbbgtask")  # load_ipython_extension


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_over_the_limit(path):
    assert path.read_text().count("\n") <= MAX_LINES, f"{path.relative_to(ROOT)}: split it by responsibility"


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*/__init__.py")), ids=lambda p: p.parent.name)
def test_each_sub_package_says_what_it_holds_and_may_import(path):
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert "may import" in doc.lower(), f"{path.relative_to(ROOT)}: say what it holds and what it may import"


def test_importing_the_library_loads_no_dask_and_no_cloudpickle():
    """``import nbbgtask`` (a script, the command line, a kernel that never uses Dask) loads no
    Dask backend, no ``distributed``, no cloudpickle, and no widgets."""
    code = (
        "import sys, json, nbbgtask; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('distributed', 'dask', 'cloudpickle', 'ipywidgets') or m.startswith('nbbgtask.dask'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []


def test_the_check_of_loaded_modules_sees_a_backend_once_it_is_used():
    code = (
        "import sys, nbbgtask; from nbbgtask import backends; backends.module('dask'); "
        "print('nbbgtask.dask.backend' in sys.modules, 'distributed' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "True"
