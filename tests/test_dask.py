"""The same API on a real Dask LocalCluster with worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import cloudpickle
import psutil
import pytest
from waiting import until

import nbbgtask as bg

distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.timeout(180)

# The workers cannot import this test module; send its functions by value, as cloudpickle does
# for functions defined in a notebook.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=2, processes=True, dashboard_address=":0", silence_logs=50
    ) as cluster:
        yield cluster
        from nbbgtask import _dask_backend

        _dask_backend.close()  # before the cluster goes, so the client does not try to reconnect


@pytest.fixture
def on_dask(home, cluster):
    bg.configure(backend="dask", address=cluster.scheduler_address)
    yield cluster
    bg.configure(backend="local")


def _steps(n, pause=0.1):
    for _ in bg.track(range(n), message="on a worker"):
        time.sleep(pause)
    print("done on", os.getpid(), flush=True)
    return n * 2


def _breaks():
    bg.progress(25, "about to fail")
    raise ValueError("remote spline")


def test_progress_log_and_result_come_back_from_a_worker(on_dask):
    status = bg.run(_steps, 20)
    assert status.refresh().state in ("queued", "running")
    assert until(lambda: 0 < status.refresh().percent < 100, timeout=30)
    assert status.message == "on a worker"
    assert status.result(timeout=60) == 40
    assert status.state == "complete" and status.percent == 100
    assert status.log().startswith("done on ")
    assert int(status.log().split()[-1]) == status.pid != os.getpid()


def test_initiate_with_settings_and_secrets(on_dask):
    class Remote(bg.BackgroundTask):
        def execute(self, status):
            return status.settings["x"] + len(status.secrets["token"])

    assert Remote.initiate(settings={"x": 1}, secrets={"token": "abcd"}).result(timeout=60) == 5


def test_a_failure_on_a_worker_keeps_its_traceback(on_dask):
    status = bg.run(_breaks)
    with pytest.raises(bg.TaskFailed):
        status.result(timeout=60)
    assert status.error == "ValueError: remote spline"
    assert 'raise ValueError("remote spline")' in status.traceback
    assert status.percent == 25


def test_cancel_stops_a_running_task_on_the_worker(on_dask):
    status = bg.run(_steps, 600)
    assert until(lambda: status.refresh().percent > 0, timeout=30)
    pid = status.pid
    assert psutil.pid_exists(pid)
    started = time.monotonic()
    assert status.cancel() is True
    assert time.monotonic() - started < 5
    assert status.state == "cancelled"
    assert until(lambda: not psutil.pid_exists(pid), timeout=5)
    with pytest.raises(bg.TaskCancelled):
        status.result()


def test_forty_tasks_spread_over_both_workers(on_dask):
    statuses = [bg.run(_steps, 3, 0.05) for _ in range(40)]
    assert [s.result(timeout=120) for s in statuses] == [6] * 40
    workers = {bg.get(s.id)._record.get("worker") for s in statuses}
    assert len(workers) == 2


def test_a_worker_killed_mid_task_is_never_left_running(on_dask):
    status = bg.run(_steps, 40, 0.1)
    assert until(lambda: status.refresh().percent > 0, timeout=30)
    worker = status._record["worker"]
    client = distributed.Client(on_dask.scheduler_address, set_as_default=False)
    try:
        pids = client.run(os.getpid)
        os.kill(pids[worker], signal.SIGKILL)
    finally:
        client.close()
    # Dask may run it again on the other worker, or give up: either way it ends, and says so.
    assert until(status.done, timeout=120)
    if status.state == "complete":  # run again, to the end, on the worker that is left
        assert status._record["worker"] != worker
    else:
        assert status.state == "failed" and status.error


def test_the_cli_sees_and_cancels_dask_tasks(on_dask, home):
    status = bg.run(_steps, 600)
    assert until(lambda: status.refresh().percent > 0, timeout=30)
    nbbgtask = os.path.join(os.path.dirname(sys.executable), "nbbgtask")
    listing = subprocess.run([nbbgtask, "--home", str(home), "list"], capture_output=True, text=True, timeout=60)
    assert status.id[:8] in listing.stdout and "running" in listing.stdout
    cancelled = subprocess.run([nbbgtask, "--home", str(home), "cancel", status.id], capture_output=True, text=True, timeout=60)
    assert cancelled.returncode == 0, cancelled.stderr
    assert status.refresh().state == "cancelled"


def test_a_task_outlives_the_kernel_that_sent_it(home, cluster, tmp_path):
    script = tmp_path / "kernel.py"
    script.write_text(textwrap.dedent(f"""
        import time, nbbgtask as bg
        bg.configure(home={str(home)!r})
        bg.configure(backend="dask", address={cluster.scheduler_address!r})
        def slow():
            time.sleep(2)
            print("finished after the kernel left", flush=True)
            return "kept"
        print(bg.run(slow).id, flush=True)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True)
    task_id = out.stdout.split()[-1]
    assert bg.get(task_id).state in ("queued", "running")
    time.sleep(3)
    # A new "kernel" connects: the events it missed are still on the scheduler.
    bg.configure(backend="dask", address=cluster.scheduler_address)
    try:
        status = bg.get(task_id)
        assert status.result(timeout=30) == "kept"
        assert "finished after the kernel left" in status.log()
    finally:
        bg.configure(backend="local")


def test_an_unreachable_scheduler_is_a_clear_error_and_local_tasks_go_on(home):
    with pytest.raises(bg.NbbgtaskError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"):
        bg.configure(backend="dask", address="tcp://127.0.0.1:9")
    assert bg.run(lambda: "local").result(timeout=30) == "local"
    with pytest.raises(ValueError, match="needs address"):
        bg.configure(backend="dask")


def test_the_progress_bar_follows_a_dask_task(on_dask):
    bar = bg.ProgressBar(bg.run(_steps, 10, 0.05))
    assert until(lambda: bar._bar.bar_style == "success", timeout=30)
    assert bar._bar.value == 100


def test_the_magic_runs_a_cell_on_the_cluster_and_brings_its_names_back(kernel, cluster):
    kernel.ok(f"""
%load_ext nbbgtask
import os, threading, nbbgtask as bg
bg.configure(backend="dask", address={cluster.scheduler_address!r})
base = 21
guard = threading.Lock()   # cannot travel: the cell is told, and does not use it
""")
    out = kernel.run("""%%bgtask --focus
import os
total = base * 2
where = os.getpid()
""")
    assert out["status"] == "ok", out["error"]
    assert "cannot be sent to the cluster" not in out["stderr"]
    assert kernel.ok("print(total, where != os.getpid())").strip() == "42 True"
    failing = kernel.run("""%%bgtask --focus
x = 1
y = guard.acquire()
""")
    assert "cannot be sent to the cluster (not picklable), so the cell will not see them there: guard" in failing["stderr"]
    text = "\\n".join(failing["error"]["traceback"])
    assert failing["error"]["ename"] == "TaskFailed" and "NameError" in text and "y = guard.acquire()" in text
    kernel.ok("bg.configure(backend='local')")


def test_configuring_the_same_cluster_again_keeps_one_client(on_dask):
    from nbbgtask import _dask_backend

    first = _dask_backend.backend()
    for _ in range(3):
        bg.configure(backend="dask", address=on_dask.scheduler_address)
    assert _dask_backend.backend() is first
    status = bg.run(print, "once")
    status.wait(60)
    assert status.log() == "once\n"
