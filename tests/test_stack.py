"""What a stuck task is doing: `status.stack()`, `nbbgtask stack`, and the stalled marker.

Real tasks, blocked for real: in `time.sleep`, on a lock, and in C code that holds the GIL.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time

import cloudpickle
import pytest
from waiting import until

import nbbgtask as bg
from nbbgtask.core import format as _format
from nbbgtask.store.store import store_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def wait_for_the_network(marker):
    open(marker, "w").close()
    time.sleep(60)


def hold_the_gil_in_c(marker):
    open(marker, "w").close()
    re.match(r"(a+)+$", "a" * 40 + "b")  # catastrophic backtracking, all in C, the GIL held


def second_thread_waits(ready):
    lock = threading.Lock()
    lock.acquire()
    ready.set()
    lock.acquire()  # never released


def two_threads(marker):
    ready = threading.Event()
    threading.Thread(target=second_thread_waits, args=(ready,), daemon=True).start()
    ready.wait()
    wait_for_the_network(marker)


#: what `stack()` shows for the frames below a task's code
RUNNER_LINE = "  (below: nbbgtask's runner, and what started the task)"


def _current_thread(text):
    """The frames of the thread the dump calls current (the task's main thread here)."""
    return text.split("Current thread", 1)[1]


def _start(fn, tmp_path):
    marker = tmp_path / "blocked"
    status = bg.run(fn, str(marker))
    assert until(marker.exists, timeout=30), "the task never got to the blocking call"
    return status


def test_stack_names_the_function_a_task_is_blocked_in(way, tmp_path):
    status = _start(wait_for_the_network, tmp_path)
    text = status.stack()
    if way.name == "dask":  # the worker's child dumps it and the worker sends it back sealed
        assert "in wait_for_the_network" in text, text
        assert status.refresh().state == "running"
        return
    frames = _current_thread(text).splitlines()
    assert frames[1].endswith("in wait_for_the_network"), text
    # Below the task's code: one line, not nbbgtask's runner nor the frames of the process it
    # was forked from (here pytest's; in a notebook the kernel's event loop and cell).
    assert frames[2:] == [RUNNER_LINE], text
    assert "_pytest" not in text and "in fork_detached" not in text and "in run_job" not in text, text
    assert status.refresh().state == "running"  # asking does not disturb the task
    assert "in wait_for_the_network" in status.stack()  # and it can be asked again


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_a_task_holding_the_gil_in_c_still_shows_its_stack(home, tmp_path, start_method):
    bg.configure(start_method=start_method)
    status = _start(hold_the_gil_in_c, tmp_path)
    time.sleep(0.5)
    # Its progress thread cannot run (no report, so no pid in the record): the GIL is held.
    assert status.refresh().pid is None and status.state == "running"
    frames = _current_thread(status.stack()).splitlines()
    assert frames[1].endswith(" in match") and frames[2].endswith("in hold_the_gil_in_c"), frames


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_every_thread_is_shown(home, tmp_path, start_method):
    bg.configure(start_method=start_method)
    status = _start(two_threads, tmp_path)
    text = status.stack()
    assert "in second_thread_waits" in text and "in wait_for_the_network" in text
    assert "in _loop" in text  # nbbgtask's own progress thread, too
    # the task's two threads and nbbgtask's progress writer, and whatever else nbbgtask runs there
    # (the memory sampler of its limits): every thread, each with a header
    headers = re.findall(r"^(Current thread|Thread) 0x[0-9a-f]+ \(most recent call first\):$", text, re.M)
    assert len(headers) >= 3 and headers.count("Current thread") == 1


def test_an_ended_or_queued_task_has_no_stack(home, tmp_path):
    done = bg.run(int, "7")
    assert done.result(timeout=30) == 7
    with pytest.raises(bg.NbbgtaskError, match=r"has ended \(complete\): it has no stack any more"):
        done.stack()
    bg.configure(max_running=1)
    blocker = _start(wait_for_the_network, tmp_path)
    queued = bg.run(int, "8")
    assert queued.state == "queued"
    with pytest.raises(bg.NbbgtaskError, match="is queued: it has no process yet"):
        queued.stack()
    blocker.cancel()
    with pytest.raises(bg.NbbgtaskError, match=r"has ended \(cancelled\)"):
        blocker.stack()


def _own_stack():
    return bg.current().stack()


def test_a_task_can_read_its_own_stack(home):
    text = bg.run(_own_stack).result(timeout=30)
    frames = _current_thread(text).splitlines()
    assert frames[-2].endswith("in _own_stack") and frames[-1] == RUNNER_LINE, text


# -- the command line --------------------------------------------------------------------------------


def cli(home, *args):
    command = [os.path.join(os.path.dirname(sys.executable), "nbbgtask"), "--home", str(home), *args]
    env = {**os.environ, "COLUMNS": "160"}  # wide enough that rich shortens no cell of the list
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)


def test_cli_stack_prints_it_and_says_by_its_exit_code_when_there_is_none(home, tmp_path):
    status = _start(wait_for_the_network, tmp_path)
    shown = cli(home, "stack", status.id[:6])
    assert shown.returncode == 0, shown.stderr
    assert _current_thread(shown.stdout).splitlines()[1].endswith("in wait_for_the_network")
    status.cancel()
    ended = cli(home, "stack", status.id[:6])
    assert ended.returncode == 1 and ended.stdout == ""
    assert ended.stderr.startswith("nbbgtask: task 'wait_for_the_network'") and ended.stderr.count("\n") == 1
    unknown = cli(home, "stack", "zzzz")
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1


# -- stalled tasks ---------------------------------------------------------------------------------------


def _reports_then_waits(marker):
    bg.progress(10, "first")
    time.sleep(0.5)
    bg.progress(20, "second")
    open(marker, "w").close()
    time.sleep(60)


def test_reported_moves_only_when_the_progress_changes(home, tmp_path):
    before = time.time()
    status = _start(_reports_then_waits, tmp_path)
    assert until(lambda: status.refresh().message == "second", timeout=10)
    reported = status.to_dict()["reported"]
    # the first report ("first", or the start) came at least 0.4 s before "second" was written
    assert before + 0.4 <= reported <= time.time()
    time.sleep(0.6)  # the progress thread keeps looking; nothing changed, so nothing is written
    assert status.refresh().to_dict()["reported"] == reported


def test_a_task_without_progress_for_long_is_marked_stalled_with_a_pointer_to_stack(home, tmp_path):
    status = _start(wait_for_the_network, tmp_path)
    assert until(lambda: status.refresh().pid is not None, timeout=10)  # its first report
    fresh = status.to_dict()
    assert "reported" in fresh and _format.stalled_for(fresh) is None
    assert "no progress" not in _format.summary(fresh)
    # As if its progress last changed 1000 s ago (the task itself changes nothing while it sleeps).
    store_for(home).patch(status.id, {"reported": time.time() - 1000})
    record = status.refresh().to_dict()
    assert " · no progress for 16:40 — see stack" in _format.summary(record, now=record["reported"] + 1000)
    assert _format.stalled_for(record, now=record["reported"] + _format.STALLED_AFTER - 1) is None
    listing = cli(home, "list")
    (line,) = [line for line in listing.stdout.splitlines() if status.id[:8] in line]
    assert "running" in line and "no progress for 16:4" in line and "see stack" in line
    shown = cli(home, "show", status.id[:8]).stdout
    assert "stalled:   no progress for 16:4" in shown
    status.cancel()
    assert "no progress" not in _format.summary(status.refresh().to_dict())  # only running tasks stall


def test_list_shows_task_text_as_it_is_not_as_markup(home):
    status = bg.run(int, "1", name="[bold]x[/bold]")
    status.wait(30)
    listing = cli(home, "list")
    assert "[bold]x[/bold]" in listing.stdout
