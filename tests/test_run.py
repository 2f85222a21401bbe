"""Starting tasks with `initiate` and `run`, their results, failures and reports."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import os
import time

import pytest

import nbbgtask as bg


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


def test_initiate_runs_execute_in_another_process_and_returns_its_value(home):
    status = Reticulate.initiate(settings={"splines": 40})
    assert status.state in ("queued", "running")
    assert status.result(timeout=30) == 40
    assert status.state == "complete" and status.state is bg.State.COMPLETE
    assert status.percent == 100.0
    assert status.message == "spline 40 of 40"
    assert status.name == "Reticulate"
    assert status.settings == {"splines": 40}
    assert status.pid is not None and status.pid != os.getpid()


def test_timestamps_are_utc_and_ordered(home):
    status = Reticulate.initiate(settings={"splines": 3}, name="nightly")
    status.wait(30)
    assert status.name == "nightly"
    for stamp in (status.created, status.started, status.finished):
        assert stamp.tzinfo is not None and stamp.utcoffset() == dt.timedelta(0)
    assert status.created <= status.started <= status.finished


def test_run_takes_any_callable_with_args_that_need_not_be_json(home):
    seen = object()
    lookup = {("a", 1): seen}
    status = bg.run(lambda key, *, table: table[key] is seen, ("a", 1), table=lookup)
    assert status.name == "<lambda>"
    assert status.result(timeout=30) is True


def test_run_names_the_task_after_the_function(home):
    def crunch():
        return 1

    assert bg.run(crunch).name == "crunch"
    assert bg.run(crunch, name="custom").name == "custom"


def test_async_functions_run_to_completion(home):
    async def fetch(x):
        await asyncio.sleep(0.01)
        return x + 1

    assert bg.run(fetch, 1).result(timeout=30) == 2


def test_failure_records_one_line_error_and_full_traceback(home):
    status = Failing.initiate()
    with pytest.raises(bg.TaskFailed) as info:
        status.result(timeout=30)
    assert status.state == "failed"
    assert status.error == "ValueError: bad spline"
    assert 'raise ValueError("bad spline")' in status.traceback
    assert "_runner.py" not in status.traceback.splitlines()[1]
    assert info.value.traceback == status.traceback
    assert "bad spline" in str(info.value)
    assert status.percent == 40  # the last progress before the failure is kept
    assert "ValueError: bad spline" in status.log()


def test_result_that_cannot_be_pickled_fails_the_task_naming_its_type(home):
    import threading

    status = bg.run(threading.Lock)
    with pytest.raises(bg.TaskFailed):
        status.result(timeout=30)
    assert "lock" in status.error and "cannot be pickled" in status.error


def test_results_of_notebook_classes_come_back(home):
    class Point:
        def __init__(self, x):
            self.x = x

    assert bg.run(Point, 3).result(timeout=30).x == 3


def test_none_result_and_sys_exit_zero_complete(home):
    import sys

    assert bg.run(lambda: None).result(timeout=30) is None
    assert bg.run(sys.exit, 0).result(timeout=30) is None
    code3 = bg.run(sys.exit, 3)
    with pytest.raises(bg.TaskFailed):
        code3.result(timeout=30)
    assert code3.error == "SystemExit: 3"


def test_log_holds_stdout_stderr_and_output_of_subprocesses(home):
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


def test_result_times_out_with_timeout_error(home):
    status = bg.run(time.sleep, 5)
    with pytest.raises(TimeoutError):
        status.result(timeout=0.2)
    assert not status.wait(0.05)
    assert status.is_running()


def test_await_gives_the_result_without_blocking_the_loop(home):
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


def test_track_reports_percentage_and_yields_every_item(home):
    def work():
        seen = []
        for item in bg.track(range(50), message="items"):
            seen.append(item)
            time.sleep(0.005)
        return seen, bg.current().percent

    seen, percent = bg.run(work).result(timeout=30)
    assert seen == list(range(50))
    assert percent == 100.0


def test_track_without_length_counts_items(home):
    def work():
        for _ in bg.track(x for x in range(20)):
            pass
        return bg.current().message

    assert bg.run(work).result(timeout=30) == "items: 20"


def test_progress_track_current_are_no_ops_outside_a_task():
    assert bg.current() is None
    bg.progress(50, "nothing happens")
    assert list(bg.track(range(3))) == [0, 1, 2]


def test_current_is_the_running_task(home):
    status = bg.run(lambda: bg.current().id)
    assert status.result(timeout=30) == status.id


def test_percent_is_clamped_and_nan_refused(home):
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


def test_update_from_outside_the_task_is_refused(home):
    status = bg.run(time.sleep, 2)
    with pytest.raises(bg.NbbgtaskError, match="inside task"):
        status.update(10)


# -- bad input: a clear error before any process starts -------------------------------------


def _no_process_started(home):
    return not (home / "live").exists() and not (home / "history").exists()


def test_settings_that_are_not_json_raise_type_error_before_starting(home):
    with pytest.raises(TypeError, match="JSON-serialisable"):
        Reticulate.initiate(settings={"when": dt.datetime.now()})
    with pytest.raises(TypeError, match="JSON-serialisable"):
        Reticulate.initiate(settings={"x": math.nan})
    with pytest.raises(TypeError, match="settings must be a dict"):
        Reticulate.initiate(settings=[1, 2])
    assert _no_process_started(home)


def test_settings_are_seen_as_stored(home):
    status = Reticulate.initiate(settings={"splines": 2, "pair": (1, 2)})
    assert status.settings == {"splines": 2, "pair": [1, 2]}
    status.wait(30)
    assert bg.get(status.id).settings == {"splines": 2, "pair": [1, 2]}


def test_task_class_without_execute_is_refused(home):
    class Empty(bg.BackgroundTask):
        pass

    with pytest.raises(TypeError, match="execute"):
        Empty.initiate()
    with pytest.raises(TypeError, match="execute"):
        bg.BackgroundTask.initiate()
    assert _no_process_started(home)


def test_run_refuses_non_callables_and_bad_names(home):
    with pytest.raises(TypeError, match="callable"):
        bg.run(42)
    with pytest.raises(TypeError, match="name"):
        bg.run(print, name="")
    with pytest.raises(TypeError, match="secrets must be a dict"):
        bg.run(print, secrets="hunter2")
    assert _no_process_started(home)


def test_secrets_reach_the_task_and_nothing_else(home):
    secret = "s3cr3t-" + os.urandom(8).hex()

    class Pay(bg.BackgroundTask):
        def execute(self, status):
            import pathlib

            me = pathlib.Path(f"/proc/{os.getpid()}")
            seen_in = [p for p in ("cmdline", "environ") if secret.encode() in (me / p).read_bytes()]
            return status.secrets["password"] == secret, seen_in

    status = Pay.initiate(settings={"amount": 3}, secrets={"password": secret})
    assert status.result(timeout=30) == (True, [])
    with pytest.raises(AttributeError, match="never stored"):
        status.secrets  # noqa: B018
    for path in home.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_ids_are_unguessable_and_unique(home):
    ids = {bg.run(lambda: None).id for _ in range(5)}
    assert len(ids) == 5
    for task_id in ids:
        assert len(task_id) == 32 and int(task_id, 16) >= 0


def test_settings_json_is_what_later_lookups_see(home):
    status = Reticulate.initiate(settings={"splines": 1, "label": "é"})
    status.wait(30)
    from nbbgtask._store import shard_of

    stored = json.loads((home / "history" / f"{shard_of(status.id):02d}.json").read_text())
    assert stored["tasks"][status.id]["settings"] == {"splines": 1, "label": "é"}
