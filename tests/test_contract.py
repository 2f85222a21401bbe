"""The contract: what API.md promises of a task, written once and run against every way a task
runs (tests/ways.py: fork, spawn, a Dask LocalCluster; the fork server is one line there once it
lands).  Starting tasks with `initiate` and `run`; their results, failures and tracebacks;
settings and secrets; progress and track; cancel; the log; lookups.

What genuinely differs between the ways is at the end of this file, each test saying why.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import os
import sys
import threading
import time

import cloudpickle
import psutil
import pytest
import tqdm as tqdm_in_the_caller  # noqa: F401 - a forked task inherits it; spawn and Dask import it afresh
from waiting import gone, until
from ways import started_by, started_line

import nbbgtask as bg

# Spawned interpreters and Dask workers get this module's functions and classes by value, as
# cloudpickle sends what a notebook defines (a worker could not import this module).
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Reticulate(bg.BackgroundTask):
    def execute(self, status):
        n = status.settings["splines"]
        for i in range(n):
            status.update(percent=100 * (i + 1) / n, message=f"spline {i + 1} of {n}")
        return n


class Failing(bg.BackgroundTask):
    def execute(self, status):
        status.update(40, "about to fail")
        raise ValueError("bad spline")


def _steps(n, pause=0.1):
    for _ in bg.track(range(n), message="stepping"):
        time.sleep(pause)
    print("done in", os.getpid(), flush=True)
    return n * 2


def test_initiate_runs_execute_in_another_process_and_returns_its_value(way):
    status = Reticulate.initiate(settings={"splines": 40})
    assert status.state in ("queued", "running")
    assert status.result(timeout=30) == 40
    assert started_by(status) == way.name  # the way under test is the one that ran it
    assert status.state == "complete" and status.state is bg.State.COMPLETE
    assert status.percent == 100.0
    assert status.message == "spline 40 of 40"
    assert status.name == "Reticulate"
    assert status.settings == {"splines": 40}
    assert status.pid is not None and status.pid != os.getpid()


def test_timestamps_are_utc_and_ordered(way):
    status = Reticulate.initiate(settings={"splines": 3}, name="nightly")
    status.wait(30)
    assert status.name == "nightly"
    for stamp in (status.created, status.started, status.finished):
        assert stamp.tzinfo is not None and stamp.utcoffset() == dt.timedelta(0)
    assert status.created <= status.started <= status.finished


def test_run_takes_any_callable_with_args_that_need_not_be_json(way):
    seen = object()
    lookup = {("a", 1): seen}
    status = bg.run(lambda key, *, table: table[key] is seen, ("a", 1), table=lookup)
    assert status.name == "<lambda>"
    assert status.result(timeout=30) is True


def test_run_names_the_task_after_the_function(way):
    def crunch():
        return 1

    assert bg.run(crunch).name == "crunch"
    assert bg.run(crunch, name="custom").name == "custom"


def test_async_functions_run_to_completion(way):
    async def fetch(x):
        await asyncio.sleep(0.01)
        return x + 1

    assert bg.run(fetch, 1).result(timeout=30) == 2


def test_failure_records_one_line_error_and_full_traceback(way):
    status = Failing.initiate()
    with pytest.raises(bg.TaskFailed) as info:
        status.result(timeout=30)
    assert status.state == "failed"
    assert status.error == "ValueError: bad spline"
    assert 'raise ValueError("bad spline")' in status.traceback
    assert "runner.py" not in status.traceback.splitlines()[1]
    assert info.value.traceback == status.traceback
    assert "bad spline" in str(info.value)
    assert status.percent == 40  # the last progress before the failure is kept
    assert "ValueError: bad spline" in status.log()


def test_result_that_cannot_be_pickled_fails_the_task_naming_its_type(way):
    status = bg.run(threading.Lock)
    with pytest.raises(bg.TaskFailed):
        status.result(timeout=30)
    assert "lock" in status.error and "cannot be pickled" in status.error


def test_results_of_notebook_classes_come_back(way):
    class Point:
        def __init__(self, x):
            self.x = x

    assert bg.run(Point, 3).result(timeout=30).x == 3


def test_none_result_and_sys_exit_zero_complete(way):
    assert bg.run(lambda: None).result(timeout=30) is None
    assert bg.run(sys.exit, 0).result(timeout=30) is None
    code3 = bg.run(sys.exit, 3)
    with pytest.raises(bg.TaskFailed):
        code3.result(timeout=30)
    assert code3.error == "SystemExit: 3"


def test_log_holds_stdout_stderr_and_output_of_subprocesses(way):
    def noisy():
        import subprocess
        import sys

        print("to stdout")
        print("to stderr", file=sys.stderr)
        subprocess.run(["echo", "from a child process"], check=True)
        os.write(1, b"straight to fd 1\n")

    status = bg.run(noisy)
    status.wait(30)
    log = status.log()
    for line in ("to stdout", "to stderr", "from a child process", "straight to fd 1"):
        assert line in log
    assert status.log(tail=1) == "straight to fd 1\n"
    assert status.log(tail=0) == ""


def test_progress_is_seen_while_the_task_runs_and_its_output_after(way):
    status = bg.run(_steps, 10)
    assert until(lambda: 0 < status.refresh().percent < 100, timeout=30)
    assert status.state == "running" and status.message.startswith("stepping")
    assert status.result(timeout=30) == 20
    assert status.state == "complete" and status.percent == 100
    assert status.log() == started_line(status) + f"done in {status.pid}\n"
    assert status.pid != os.getpid()


def test_result_times_out_with_timeout_error(way):
    status = bg.run(time.sleep, 5)
    with pytest.raises(TimeoutError):
        status.result(timeout=0.2)
    assert not status.wait(0.05)
    assert status.is_running()


def test_await_gives_the_result_without_blocking_the_loop(way):
    status = bg.run(lambda: 41 + 1)

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        t = asyncio.ensure_future(ticker())
        value = await status
        t.cancel()
        return value, ticks

    value, ticks = asyncio.run(main())
    assert value == 42
    assert ticks > 0


def test_track_reports_percentage_and_yields_every_item(way):
    def work():
        seen = []
        for item in bg.track(range(50), message="items"):
            seen.append(item)
            time.sleep(0.005)
        return seen, bg.current().percent

    seen, percent = bg.run(work).result(timeout=30)
    assert seen == list(range(50))
    assert percent == 100.0


def test_track_without_length_counts_items(way):
    def work():
        for _ in bg.track(x for x in range(20)):
            pass
        return bg.current().message

    assert bg.run(work).result(timeout=30) == "items: 20"


def test_progress_track_current_are_no_ops_outside_a_task():
    assert bg.current() is None
    bg.progress(50, "nothing happens")
    assert list(bg.track(range(3))) == [0, 1, 2]


def test_current_is_the_running_task(way):
    status = bg.run(lambda: bg.current().id)
    assert status.result(timeout=30) == status.id


def test_percent_is_clamped_and_nan_refused(way):
    def work():
        status = bg.current()
        status.update(250)
        high = status.percent
        status.update(-3)
        low = status.percent
        try:
            status.update(math.nan)
        except ValueError as exc:
            return high, low, str(exc)

    high, low, error = bg.run(work).result(timeout=30)
    assert (high, low) == (100.0, 0.0)
    assert "NaN" in error
    with pytest.raises(ValueError, match="NaN"):
        bg.progress(math.nan)
    with pytest.raises(TypeError, match="percent must be a number"):
        bg.progress("half")


def test_update_from_outside_the_task_is_refused(way):
    status = bg.run(time.sleep, 2)
    with pytest.raises(bg.NbbgtaskError, match="inside task"):
        status.update(10)


# -- tqdm inside a task ----------------------------------------------------------------------------


def _tqdm_training(steps, pause=0.05):
    """A training loop as a framework draws it: tqdm to stderr (the task's log), no nbbgtask call."""
    from tqdm import tqdm

    for _ in tqdm(range(steps), desc="training"):
        time.sleep(pause)
    return steps


def test_tqdm_progress_reaches_the_status_while_the_task_runs_and_the_log_keeps_lines(way):
    assert "tqdm.std" in sys.modules  # a forked task inherits tqdm: patched as the task starts
    status = bg.run(_tqdm_training, 60)
    seen = []

    def moving():
        status.refresh()
        seen.append((status.percent, status.message))
        return 0 < status.percent < 100 and status.message.startswith("training: ")

    assert until(moving, timeout=30)
    percent, message = seen[-1]
    done = int(message.split(": ")[1].split("/")[0])
    assert message.startswith(f"training: {done}/60 [") and "it/s" in message
    assert percent == pytest.approx(100 * done / 60)
    assert status.result(timeout=30) == 60
    assert status.percent == 100.0
    assert status.message.startswith("training: 60/60 [")
    log = status.log()
    assert "\r" not in log and "\x1b" not in log
    assert log.startswith(started_line(status))
    lines = log[len(started_line(status)):].splitlines()
    # its first state and its last (a line at most every 10 s between): not a redraw per 0.1 s
    assert len(lines) == 2, log
    assert lines[0].startswith("training:   0%|") and "0/60" in lines[0]
    assert lines[1].startswith("training: 100%|") and "60/60" in lines[1]


def _nested_bars(epochs, batches):
    """What the status says at writes made while an inner bar is live: twice an epoch, with the
    inner bar moved between them."""
    from tqdm.auto import tqdm

    status = bg.current()
    writer = _counted_writes()
    seen = set()
    # mininterval=0: each bar's count is its true one at every write, not one tqdm last drew
    for _ in tqdm(range(epochs), desc="epochs", mininterval=0):
        for batch in tqdm(range(batches), desc="batches", leave=False, mininterval=0):
            if batch in (0, batches // 2):
                _await_writes(writer, 1)
                seen.add((status.percent, status.message.split(" [")[0]))
    return sorted(seen)


def test_nested_tqdm_bars_the_outermost_one_reports(way):
    seen = bg.run(_nested_bars, 3, 30).result(timeout=60)
    assert {(round(percent, 6), message) for percent, message in seen} == {
        (0.0, "epochs: 0/3"), (round(100 / 3, 6), "epochs: 1/3"), (round(200 / 3, 6), "epochs: 2/3"),
    }
    status = bg.find_last()
    assert status.message.startswith("epochs: 3/3 [")
    lines = status.log()[len(started_line(status)):].splitlines()
    assert "\r" not in status.log()
    assert len(lines) <= 2 + 3, lines  # the outer bar's first and last lines, each inner bar's first


def _await(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not seen in {timeout} s: {bg.current().percent}, {bg.current().message!r}")
        time.sleep(0.02)


def _counted_writes():
    """In a task: a list that grows by one as each write of its progress writer thread ends (each
    write also reads its tqdm bars), and a lock that, held, keeps the next write from starting."""
    from nbbgtask.task.runner import current_reporter

    reporter = current_reporter()
    flush = reporter.flush
    writes = []
    writes_lock = threading.Lock()

    def counted():
        with writes_lock:
            flush()
            writes.append(time.monotonic())

    reporter.flush = counted  # only the writer thread calls it
    return writes, writes_lock


def _await_writes(counted, n):
    """In a task: wait until ``n`` more writes of its progress writer have ended."""
    writes = counted[0]
    start = len(writes)
    _await(lambda: len(writes) >= start + n)


def _both_report():
    """The rule: field by field, the most recent change wins; the task's own report wins a tie."""
    from tqdm import tqdm

    status = bg.current()
    writer = _counted_writes()
    seen = {}
    bar = tqdm(total=10, desc="bar", mininterval=0)
    bar.update(4)
    _await(lambda: status.percent == 40)
    seen["bar moved"] = (status.percent, status.message.split(" [")[0])
    bg.progress(90, "mine")
    _await_writes(writer, 3)  # the bar has not moved since, so the task's report stays
    seen["reported since"] = (status.percent, status.message)
    bar.update(1)
    _await(lambda: status.percent == 50)
    seen["bar moved again"] = (status.percent, status.message.split(" [")[0])
    with writer[1]:  # both change between the same two writes: a tie
        bar.update(1)
        bg.progress(message="both")
    _await(lambda: status.percent == 60)
    _await_writes(writer, 2)
    seen["both moved"] = (status.percent, status.message)
    bar.close()
    return seen


def test_tqdm_and_the_tasks_own_reports_the_most_recent_change_wins(way):
    seen = bg.run(_both_report).result(timeout=60)
    assert seen == {
        "bar moved": (40.0, "bar: 4/10"),
        "reported since": (90.0, "mine"),
        "bar moved again": (50.0, "bar: 5/10"),
        "both moved": (60.0, "both"),
    }


# -- bad input: a clear error before any process starts -------------------------------------


def _no_process_started(home):
    return not (home / "live").exists() and not (home / "history").exists() and bg.tasks() == []


def test_settings_that_are_not_json_raise_type_error_before_starting(way, home):
    with pytest.raises(TypeError, match="JSON-serialisable"):
        Reticulate.initiate(settings={"when": dt.datetime.now()})
    with pytest.raises(TypeError, match="JSON-serialisable"):
        Reticulate.initiate(settings={"x": math.nan})
    with pytest.raises(TypeError, match="settings must be a dict"):
        Reticulate.initiate(settings=[1, 2])
    assert _no_process_started(home)


def test_settings_are_seen_as_stored(way):
    status = Reticulate.initiate(settings={"splines": 2, "pair": (1, 2)})
    assert status.settings == {"splines": 2, "pair": [1, 2]}
    status.wait(30)
    assert bg.get(status.id).settings == {"splines": 2, "pair": [1, 2]}


def test_task_class_without_execute_is_refused(way, home):
    class Empty(bg.BackgroundTask):
        pass

    with pytest.raises(TypeError, match="execute"):
        Empty.initiate()
    with pytest.raises(TypeError, match="execute"):
        bg.BackgroundTask.initiate()
    assert _no_process_started(home)


def test_run_refuses_non_callables_and_bad_names(way, home):
    with pytest.raises(TypeError, match="callable"):
        bg.run(42)
    with pytest.raises(TypeError, match="name"):
        bg.run(print, name="")
    with pytest.raises(TypeError, match="secrets must be a dict"):
        bg.run(print, secrets="hunter2")
    assert _no_process_started(home)


def _seen_in_proc(secret):
    """Where in this process's /proc entry (its command line, its environment) ``secret`` shows."""
    found = []
    for part in ("cmdline", "environ"):
        with open(f"/proc/{os.getpid()}/{part}", "rb") as f:
            if secret.encode() in f.read():
                found.append(part)
    return found


def test_secrets_reach_the_task_and_nothing_else(way, home):
    secret = "s3cr3t-" + os.urandom(8).hex()

    class Pay(bg.BackgroundTask):
        def execute(self, status):
            return status.settings["amount"], status.secrets["password"] == secret, _seen_in_proc(secret)

    def pay(amount):
        return amount, bg.current().secrets == {"password": secret}, _seen_in_proc(secret)

    status = Pay.initiate(settings={"amount": 3}, secrets={"password": secret})
    assert status.result(timeout=30) == (3, True, [])
    with pytest.raises(AttributeError, match="never stored"):
        status.secrets  # noqa: B018
    assert bg.run(pay, 4, secrets={"password": secret}).result(timeout=30) == (4, True, [])
    for path in home.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_ids_are_unguessable_and_unique(way):
    ids = {bg.run(lambda: None).id for _ in range(5)}
    assert len(ids) == 5
    for task_id in ids:
        assert len(task_id) == 32 and int(task_id, 16) >= 0


def test_settings_json_is_what_later_lookups_see(way, home):
    status = Reticulate.initiate(settings={"splines": 1, "label": "é"})
    assert status.wait(30)
    # As written to the history file (whichever shard holds it), not only as this process keeps it.
    [stored] = [
        record for path in (home / "history").glob("*.json")
        for task_id, record in json.loads(path.read_text(encoding="utf-8"))["tasks"].items() if task_id == status.id
    ]
    assert stored["settings"] == {"splines": 1, "label": "é"}


# -- cancel ------------------------------------------------------------------------------------------


def _careful():
    try:
        _steps(600)
    finally:
        print("cleaned up", flush=True)


def test_cancel_stops_a_running_task_and_runs_its_cleanup(way):
    status = bg.run(_careful)
    assert until(lambda: status.refresh().percent > 0, timeout=30)
    pid = status.pid
    assert pid is not None and psutil.pid_exists(pid)
    asked = time.monotonic()
    assert status.cancel() is True
    assert time.monotonic() - asked < 5  # SIGTERM is enough: no wait for the grace period
    assert status.state == "cancelled" and status.cancel_requested
    assert until(lambda: gone(pid), timeout=5)
    assert "cleaned up" in status.log()
    with pytest.raises(bg.TaskCancelled):
        status.result()
    assert status.cancel() is False  # already over


# -- lookups -----------------------------------------------------------------------------------------


def test_lookups_find_tasks_by_id_state_and_name_and_prune_forgets_finished_ones(way):
    done = bg.run(lambda: "x" * 1000, name="lookup")  # big enough for a result file of its own
    assert done.wait(30)
    failed = bg.run(lambda: 1 / 0, name="other")
    assert failed.wait(30)
    running = bg.run(_steps, 600, name="lookup")
    assert until(lambda: running.refresh().percent > 0, timeout=30)
    again = bg.get(done.id)
    assert again == done and again is not done and again.result() == "x" * 1000
    assert [s.id for s in bg.tasks()] == [running.id, failed.id, done.id]
    assert [s.id for s in bg.tasks(name="lookup")] == [running.id, done.id]
    assert [s.id for s in bg.tasks(state="failed")] == [failed.id]
    assert bg.find_last(state="running").id == running.id
    assert bg.find_last(state="complete", name="lookup").id == done.id
    assert bg.find_last(state="cancelled") is None
    assert bg.prune(keep=1) == 1  # the running task is not counted, nor ever pruned
    assert [s.id for s in bg.tasks()] == [running.id, failed.id]
    with pytest.raises(bg.TaskNotFound):
        bg.get(done.id)


# -- what differs between the ways ---------------------------------------------------------------------


def _json_mark():
    return getattr(json, "nbbgtask_test_mark", None)


def test_only_a_forked_task_inherits_the_callers_state(way):
    """A fork is a copy of the caller as it is at the start; spawn and Dask get the function and
    its arguments by cloudpickle, and import every module (here ``json``) afresh."""
    json.nbbgtask_test_mark = "set in the caller"
    try:
        seen = bg.run(_json_mark).result(timeout=30)
    finally:
        del json.nbbgtask_test_mark
    assert seen == ("set in the caller" if way.forks_the_caller else None)


def test_only_a_forked_task_takes_arguments_that_cannot_be_pickled(way, home):
    """A lock travels into a fork as part of the copy; the other ways must pickle it, and say so in
    the caller, before anything is stored or started."""
    lock = threading.Lock()
    if way.forks_the_caller:
        assert bg.run(lambda held: held.acquire(blocking=False), lock).result(timeout=30) is True
        assert not lock.locked()  # the task took its own copy
    else:
        with pytest.raises(TypeError, match="cannot be sent to .*cannot be pickled"):
            bg.run(lambda held: held.locked(), lock)
        assert _no_process_started(home)


# -- limits: the timeout (API.md, Limits) -------------------------------------------------------

GRACE = 1.0


def _sleeps(seconds):
    time.sleep(seconds)
    return "woke"


def _blocked_in_c_holding_the_gil(seconds):
    import ctypes

    # PyDLL keeps the GIL through the call, and system() waits on its child retrying on EINTR:
    # no Python signal handler runs until it returns.  Only the GIL-free backstop can end it.
    ctypes.PyDLL(None).system(f"sleep {seconds}".encode())
    return "woke"


@pytest.mark.parametrize("target", [_sleeps, _blocked_in_c_holding_the_gil], ids=["sleep", "native"])
def test_a_task_past_its_timeout_ends_failed_saying_so(way, target):
    bg.configure(cancel_grace=GRACE)
    began = time.monotonic()
    status = bg.run(target, 30, limits=bg.Limits(timeout=1))
    assert status.wait(timeout=1 + GRACE + 10)
    took = time.monotonic() - began
    assert status.state == "failed"
    assert "timed out after 1 s" in status.error
    # within timeout + grace + 1 s of starting (the start itself included)
    assert took < 1 + GRACE + 1, took
    if target is _sleeps:  # stopped by its own process at the timeout, where it was
        assert "in _sleeps" in status.traceback
    pid = status.pid
    if pid is not None and way.name != "dask":
        assert until(lambda: gone(pid), timeout=5)


def test_limits_is_bg_runs_own_keyword_and_never_reaches_the_function(way):
    def takes_kwargs(**kwargs):
        return sorted(kwargs)

    status = bg.run(takes_kwargs, limits=bg.Limits(timeout=60), other=1)
    assert status.result(timeout=60) == ["other"]
    assert status.to_dict()["limits"] == {"timeout": 60.0, "memory": None}
