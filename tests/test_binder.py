"""The Binder environment, built from binder/ alone in a fresh virtual environment, runs the tour."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import nbformat
import pytest
from kernel_driver import _spec_manager
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
#: the front ends and widget packages the browser test (tests/test_browser.py) runs the notebooks
#: in: Binder must pin the very versions it passed with
FRONT_END = ("jupyterlab", "notebook", "ipykernel", "ipywidgets", "jupyterlab_widgets", "widgetsnbextension")


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "binder" / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"binder/requirements.txt: {line!r} is not pinned with =="
            pins[name] = version
    return pins


@pytest.fixture(scope="module")
def binder_python(tmp_path_factory):
    venv = tmp_path_factory.mktemp("binder") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", str(ROOT / "binder" / "requirements.txt")], check=True, env=env, timeout=900)
    # postBuild installs the package from a copy, as Binder builds from a fresh clone
    subprocess.run([str(ROOT / "binder" / "postBuild")], check=True, env=env, timeout=600)
    return python


@pytest.mark.timeout(1200)
def test_binder_environment_runs_every_notebook(binder_python, tmp_path, monkeypatch):
    monkeypatch.setenv("NBBGTASK_HOME", str(tmp_path / "home"))
    # The "python3" kernel of this run is the Binder environment's (JUPYTER_PATH comes first).
    specs = tmp_path / "jupyter"
    (specs / "kernels").mkdir(parents=True)
    (specs / "kernels" / "python3").symlink_to(Path(_spec_manager(binder_python).kernel_dirs[0]) / "python3")
    monkeypatch.setenv("JUPYTER_PATH", str(specs))
    monkeypatch.setenv("PATH", f"{binder_python.parent}{os.pathsep}{os.environ['PATH']}")
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
        client.execute()
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
        assert not errors, (path.name, errors)
    version = subprocess.run(
        [str(binder_python), "-c", "import nbbgtask, ipykernel; print(nbbgtask.__file__)"],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    ).stdout
    assert "site-packages" in version  # the installed package, not this checkout


def test_binder_installs_exactly_its_pins_and_pins_the_front_ends_the_browser_test_uses(binder_python):
    pins = _pins()
    listed = subprocess.run(
        [str(binder_python), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    installed = {p["name"].lower().replace("-", "_"): p["version"] for p in json.loads(listed)}
    assert {name: installed.get(name.lower().replace("-", "_")) for name in pins} == pins
    check = subprocess.run([str(binder_python), "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    # Notebook 7 too: Binder users may open /tree, and the Cancel click is tested there.
    tested = {name: metadata.version(name) for name in FRONT_END}
    assert {name: pins.get(name) for name in FRONT_END} == tested, "update binder/requirements.txt"
