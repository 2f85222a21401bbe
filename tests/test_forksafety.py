"""Real notebook code, unchanged: tasks after polars, scikit-learn's OpenMP and numpy, with the defaults.

Each case runs as a script in a fresh interpreter ("the notebook"): a thread pool started in the
pytest process itself would stay for every later test.  The script first does the work in the
notebook, then the same in ``bg.run`` with default settings, and prints how the task was started
and its result; a task that hangs fails the case by its timeout, not the whole suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from waiting import gone, until

import nbbgtask as bg
from nbbgtask.local import forksafety as _forksafety

pytestmark = pytest.mark.timeout(240)

#: what a notebook does first; the task then does the same
WORK = {
    "numpy": """
        import numpy as np
        def work():
            a = np.random.default_rng(0).random((1500, 1500))
            return float((a @ a).sum() > 0)
    """,
    "scikit-learn": """
        import numpy as np
        from sklearn.ensemble import HistGradientBoostingClassifier
        def work():
            rng = np.random.default_rng(0)
            X = rng.random((20000, 10)); y = (X[:, 0] > 0.5).astype(int)
            return float(HistGradientBoostingClassifier(max_iter=10).fit(X, y).score(X, y) > 0.9)
    """,
    "polars": """
        import polars as pl
        def work():
            df = pl.DataFrame({"k": [i % 100 for i in range(2_000_000)], "v": range(2_000_000)})
            return float(df.group_by("k").agg(pl.col("v").sum()).height)
    """,
}


#: set in this process by Dask's nanny (distributed's pre-spawn-environ) once a test ran a
#: LocalCluster; a notebook has none of them, and with them set no pool starts threads at all
_THREAD_LIMITS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "POLARS_MAX_THREADS")


def _notebook(tmp_path: Path, body: str, timeout: float = 120) -> dict:
    script = tmp_path / "notebook.py"
    script.write_text(textwrap.dedent(body))
    env = {k: v for k, v in os.environ.items() if k not in _THREAD_LIMITS}
    env["NBBGTASK_HOME"] = str(tmp_path / "home")
    done = subprocess.run([sys.executable, "-W", "error", str(script)], capture_output=True, text=True, env=env, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("library", "before", "after"), [
    ("numpy", "fork", "fork"),
    # libgomp is loaded by the import, and OpenBLAS's threads run: the OpenMP rule errs on the safe side
    ("scikit-learn", "forkserver", "forkserver"),
    ("polars", "fork", "forkserver"),
])
def test_a_task_after_the_notebook_used_a_library_completes_with_the_defaults(tmp_path, library, before, after):
    """After the notebook ran the library's parallel code, a runtime that breaks a fork sends the
    task to the fork server, and it completes (before, importing polars alone is harmless)."""
    out = _notebook(tmp_path, WORK[library] + """
        import json, nbbgtask as bg
        first = bg.run(work)
        assert first.result(timeout=60) > 0
        in_notebook = work()
        second = bg.run(work)
        value = second.result(timeout=60)
        print(json.dumps({"before": first.start_method, "after": second.start_method, "value": value,
                          "in_notebook": in_notebook, "log": second.log().splitlines()[0]}))
    """)
    assert (out["before"], out["after"]) == (before, after)
    assert out["value"] == out["in_notebook"] > 0
    assert out["log"].startswith(f"nbbgtask: started by {after} (start_method='auto': ")
    if after == "forkserver":
        assert "not by fork, since" in out["log"] and ("polars" in out["log"] or "OpenMP" in out["log"])


@pytest.mark.parametrize(("library", "named"), [("polars", "polars"), ("scikit-learn", "an OpenMP runtime (libgomp")])
def test_forcing_fork_after_a_runtime_started_warns_once_naming_it(tmp_path, library, named):
    out = _notebook(tmp_path, WORK[library] + """
        import json, warnings, nbbgtask as bg
        work()
        bg.configure(start_method="fork")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tasks = [bg.run(int, "7") for _ in range(3)]   # code that does not touch the runtime
        print(json.dumps({"warnings": [str(w.message) for w in caught if w.category is RuntimeWarning],
                          "methods": [t.start_method for t in tasks],
                          "results": [t.result(timeout=30) for t in tasks]}))
    """)
    assert out["methods"] == ["fork"] * 3 and out["results"] == [7] * 3
    assert len(out["warnings"]) == 1, out["warnings"]
    assert named in out["warnings"][0] and "may hang" in out["warnings"][0]


def test_importing_a_known_runtime_is_a_hazard_torch_by_a_stand_in(tmp_path):
    """torch is too large for these machines: its rule is checked with a module of its name."""
    out = _notebook(tmp_path, """
        import json, sys, types
        from nbbgtask.local import forksafety as _forksafety
        before = _forksafety.hazard()
        sys.modules["torch"] = types.ModuleType("torch")
        print(json.dumps({"before": before, "after": _forksafety.hazard()}))
    """)
    assert out["before"] is None
    assert out["after"].startswith("torch is imported")


def test_native_threads_alone_are_no_hazard(tmp_path):
    """numpy's OpenBLAS threads survive a fork: a thread count alone would send numpy users away."""
    out = _notebook(tmp_path, WORK["numpy"] + """
        import json, os, threading
        from nbbgtask.local import forksafety as _forksafety
        work()
        native = len(os.listdir("/proc/self/task")) - threading.active_count()
        print(json.dumps({"native": native, "hazard": _forksafety.hazard()}))
    """)
    assert out["native"] >= 1 and out["hazard"] is None


def test_the_verdict_follows_an_openmp_pool_started_after_a_fork(tmp_path):
    """A fork stops OpenBLAS's threads; the OpenMP workers that a fit then starts are seen
    (a cached verdict keyed on the number of threads missed them: one ended as one began)."""
    out = _notebook(tmp_path, WORK["scikit-learn"] + """
        import json, os
        from nbbgtask.local import forksafety as _forksafety
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        quiet = _forksafety.hazard()
        work()
        print(json.dumps({"quiet": quiet, "then": _forksafety.hazard()}))
    """)
    assert out["quiet"] is None and "OpenMP" in out["then"]


def test_the_verdict_is_recomputed_when_threads_change(tmp_path):
    out = _notebook(tmp_path, WORK["polars"] + """
        import json
        from nbbgtask.local import forksafety as _forksafety
        first = _forksafety.hazard()
        work()
        print(json.dumps({"first": first, "then": _forksafety.hazard()}))
    """)
    assert out["first"] is None and "polars" in out["then"]


def test_the_pytest_process_itself_is_safe_to_fork():
    assert _forksafety.hazard() is None


# -- the fork server ---------------------------------------------------------------------------


def _server_pids() -> set[int]:
    import psutil

    return {p.pid for p in psutil.process_iter(["cmdline"]) if "nbbgtask.local.forkserver import main" in " ".join(p.info["cmdline"] or [])}


def test_a_task_from_the_fork_server_is_in_a_group_of_its_own_and_its_death_is_told(home):
    bg.configure(start_method="forkserver")
    status = bg.run(time.sleep, 60)
    assert until(lambda: status.refresh().pid is not None, timeout=30)
    assert os.getpgid(status.pid) == status.pid != os.getpgid(0)
    assert status.to_dict()["reaper_pid"] in _server_pids()
    os.kill(status.pid, 9)
    assert until(lambda: status.done(), timeout=15)
    assert status.state == "failed" and "killed by signal 9 (SIGKILL)" in status.error


def test_the_fork_server_leaves_with_its_last_task_once_its_kernel_has_gone(tmp_path):
    """No orphans: a notebook that exits leaves its server running only while its task runs; the
    task's result is there for a new process (the kernel after a restart)."""
    out = _notebook(tmp_path, """
        import json, time, nbbgtask as bg
        bg.configure(start_method="forkserver")
        def slow():
            time.sleep(2)
            return "after the kernel left"
        status = bg.run(slow)
        print(json.dumps({"id": status.id, "server": status.to_dict()["reaper_pid"]}))
    """)
    import psutil

    assert psutil.pid_exists(out["server"])
    bg.configure(home=tmp_path / "home")
    status = bg.get(out["id"])
    assert status.result(timeout=30) == "after the kernel left"
    assert until(lambda: gone(out["server"]), timeout=15)


def test_a_job_that_cannot_travel_to_the_fork_server_names_the_object_and_the_choice(home):
    import threading

    bg.configure(start_method="forkserver")
    lock = threading.Lock()
    with pytest.raises(TypeError, match=r"cannot be sent to the fork server.*lock.*start_method='fork'"):
        bg.run(lambda: lock.locked())
    assert bg.tasks() == []  # nothing was stored
