"""The same API on a real Dask LocalCluster with worker processes.

What every way of running a task promises (result, failure and traceback, settings and secrets,
progress, cancel, the log, lookups) is in test_contract.py, run on a LocalCluster too; this file
keeps what only Dask has: workers, their spares and forkers, a cluster shared by kernels."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import cloudpickle
import psutil
import pytest
from waiting import gone, until
from ways import local_cluster

import nbbgtask as bg

distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.timeout(180)

# The workers cannot import this test module; send its functions by value, as cloudpickle does
# for functions defined in a notebook.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(2, 2) as cluster:
        yield cluster


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


def test_forty_tasks_spread_over_both_workers(on_dask):
    statuses = [bg.run(_steps, 3, 0.05) for _ in range(40)]
    assert [s.result(timeout=120) for s in statuses] == [6] * 40
    workers = {bg.get(s.id)._record.get("worker") for s in statuses}
    assert len(workers) == 2


def test_a_worker_killed_mid_task_is_never_left_running(on_dask):
    status = bg.run(_steps, 40, 0.1)
    assert until(lambda: status.refresh().percent > 0, timeout=30)
    worker = status.to_dict()["worker"]
    client = distributed.Client(on_dask.scheduler_address, set_as_default=False)
    try:
        pids = client.run(os.getpid)
        first = status.pid
        os.kill(pids[worker], signal.SIGKILL)
    finally:
        client.close()
    # Its forker sees the worker go and ends the task's child: no copy of it runs on unwatched.
    assert until(lambda: gone(first), timeout=15)
    # Dask may run it again on the other worker, or give up: either way it ends, and says so.
    assert until(status.done, timeout=120)
    if status.state == "complete":  # run again, to the end, on the worker that is left
        assert status.to_dict()["worker"] != worker
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
    # Leaving with a task still running logged "cannot schedule new futures after interpreter shutdown".
    assert "Traceback" not in out.stderr and "ERROR" not in out.stderr, out.stderr
    assert bg.get(task_id).state in ("queued", "running")
    client = distributed.Client(cluster.scheduler_address, set_as_default=False)
    try:
        assert until(lambda: _reported(client, task_id, "final"), timeout=60), "the task never ended on the cluster"
    finally:
        client.close()
    assert bg.get(task_id).state in ("queued", "running")  # nobody listened: the store does not know yet
    # A new "kernel" connects: the events it missed are still on the scheduler.
    bg.configure(backend="dask", address=cluster.scheduler_address)
    try:
        status = bg.get(task_id)
        assert status.result(timeout=30) == "kept"
        assert "finished after the kernel left" in status.log()
    finally:
        bg.configure(backend="local")


def test_closing_the_connection_while_a_task_runs_does_not_record_it_cancelled(home, cluster):
    # Closing the client cancels its futures; each future's callback took that for the task's
    # cancel, while the task ran on to its end on the cluster (bg.configure with another home or
    # cluster closes the connection).
    from nbbgtask.dask import backend as _dask_backend
    bg.configure(backend="dask", address=cluster.scheduler_address)
    try:
        status = bg.run(_steps, 20, 0.1)
        assert until(lambda: status.refresh().percent > 0, timeout=30)
        _dask_backend.close()
        time.sleep(0.5)  # the cancelled futures' callbacks run in Dask's callback thread
        assert status.refresh().state is bg.State.RUNNING
        bg.configure(backend="dask", address=cluster.scheduler_address)
        assert status.result(timeout=60) == 40  # ran on to its end, and was recorded
    finally:
        bg.configure(backend="local")


def test_a_multiprocessing_child_of_a_process_connected_to_dask_ends_well(home, cluster):
    # The connection closes as its process exits, in a hook multiprocessing's forked children
    # run too as they end: there it tried to close the parent's client and exited with code 1.
    import multiprocessing

    bg.configure(backend="dask", address=cluster.scheduler_address)
    try:
        child = multiprocessing.get_context("fork").Process(target=sum, args=([1, 2],))
        child.start()
        child.join(30)
        assert child.exitcode == 0
    finally:
        bg.configure(backend="local")


def test_a_kernel_that_starts_while_the_task_runs_applies_each_event_once(home, cluster, tmp_path):
    # The scheduler sends a new kernel every event it keeps, those the kernel before it applied
    # too: its printed lines were written to the log twice, and its "started" said "restarted".
    script = tmp_path / "kernel.py"
    script.write_text(textwrap.dedent(f"""
        import time, nbbgtask as bg
        bg.configure(home={str(home)!r})
        bg.configure(backend="dask", address={cluster.scheduler_address!r})
        def lines():
            for i in range(8):
                print("line", i, flush=True)
                bg.progress(percent=12.5 * (i + 1), message=f"step {{i}}")
                time.sleep(0.5)
            return "kept"
        status = bg.run(lines)
        print(status.id, flush=True)
        while "line 2" not in status.log():  # this kernel applies the first events, then leaves
            time.sleep(0.05)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True)
    task_id = out.stdout.split()[-1]
    assert bg.get(task_id).state == "running" and "line 2" in bg.get(task_id).log()
    bg.configure(backend="dask", address=cluster.scheduler_address)
    try:
        status = bg.get(task_id)
        assert status.result(timeout=60) == "kept"
        assert status.log().splitlines()[-8:] == [f"line {i}" for i in range(8)], status.log()
        assert status.log().count("line 0") == 1
        assert status.message == "step 7"
    finally:
        bg.configure(backend="local")


def test_a_script_that_closes_its_cluster_as_its_task_ends_logs_no_error(home, tmp_path):
    # A task's worker watched for a cancel by waiting on its event on the scheduler; a wait still
    # open when the cluster closed made the scheduler log "distributed.event - ERROR" with a
    # CancelledError's traceback, on every such run.
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f"""
        import nbbgtask as bg
        from distributed import Client, LocalCluster
        def double(x):
            return 2 * x
        if __name__ == "__main__":
            with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster, Client(cluster) as client:
                bg.configure(home={str(home)!r}, dask_client=client)
                print(bg.run(double, 21).result(timeout=60), flush=True)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["42"], out.stderr
    assert "ERROR" not in out.stderr and "CancelledError" not in out.stderr, out.stderr


def _reported(client, task_id, kind):
    """The task's worker has sent an event of ``kind`` (see _dask_wire): events are sealed with
    the task's key, which its record (in the home) holds."""
    from nbbgtask.dask.wire import TOPIC, unseal

    key = bytes.fromhex(bg.get(task_id).to_dict()["event_key"])
    opened = [unseal(key, task_id, event) for _, event in client.get_events(TOPIC)]
    return any(event is not None and event["kind"] == kind for event in opened)


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
    from nbbgtask.dask import backend as _dask_backend
    first = _dask_backend.backend()
    for _ in range(3):
        bg.configure(backend="dask", address=on_dask.scheduler_address)
    assert _dask_backend.backend() is first
    status = bg.run(print, "once")
    status.wait(60)
    assert status.log() == "once\n"


# -- spares: a child forked ahead of time on each worker, handed the next task -----------------------


@pytest.fixture(scope="module")
def one_worker():
    """A cluster of one worker with two threads: where a task runs, and in what, is known."""
    with local_cluster(1, 2) as cluster:
        yield cluster


@pytest.fixture
def on_one_worker(home, one_worker):
    settings = bg.configure(backend="dask", address=one_worker.scheduler_address)
    yield settings.dask_client
    bg.configure(backend="local")


def _spare_pid(dask_worker):
    from nbbgtask.dask import worker as _dask_worker
    pool = _dask_worker._pools.get(dask_worker.id)
    spare = None if pool is None else pool._spare
    return None if spare is None else spare.pid


def _ready_spare(client):
    """The pid of the one worker's idle spare, once it has one (after a first task made it)."""
    pids = []

    def ready():
        pids[:] = list(client.run(_spare_pid).values())
        return pids[0] is not None

    if not ready():
        assert bg.run(os.getpid).result(timeout=60)
        assert until(ready, timeout=30), "no spare was forked after the first task"
    return pids[0]


def _worker_pid(client):
    [pid] = client.run(os.getpid).values()
    return pid


def _next_spare(client, not_this):
    """Wait for the worker's next spare (not ``not_this``); its pid."""
    pids = []

    def fresh():
        pids[:] = list(client.run(_spare_pid).values())
        return pids[0] not in (None, not_this)

    assert until(fresh, timeout=30), f"no new spare after {not_this}"
    return pids[0]


def _setenv(name, value):
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _forker_pid(dask_worker):
    from nbbgtask.dask import worker as _dask_worker
    pool = _dask_worker._pools.get(dask_worker.id)
    forker = None if pool is None else pool._forker
    return None if forker is None else forker.pid


def test_a_task_runs_in_the_ready_spare_and_a_new_one_follows(on_one_worker):
    spare = _ready_spare(on_one_worker)
    status = bg.run(os.getpid)
    assert status.result(timeout=60) == spare == status.pid
    _next_spare(on_one_worker, spare)


def test_the_worker_forks_once_its_forker_forks_the_spares(on_one_worker):
    worker = psutil.Process(_worker_pid(on_one_worker))
    spare = _ready_spare(on_one_worker)
    [forker] = on_one_worker.run(_forker_pid).values()
    for _ in range(3):
        pid = bg.run(os.getpid).result(timeout=60)
        assert pid == spare and psutil.Process(_next_spare(on_one_worker, spare)).ppid() == forker
        spare = next(iter(on_one_worker.run(_spare_pid).values()))
        assert [p.pid for p in worker.children()] == [forker]  # no other child of the worker itself


def test_a_spare_runs_its_task_in_the_workers_environment_and_folder_of_that_moment(on_one_worker, tmp_path):
    spare = _ready_spare(on_one_worker)
    on_one_worker.run(_setenv, "NBBGTASK_TEST_MARK", "set after the spare was forked")
    before = next(iter(on_one_worker.run(os.getcwd).values()))
    on_one_worker.run(os.chdir, str(tmp_path))
    try:
        status = bg.run(lambda: (os.getpid(), os.environ.get("NBBGTASK_TEST_MARK"), os.getcwd()))
        assert status.result(timeout=60) == (spare, "set after the spare was forked", str(tmp_path))
    finally:
        on_one_worker.run(_setenv, "NBBGTASK_TEST_MARK", None)
        on_one_worker.run(os.chdir, before)


def test_a_worker_whose_folder_is_gone_fails_the_task_and_leaves_no_child_behind(on_one_worker, tmp_path):
    spare = _ready_spare(on_one_worker)
    before = next(iter(on_one_worker.run(os.getcwd).values()))
    gone = tmp_path / "gone"
    gone.mkdir()
    on_one_worker.run(os.chdir, str(gone))
    gone.rmdir()
    try:
        status = bg.run(os.getpid)
        with pytest.raises(bg.TaskFailed):
            status.result(timeout=60)
        assert status.error.startswith("FileNotFoundError")
        assert until(lambda: not psutil.pid_exists(spare), timeout=10)  # ended and reaped
        [forker] = on_one_worker.run(_forker_pid).values()
        assert [p.pid for p in psutil.Process(_worker_pid(on_one_worker)).children()] == [forker]
        assert psutil.Process(forker).children() == []
    finally:
        on_one_worker.run(os.chdir, before)
    assert bg.run(os.getpid).result(timeout=60) != spare

def test_a_task_cancelled_while_running_in_a_spare_ends_cancelled(on_one_worker):
    spare = _ready_spare(on_one_worker)
    status = bg.run(_steps, 600)
    assert until(lambda: status.refresh().percent > 0, timeout=30)
    assert status.pid == spare
    started = time.monotonic()
    assert status.cancel() is True
    assert time.monotonic() - started < 5
    assert status.state == "cancelled"
    assert until(lambda: not psutil.pid_exists(spare), timeout=5)  # ended, and reaped by the worker


def _meet(folder, me, other):
    """Runs only if ``other`` runs at the same time: each waits to see the other's file."""
    open(os.path.join(folder, me), "w").close()
    assert until(lambda: os.path.exists(os.path.join(folder, other)), timeout=30), f"{other} never ran beside {me}"
    return os.getpid()


def test_two_tasks_at_once_on_one_worker_both_run_one_in_the_spare(on_one_worker, tmp_path):
    spare = _ready_spare(on_one_worker)
    first, second = bg.run(_meet, str(tmp_path), "a", "b"), bg.run(_meet, str(tmp_path), "b", "a")
    pids = {first.result(timeout=60), second.result(timeout=60)}
    assert len(pids) == 2 and spare in pids  # the other was forked there and then


def test_a_killed_spare_is_replaced_and_the_next_task_still_runs(on_one_worker):
    spare = _ready_spare(on_one_worker)
    os.kill(spare, signal.SIGKILL)
    status = bg.run(os.getpid)
    assert status.result(timeout=60) not in (None, spare)
    assert until(lambda: not psutil.pid_exists(spare), timeout=10)  # reaped, not left a zombie
    _next_spare(on_one_worker, spare)


_HELD: list[int] = []


def _hold_descriptors(n):
    """On the worker: open ``n`` descriptors (or let them go, n=0), as a worker with many connections has."""
    import resource

    while _HELD:
        os.close(_HELD.pop())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if n and soft < n + 200:
        if hard != resource.RLIM_INFINITY and hard < n + 200:
            return False
        resource.setrlimit(resource.RLIMIT_NOFILE, (n + 200, hard))
    _HELD.extend(os.open(os.devnull, os.O_RDONLY) for _ in range(n))
    return True


def test_a_worker_with_descriptors_beyond_a_thousand_still_runs_tasks(on_one_worker):
    spare = _ready_spare(on_one_worker)
    if not next(iter(on_one_worker.run(_hold_descriptors, 1100).values())):
        pytest.skip("cannot open 1,100 descriptors here")
    try:
        assert bg.run(os.getpid).result(timeout=60) == spare
        fresh = _next_spare(on_one_worker, spare)  # its pipes are numbered beyond 1,100
        assert bg.run(os.getpid).result(timeout=60) == fresh
    finally:
        on_one_worker.run(_hold_descriptors, 0)

def test_a_task_too_big_for_one_pipe_write_is_handed_to_the_spare_whole(on_one_worker):
    spare = _ready_spare(on_one_worker)
    big = os.urandom(3_000_000)  # far beyond a pipe's capacity: the rest is written from a thread
    status = bg.run(lambda data: (os.getpid(), hashlib.sha256(data).hexdigest()), big)
    assert status.result(timeout=60) == (spare, hashlib.sha256(big).hexdigest())


def test_a_worker_that_closes_under_a_running_task_stops_its_child_and_dask_runs_it_again(home):
    with local_cluster(2, 1) as cluster:
        client = bg.configure(backend="dask", address=cluster.scheduler_address).dask_client
        status = bg.run(_steps, 600)
        assert until(lambda: status.refresh().percent > 0, timeout=30)
        first_pid, first_worker = status.pid, status.to_dict()["worker"]
        client.retire_workers([first_worker], close_workers=True)
        # Dask runs it again on the other worker; the first run's child does not run on beside it.
        assert until(lambda: not psutil.pid_exists(first_pid), timeout=15)
        assert until(lambda: status.refresh().pid not in (None, first_pid), timeout=30)
        assert status.state == "running" and status.to_dict()["worker"] != first_worker
        assert status.message.startswith("restarted on ")
        assert status.cancel() is True
        assert status.state == "cancelled"


def test_no_spare_outlives_its_worker(home):
    with local_cluster(1, 1) as cluster:
        client = bg.configure(backend="dask", address=cluster.scheduler_address).dask_client
        spare = _ready_spare(client)
        [forker] = client.run(_forker_pid).values()
        worker = psutil.Process(_worker_pid(client))
        assert {spare, forker} <= {p.pid for p in worker.children(recursive=True)}
    # The worker ended its spare and forker as it closed, and they were reaped: not even zombies.
    assert until(lambda: not psutil.pid_exists(spare) and not psutil.pid_exists(forker), timeout=15)


def test_a_worker_that_closes_ends_and_reaps_its_spare_even_if_its_process_lives_on(home):
    """In-process workers: the spare is a child of this very process, so only the worker's own
    clean-up (not the end of its process) can end it."""
    with local_cluster(1, 1, processes=False) as cluster:
        client = bg.configure(backend="dask", address=cluster.scheduler_address).dask_client
        spare = _ready_spare(client)
        [forker] = client.run(_forker_pid).values()
        assert {spare, forker} <= {p.pid for p in psutil.Process().children(recursive=True)}
    assert until(lambda: not psutil.pid_exists(spare) and not psutil.pid_exists(forker), timeout=15)


def test_a_spare_and_its_forker_go_when_their_worker_is_killed(home):
    with local_cluster(1, 1) as cluster:
        client = bg.configure(backend="dask", address=cluster.scheduler_address).dask_client
        spare = _ready_spare(client)
        [forker] = client.run(_forker_pid).values()
        os.kill(_worker_pid(client), signal.SIGKILL)


        # Their connections to the worker closed with it: they leave rather than run on without it.
        assert until(lambda: gone(spare) and gone(forker), timeout=15)


def test_no_child_of_the_worker_holds_another_childs_pipes():
    """The forker (and a spare the worker forks itself) closes every pipe end of this module that
    is not its own (here, in this process, as if it were the worker)."""
    from nbbgtask.dask import pipes as _dask_pipes
    from nbbgtask.dask import spares as _dask_spares
    read, write = _dask_pipes.pipe()
    forker = _dask_spares.Forker()
    spares = [_dask_spares.fork_spare(forker), _dask_spares.fork_spare(None)]
    inode = os.fstat(write).st_ino

    def holds_it(pid):
        fds = f"/proc/{pid}/fd"
        for fd in os.listdir(fds):
            try:
                target = os.readlink(os.path.join(fds, fd))
            except FileNotFoundError:  # closed since the listing: it holds nothing now
                continue
            if target == f"pipe:[{inode}]":
                return True
        return False

    try:
        for pid in (forker.pid, *(spare.pid for spare in spares)):
            assert until(lambda pid=pid: not holds_it(pid), timeout=10), pid
        _dask_pipes.close_pipes(write)
        assert os.read(read, 1) == b""  # end of file: no other process holds the write end
    finally:
        for spare in spares:
            spare.discard()
        forker.close()
        _dask_pipes.close_pipes(read, write)
    for pid in (forker.pid, *(spare.pid for spare in spares)):
        assert not psutil.pid_exists(pid)


def test_a_task_still_ends_well_if_its_forker_is_killed_and_the_next_one_gets_a_new_forker(on_one_worker):
    _ready_spare(on_one_worker)
    [forker] = on_one_worker.run(_forker_pid).values()
    status = bg.run(_steps, 15, 0.1)
    assert until(lambda: status.refresh().percent > 0, timeout=30)
    os.kill(forker, signal.SIGKILL)
    assert status.result(timeout=60) == 30  # its reports and result still reach the worker
    assert bg.run(os.getpid).result(timeout=60)
    assert until(lambda: next(iter(on_one_worker.run(_forker_pid).values())) not in (None, forker), timeout=30)


# -- the kernel sends the task first and records it while it travels ---------------------------------


class _StoreWithInsert:
    """The real store, but ``insert`` (what submit() calls once the task is sent) replaced."""

    def __init__(self, store, insert):
        self._store, self.insert = store, insert

    def __getattr__(self, name):
        return getattr(self._store, name)


def test_what_a_task_reports_before_it_is_recorded_waits_for_the_record(on_dask, monkeypatch):
    from nbbgtask.dask import backend as _dask_backend
    real = _dask_backend.store_for

    def slow_store(home):
        store = real(home)

        def insert(record):
            time.sleep(1.0)  # the task starts, reports and ends meanwhile
            store.insert(record)

        return _StoreWithInsert(store, insert)

    monkeypatch.setattr(_dask_backend, "store_for", slow_store)
    status = bg.run(print, "reported early")
    monkeypatch.undo()
    assert status.result(timeout=30) is None
    assert status.state == "complete" and status.pid and status.started
    assert status.log() == "reported early\n"


def _late_mark(path):
    time.sleep(1.5)
    open(path, "w").close()


def _gone_from_the_cluster(client, task_id):
    """The scheduler had the task and has dropped it, and no worker runs anything of it: neither
    the task (``key``) nor the thread that watches its child until the child is reaped."""
    key, thread = f"nbbgtask-{task_id}", f"nbbgtask-{task_id[:8]}"

    def on_scheduler(dask_scheduler):
        return not dask_scheduler.story(key) or key in dask_scheduler.tasks

    def on_worker(dask_worker):
        import threading

        return key in dask_worker.state.tasks or any(t.name == thread for t in threading.enumerate())

    return not client.run_on_scheduler(on_scheduler) and not any(client.run(on_worker).values())


def test_a_task_that_cannot_be_recorded_is_stopped_and_the_error_raised(on_dask, monkeypatch, tmp_path):
    from nbbgtask.dask import backend as _dask_backend
    real = _dask_backend.store_for

    sent = []

    def full_disk(record):
        sent.append(record["id"])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_dask_backend, "store_for", lambda home: _StoreWithInsert(real(home), full_disk))
    mark = tmp_path / "ran"
    with pytest.raises(OSError, match="No space left"):
        bg.run(_late_mark, str(mark))
    monkeypatch.undo()
    [task_id] = sent
    assert until(lambda: _gone_from_the_cluster(_dask_backend.backend().client, task_id), timeout=30)
    assert not mark.exists()
    assert bg.tasks() == []


def _takes_sigterm(pid):
    """Process ``pid`` no longer ignores SIGTERM (fork_detached ignores it; a spare restores it
    once it has a session of its own)."""
    with open(f"/proc/{pid}/status") as status:
        ignored = next(int(line.split()[1], 16) for line in status if line.startswith("SigIgn:"))
    return not ignored & (1 << (signal.SIGTERM - 1))


def test_a_cancel_that_comes_before_the_task_is_ready_for_it_still_stops_it():
    """SIGTERM reaches a spare before run_job has its handler in place (a cancel sent at once):
    it must end the process, not be ignored as fork_detached leaves it."""
    from nbbgtask.dask import spares as _dask_spares
    forker = _dask_spares.Forker()
    try:
        for spare in (_dask_spares.fork_spare(forker), _dask_spares.fork_spare(None)):
            try:
                # Sent once the spare has left fork_detached's SIGTERM-ignoring set-up, before its task.
                assert until(lambda spare=spare: _takes_sigterm(spare.pid), timeout=30)
                os.kill(spare.pid, signal.SIGTERM)
                assert until(lambda spare=spare: spare.poll() is not None, timeout=30)
                assert spare.poll() == -signal.SIGTERM
            finally:
                spare.discard()
    finally:
        forker.close()


def _waiting_in_a_named_function(seconds):
    def waiting_for_the_lock():
        time.sleep(seconds)

    waiting_for_the_lock()


def test_the_stack_of_a_task_on_a_worker_is_read_through_its_worker(on_dask, home):
    """The kernel's own client asks the task's worker; the command line, not connected, asks
    through a short-lived client of the task's scheduler; both get the child's stack back."""
    status = bg.run(_waiting_in_a_named_function, 120)
    assert until(lambda: status.refresh().pid is not None, 60)
    text = status.stack()
    assert "waiting_for_the_lock" in text and "_waiting_in_a_named_function" in text, text
    cli = subprocess.run([sys.executable, "-m", "nbbgtask", "stack", status.id], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "NBBGTASK_HOME": str(home)})
    assert cli.returncode == 0 and "waiting_for_the_lock" in cli.stdout, cli.stderr
    status.cancel()
    assert status.wait(60) and status.state == "cancelled"
    with pytest.raises(bg.NbbgtaskError, match="ended"):
        status.stack()


def test_dask_without_its_extra_is_a_clear_error_at_configure(home):
    """`pip install nbbgtask distributed` (no cryptography): configure says which pip install to
    run, before it connects, and changes nothing."""
    code = textwrap.dedent("""
        import sys
        sys.modules["cryptography"] = None  # as if it were not installed
        import nbbgtask as bg
        try:
            bg.configure(backend="dask", address="tcp://127.0.0.1:9")
        except bg.NbbgtaskError as exc:
            print("ERROR", exc)
        print("BACKEND", bg.configure().backend)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "NBBGTASK_HOME": str(home)})
    assert out.returncode == 0, out.stderr
    assert "ERROR" in out.stdout and "'cryptography'" in out.stdout, out.stdout
    assert 'pip install "nbbgtask[dask]"' in out.stdout and "BACKEND local" in out.stdout, out.stdout
