"""Fixtures: a fresh home folder per test, the ways a task runs (tests/ways.py), and a real
ipykernel driven over jupyter_client."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fault_helpers import ATTACKER

import nbbgtask as bg
from nbbgtask.core import config as _config

sys.path.insert(0, str(Path(__file__).parent))

from ways import WAYS, Way, local_cluster, started_by  # noqa: E402  (found through the line above)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """Every test gets its own store; settings go back to the defaults afterwards."""
    path = tmp_path / "home"
    _config.reset()
    bg.configure(home=path, cancel_grace=2)
    yield path
    for status in bg.tasks(state=["queued", "running"]):
        status.cancel()
    _config.reset()


@pytest.fixture(params=WAYS, ids=[way.name for way in WAYS])
def way(request: pytest.FixtureRequest, home: Path) -> Iterator[Way]:
    """Each test that takes it runs once per way a task runs, with nbbgtask configured that way;
    afterwards, every task the test left in the store was started that way (none fell back to
    another)."""
    way: Way = request.param
    way.configure(request)
    yield way
    left = bg.tasks()
    assert {status.id: started_by(status) for status in left} == {status.id: way.name for status in left}


@pytest.fixture(scope="module")
def dask_cluster() -> Iterator[object]:
    """One small LocalCluster per module that asks for it: one worker process, two threads."""
    with local_cluster(1, 2) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def dask_client(dask_cluster: object) -> Iterator[object]:
    import distributed

    from nbbgtask.dask import backend as _dask_backend
    with distributed.Client(dask_cluster, set_as_default=False) as client:
        try:
            yield client
        finally:  # nbbgtask lets go of the client before it closes
            bg.configure(backend="local")
            _dask_backend.close()


ROOT = Path(__file__).resolve().parent.parent
#: the kernels the kernel tests run against: this interpreter's ipykernel (7.x), and 6.x from the
#: second environment that ./dev test makes
KERNELS = {"ipykernel7": Path(sys.executable), "ipykernel6": ROOT / ".venv-ipykernel6" / "bin" / "python"}


@pytest.fixture(params=sorted(KERNELS))
def kernel(request: pytest.FixtureRequest, home: Path) -> Iterator[object]:
    from kernel_driver import Kernel

    python = KERNELS[request.param]
    if not python.exists():
        pytest.skip(f"no {python}: ./dev test creates it (ipykernel 6.x, to test both kernel lines)")
    k = Kernel(env={**os.environ, "NBBGTASK_HOME": str(home)}, python=python)
    expected = request.param[-1]
    assert k.ok("import ipykernel; print(ipykernel.__version__)").startswith(expected)
    try:
        yield k
    finally:
        k.shutdown()


@pytest.fixture(scope="module")
def attacker() -> Iterator[pwd.struct_passwd]:
    """Another ordinary user of the machine (`fault_helpers.ATTACKER`), made with useradd."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the attacks need a second user, made here with useradd")
    if shutil.which("useradd") is None:
        pytest.skip("no useradd on this machine to make the second user")
    made = False
    try:
        pwd.getpwnam(ATTACKER)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", ATTACKER], check=True)
        made = True
    yield pwd.getpwnam(ATTACKER)
    if made:
        subprocess.run(["userdel", ATTACKER], check=False)
