"""How tasks end when things go wrong: killed, cancelled, queued, abandoned — never "running" forever."""

from __future__ import annotations

import errno
import json
import os
import pty
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from waiting import gone, until

import nbbgtask as bg
from nbbgtask.store import store as _store


def _started(status):
    assert until(lambda: status.refresh().pid is not None and "go" in status.log()), status
    return status.pid


def _sleeper(seconds=30):
    print("go", flush=True)
    time.sleep(seconds)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV])
def test_a_task_killed_by_a_signal_ends_failed_saying_how(home, sig):
    status = bg.run(_sleeper)
    pid = _started(status)
    os.kill(pid, sig)
    died = time.monotonic()
    assert until(status.done, timeout=2.5)
    assert time.monotonic() - died <= 2.0
    assert status.state == "failed"
    assert f"killed by signal {int(sig)} ({sig.name})" in status.error
    with pytest.raises(bg.TaskFailed, match=sig.name):
        status.result()


def test_death_of_a_task_started_by_another_process_is_noticed_on_read(home, tmp_path):
    script = tmp_path / "starter.py"
    script.write_text(textwrap.dedent(f"""
        import time, nbbgtask as bg
        bg.configure(home={str(home)!r})
        def nap():
            print("go", flush=True)
            time.sleep(60)
        s = bg.run(nap)
        print(s.id, flush=True)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True)
    status = bg.get(out.stdout.split()[-1])
    pid = _started(status)
    os.kill(pid, signal.SIGKILL)
    # Not our child: the task is reaped by init, and the next read notices it is gone.
    assert until(status.done, timeout=2.5)
    assert status.state == "failed"
    assert f"task process {pid} ended without reporting" in status.error


def test_a_reused_pid_does_not_keep_a_dead_task_running(home):
    status = bg.run(_sleeper)
    _started(status)
    # Make the record point at a live process that is not the task: this test process.
    store = _store.store_for(home)
    store.patch(status.id, {"pid": os.getpid(), "pid_started": psutil.Process().create_time() - 100})
    assert status.done()
    assert status.state == "failed"
    assert "ended without reporting" in status.error


def test_cancel_stops_a_running_task(home):
    status = bg.run(_sleeper)
    pid = _started(status)
    assert status.cancel() is True
    assert status.state == "cancelled"
    assert status.cancel_requested
    assert gone(pid)
    with pytest.raises(bg.TaskCancelled):
        status.result()
    assert status.cancel() is False  # already over


def test_cancel_runs_the_tasks_cleanup(home):
    def careful():
        try:
            _sleeper()
        finally:
            print("cleaned up", flush=True)

    status = bg.run(careful)
    _started(status)
    status.cancel()
    assert "cleaned up" in status.log()
    assert status.state == "cancelled"


def test_cooperative_task_sees_cancel_requested_and_stops_itself(home):
    class Polite(bg.BackgroundTask):
        cooperative_cancel = True

        def execute(self, status):
            print("go", flush=True)
            while not status.cancel_requested:
                time.sleep(0.01)
            print("stopping at a clean point", flush=True)
            return "partial"

    status = Polite.initiate()
    _started(status)
    assert status.cancel() is True
    assert status.state == "cancelled"
    assert "stopping at a clean point" in status.log()


def test_a_task_that_ignores_sigterm_is_killed_after_the_grace_period(home):
    bg.configure(cancel_grace=0.5)

    def stubborn():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _sleeper()

    status = bg.run(stubborn)
    _started(status)
    t = time.monotonic()
    assert status.cancel() is True
    assert time.monotonic() - t < 5
    assert status.state == "cancelled"


def test_cancel_reaches_the_tasks_own_children(home):
    def parent():
        child = subprocess.Popen(["sleep", "60"])
        print("go", child.pid, flush=True)
        child.wait()

    status = bg.run(parent)
    _started(status)
    child_pid = int(status.log(tail=1).split()[1])
    status.cancel()
    assert until(lambda: gone(child_pid))


def test_max_running_queues_the_rest_and_starts_them_as_slots_free(home):
    bg.configure(max_running=2)
    statuses = [bg.run(time.sleep, 0.4) for _ in range(5)]
    states = [s.state for s in statuses]
    assert states.count("running") == 2 and states.count("queued") == 3
    peak = 0
    while not all(s.done() for s in statuses):
        peak = max(peak, sum(s.state == "running" for s in statuses))
        time.sleep(0.02)
    assert peak <= 2
    assert all(s.state == "complete" for s in statuses)


def test_a_queued_task_can_be_cancelled_and_never_starts(home):
    bg.configure(max_running=1)
    first = bg.run(time.sleep, 0.5)
    queued = bg.run(print, "must not run")
    behind = bg.run(print, "runs instead")  # queued after it: the free slot passes it over to this one
    assert queued.state == behind.state == "queued"
    assert queued.cancel() is True
    assert queued.state == "cancelled"
    assert first.wait(10)
    assert behind.result(timeout=10) is None and behind.log().splitlines()[1:] == ["runs instead"]
    assert queued.refresh().state == "cancelled"
    assert queued.pid is None and queued.started is None and queued.log() == ""


def test_queued_tasks_fail_clearly_when_the_process_that_queued_them_exits(home, tmp_path):
    script = tmp_path / "queuer.py"
    script.write_text(textwrap.dedent(f"""
        import time, nbbgtask as bg
        bg.configure(home={str(home)!r}, max_running=1)
        a = bg.run(time.sleep, 1)
        b = bg.run(print, "late")
        print(a.id, b.id, b.state, flush=True)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True)
    first, queued, state = out.stdout.split()
    assert state == "queued"
    status = bg.get(queued)
    assert status.state == "failed"
    assert "NotStarted" in status.error and "exited" in status.error
    assert bg.get(first).result(timeout=10) is None  # the running one carries on


def test_no_zombies_are_left_behind(home):
    statuses = [bg.run(lambda: None) for _ in range(10)]
    for s in statuses:
        s.wait(30)
    assert until(lambda: not _zombie_children(), timeout=3)


def _zombie_children():
    zombies = []
    for child in psutil.Process().children():
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                zombies.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return zombies


def _who_am_i():
    try:
        os.close(os.open("/dev/tty", os.O_RDONLY))
        terminal = "opened"
    except OSError as exc:
        terminal = errno.errorcode[exc.errno]
    return os.getpgrp(), os.getsid(0), os.getpid(), terminal


def _caller_has_terminal():
    try:
        os.close(os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY))
        return True
    except OSError:
        return False


def test_task_leaves_the_callers_process_group(home):
    pgrp, sid, pid, terminal = bg.run(_who_am_i).result(timeout=30)
    assert pgrp == pid != os.getpgrp()
    if _caller_has_terminal():  # pytest run from a terminal: the task gets a session too
        assert sid == pid and terminal == "ENXIO"
    else:  # as under Jupyter: a group of its own is enough, and there is no terminal to lose
        assert sid == os.getsid(0) and terminal == "ENXIO"


def test_under_a_terminal_the_task_gets_a_session_and_no_terminal(home, tmp_path):
    """A caller with a controlling terminal (a script or IPython in a terminal): the task has a
    session of its own, so a program in it that asks the terminal for a password fails at once
    (ENXIO) instead of being stopped for good as a background job."""
    script = tmp_path / "in_a_terminal.py"
    script.write_text(textwrap.dedent(f"""
        import fcntl, json, os, sys, termios
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import nbbgtask as bg
        from test_lifecycle import _who_am_i
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # the pty on stdin becomes this session's terminal
        bg.configure(home={str(home)!r})
        caller_terminal = os.path.exists("/dev/tty") and os.isatty(0)
        print(json.dumps([caller_terminal, os.getsid(0), *bg.run(_who_am_i).result(timeout=30)]), flush=True)
    """))
    leader, follower = pty.openpty()
    try:
        caller = subprocess.run(
            [sys.executable, str(script)], stdin=follower, capture_output=True,
            start_new_session=True, timeout=60, text=True,
        )
    finally:
        os.close(follower)
        os.close(leader)
    assert caller.returncode == 0, caller.stderr
    caller_terminal, caller_sid, pgrp, sid, task_pid, terminal = json.loads(caller.stdout.strip().splitlines()[-1])
    assert caller_terminal is True
    assert pgrp == sid == task_pid != caller_sid
    assert terminal == "ENXIO"


def test_signals_to_the_callers_process_group_do_not_reach_the_task(home, tmp_path):
    # Jupyter interrupts, restarts and shuts down a kernel by signalling its process group.
    script = tmp_path / "kernel_like.py"
    script.write_text(textwrap.dedent(f"""
        import time, nbbgtask as bg
        bg.configure(home={str(home)!r})
        def slow():
            time.sleep(1.5)
            return 7
        print(bg.run(slow).id, flush=True)
        time.sleep(60)
    """))
    caller = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    task_id = caller.stdout.readline().strip()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        os.killpg(caller.pid, sig)
    caller.wait(10)
    caller.stdout.close()
    assert bg.get(task_id).result(timeout=10) == 7


def test_unknown_ids_raise_task_not_found(home):
    with pytest.raises(bg.TaskNotFound, match="no task 'nope'"):
        bg.get("nope")
    with pytest.raises(KeyError):
        bg.get("nope")
    with pytest.raises(TypeError):
        bg.get(42)


CLOSED_STDIO = textwrap.dedent("""
    import os, sys
    import nbbgtask as bg
    bg.configure(home=sys.argv[1])
    out = os.dup(1)
    os.close(0)  # a daemon's, or a service's, process may have none of these
    os.close(2)

    def task():
        print("to the log")
        return sys.stdout.isatty(), sys.stdin.read()

    status = bg.run(task)
    os.write(out, repr((status.result(timeout=60), status.log().splitlines()[-1])).encode())
""")


def test_a_task_starts_from_a_process_whose_standard_fds_are_closed(home, tmp_path):
    """The task's standard streams are made by its parent before the fork, over fds 0-2; where
    the parent has none of those, the task makes its own, and prints reach its log all the same."""
    script = tmp_path / "closed.py"
    script.write_text(CLOSED_STDIO)
    out = subprocess.run([sys.executable, str(script), str(home)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == repr(((False, ""), "to the log"))
