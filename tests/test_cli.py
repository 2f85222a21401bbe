"""The nbbgtask command line, run as a separate process against tasks this process started."""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import sys
import threading
import time

import pytest
from waiting import until

import nbbgtask as bg


def cli(home, *args, timeout=60, module=False):
    command = [sys.executable, "-m", "nbbgtask"] if module else [os.path.join(os.path.dirname(sys.executable), "nbbgtask")]
    return subprocess.run([*command, "--home", str(home), *args], capture_output=True, text=True, timeout=timeout)


def _chatty():
    for i in range(5):
        print("line", i)
    return "ok"


def _breaks():
    raise RuntimeError("no such table")


def _slow_printer():
    for i in range(20):
        print("tick", i, flush=True)
        time.sleep(0.1)


def test_list_show_and_logs(home):
    done = bg.run(_chatty, name="chatty")
    done.wait(30)
    failed = bg.run(_breaks)
    failed.wait(30)
    listing = cli(home, "list")
    assert listing.returncode == 0
    lines = listing.stdout.splitlines()
    assert lines[0].split() == ["id", "name", "state", "percent", "message", "elapsed"]
    assert failed.id[:8] in lines[1] and "RuntimeError: no such table" in lines[1]
    assert done.id[:8] in lines[2] and "complete" in lines[2] and "100%" in lines[2]
    assert cli(home, "list", "--state", "failed").stdout.count("\n") == 2
    assert "chatty" in cli(home, "list", "--name", "chatty", "--limit", "1").stdout
    show = cli(home, "show", failed.id[:5])
    assert show.returncode == 0 and f"id:        {failed.id}" in show.stdout
    assert 'raise RuntimeError("no such table")' in show.stdout
    # the first line is nbbgtask's: how the task was started, and why
    started = "nbbgtask: started by fork (start_method='auto': no runtime that breaks a fork has started threads here)\n"
    assert cli(home, "logs", done.id).stdout == started + "".join(f"line {i}\n" for i in range(5))
    assert cli(home, "logs", done.id, "-n", "2").stdout == "line 3\nline 4\n"


def test_python_dash_m_is_the_same_program(home):
    assert cli(home, "list", module=True).stdout == "no tasks\n"


def test_logs_follow_prints_until_the_task_ends(home):
    status = bg.run(_slow_printer)
    followed = cli(home, "logs", status.id, "--follow")
    assert followed.returncode == 0
    assert followed.stdout == "nbbgtask: started by fork (start_method='auto': no runtime that breaks a fork has started threads here)\n" + "".join(f"tick {i}\n" for i in range(20))
    assert status.done()


def test_wait_exit_codes(home):
    ok = bg.run(_chatty)
    failed = bg.run(_breaks)
    slow = bg.run(time.sleep, 30)
    assert cli(home, "wait", ok.id).returncode == 0
    result = cli(home, "wait", failed.id)
    assert result.returncode == 1 and "failed: RuntimeError: no such table" in result.stdout
    timed_out = cli(home, "wait", slow.id, "--timeout", "0.3")
    assert timed_out.returncode == 3 and "still running" in timed_out.stderr
    assert cli(home, "cancel", slow.id).returncode == 0
    assert slow.refresh().state == "cancelled"
    assert cli(home, "wait", slow.id).returncode == 1
    again = cli(home, "cancel", slow.id)
    assert again.returncode == 1 and "already ended: cancelled" in again.stdout


def test_unknown_and_ambiguous_ids_exit_2_with_one_line(home):
    unknown = cli(home, "show", "nope")
    assert unknown.returncode == 2
    assert unknown.stderr == "nbbgtask: no task id starts with 'nope' (see the list of tasks)\n"
    statuses = [bg.run(lambda: None) for _ in range(40)]
    firsts = [s.id[0] for s in statuses]
    shared = next(c for c in firsts if firsts.count(c) > 1)
    ambiguous = cli(home, "wait", shared)
    assert ambiguous.returncode == 2 and ambiguous.stderr.count("\n") == 1 and "give more of the id" in ambiguous.stderr


def test_prune(home):
    for _ in range(3):
        bg.run(_chatty).wait(30)
    assert cli(home, "prune", "--keep", "1").stdout == "forgot 2 finished tasks\n"
    assert len(bg.tasks()) == 1


@pytest.mark.parametrize("command", ["list", "show", "logs", "wait", "cancel", "stack", "prune", "monitor"])
def test_every_command_has_help(home, command):
    out = cli(home, command, "--help")
    assert out.returncode == 0 and out.stdout.startswith("usage: nbbgtask")


def test_an_unusable_home_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    out = cli(tmp_path / "file" / "home", "list")
    assert out.returncode == 2 and out.stderr.startswith("nbbgtask: cannot use") and out.stderr.count("\n") == 1


def _read_all(fd, into):
    """Append what arrives on ``fd`` to ``into`` until its other side is closed."""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the pty's other side closed
            return
        if not chunk:
            return
        into.append(chunk)


def test_monitor_shows_tasks_until_interrupted(home):
    running = bg.run(time.sleep, 60, name="watched")  # runs until the fixture cancels it
    # On a terminal (a pty) the monitor draws as it goes; into a pipe it would draw only on exit.
    leader, follower = pty.openpty()
    with subprocess.Popen(
        [sys.executable, "-m", "nbbgtask", "--home", str(home), "monitor", "--interval", "0.2"],
        stdin=subprocess.DEVNULL, stdout=follower, stderr=subprocess.PIPE, env={**os.environ, "COLUMNS": "160"},
    ) as proc:
        os.close(follower)
        chunks: list[bytes] = []
        reader = threading.Thread(target=_read_all, args=(leader, chunks), daemon=True)
        reader.start()

        def rows():
            """How many times the monitor has drawn the running task's row."""
            lines = b"".join(chunks).decode(errors="replace").splitlines()
            return sum(running.id[:8] in line and "watched" in line and "running" in line for line in lines)

        # Twice: the second drawing comes from inside its refresh loop, where Ctrl-C is awaited.
        assert until(lambda: rows() >= 2, timeout=30), b"".join(chunks).decode(errors="replace")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""
        reader.join(10)
    os.close(leader)
    assert not reader.is_alive()
