"""The contract of retries and dependencies (API.md, "Retries" and "Dependencies"), written once and
run against every way a task runs (the ``way`` fixture: fork, spawn, the fork server, Dask)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import cloudpickle
import pytest
from waiting import gone, until

import nbbgtask as bg
from nbbgtask.store.store import store_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _read(path):
    with open(path) as f:
        return f.read()


def _count(path):
    """How many times this has been called with ``path`` (a counter file shared by the attempts)."""
    n = (int(_read(path)) if os.path.exists(path) else 0) + 1
    with open(path, "w") as f:
        f.write(str(n))
    return n


def _flaky(path, failures=2, kind=ConnectionError):
    n = _count(path)
    print(f"try {n}", flush=True)
    if n <= failures:
        raise kind(f"flaky {n}")
    return n


def _slow_first(path):
    n = _count(path)
    if n == 1:
        time.sleep(30)
    return n


# -- retries -----------------------------------------------------------------------------------


def test_a_task_that_fails_twice_then_succeeds_completes_on_its_third_attempt(way, tmp_path):
    counter = str(tmp_path / "count")
    status = bg.run(_flaky, counter, retries=3, retry_delay=0.05)
    assert status.result(timeout=60) == 3
    assert status.state == "complete" and status.attempt == 3
    attempts = status.attempts
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    assert [a["state"] for a in attempts] == ["failed", "failed", "complete"]
    assert attempts[0]["error"] == "ConnectionError: flaky 1"
    assert all(a["started"] <= a["finished"] for a in attempts)
    assert attempts[0]["finished"] <= attempts[1]["started"] <= attempts[2]["started"]
    log = status.log()
    assert "try 1" in log and "try 3" in log and "attempt 2 of 4" in log and "attempt 3 of 4" in log


def test_the_last_failure_says_how_many_attempts_failed_before_it(way, tmp_path):
    counter = str(tmp_path / "count")
    status = Flaky.initiate(settings={"path": counter})
    with pytest.raises(bg.TaskFailed) as caught:
        status.result(timeout=60)
    assert "on attempt 3 of 3, after 2 failed attempts" in str(caught.value)
    assert status.error == "ConnectionError: flaky 3" and status.attempt == 3


class Flaky(bg.BackgroundTask):
    retries = 2
    retry_delay = 0.05

    def execute(self, status):
        return _flaky(status.settings["path"], failures=10)


def test_a_kill_by_its_timeout_is_a_failed_attempt_and_is_retried(way, tmp_path):
    bg.configure(cancel_grace=1)
    counter = str(tmp_path / "count")
    status = bg.run(_slow_first, counter, retries=1, retry_delay=0.05, retry_on=bg.TimeLimitExceeded,
                    limits=bg.Limits(timeout=1))
    assert status.result(timeout=30) == 2
    first = status.attempts[0]
    assert first["state"] == "failed" and "timed out after 1 s" in first["error"]


def test_retry_on_narrows_which_failures_are_retried(way, tmp_path):
    counter = str(tmp_path / "count")
    status = bg.run(_flaky, counter, kind=ValueError, retries=3, retry_delay=0.05, retry_on=(ConnectionError,))
    assert status.wait(60)
    assert status.state == "failed" and status.error == "ValueError: flaky 1"
    assert status.attempt == 1 and len(status.attempts) == 1
    assert _read(counter) == "1"


def test_a_cancel_during_the_delay_stops_every_further_attempt_at_once(way, tmp_path):
    counter = str(tmp_path / "count")
    status = bg.run(_flaky, counter, failures=100, retries=5, retry_delay=60)
    assert until(lambda: status.refresh().to_dict().get("retry_at") is not None, timeout=30)
    asked = time.monotonic()
    status.cancel()
    assert status.wait(10)
    assert time.monotonic() - asked < 5
    assert status.state == "cancelled" and len(status.attempts) == 1
    time.sleep(0.3)
    assert _read(counter) == "1"
    pid = status.pid
    if way.name != "dask":
        assert until(lambda: gone(pid), timeout=5)


def test_bad_retry_values_are_refused_with_the_name_of_the_value(way, home):
    with pytest.raises(ValueError, match="retries"):
        bg.run(print, retries=-1)
    with pytest.raises(ValueError, match="retry_delay"):
        bg.run(print, retries=1, retry_delay="soon")
    with pytest.raises(TypeError, match="retry_on"):
        bg.run(print, retries=1, retry_on="ConnectionError")
    with pytest.raises(ValueError, match="retries"):
        bg.configure(retries=1.5)
    assert bg.tasks() == []


_STARTER = """
import os, sys, nbbgtask as bg
bg.configure(home=sys.argv[1], start_method=sys.argv[2])
def flaky(path):
    n = (int(open(path).read()) if os.path.exists(path) else 0) + 1
    open(path, "w").write(str(n))
    if n == 1:
        raise ConnectionError("the first try fails")
    return n
print(bg.run(flaky, sys.argv[3], retries=2, retry_delay=1.0).id, flush=True)
"""


def test_a_retry_happens_after_the_process_that_started_the_task_has_exited(way, home, tmp_path):
    if way.name == "dask":
        pytest.skip("a Dask task's attempts are kept on the worker whoever started it; this starts local tasks")
    script = tmp_path / "starter.py"
    script.write_text(textwrap.dedent(_STARTER))
    counter = str(tmp_path / "count")
    out = tmp_path / "out.txt"
    with open(out, "w") as f:  # a file, not a pipe: the fork server it starts holds its stderr
        done = subprocess.run([sys.executable, str(script), str(home), way.name, counter], stdout=f, stderr=f, timeout=60)
    exited = time.time()
    assert done.returncode == 0, _read(out)
    status = bg.get(_read(out).strip())
    assert status.result(timeout=30) == 2
    assert status.attempts[1]["started"] > exited  # the retry began after its starter had gone


# -- dependencies -----------------------------------------------------------------------------


def _load(seconds=0.0):
    time.sleep(seconds)
    return {"rows": [1, 2, 3]}


def _train(data, extra=None):
    return sum(data["rows"]) + (extra or 0)


def _fails():
    time.sleep(0.3)
    raise RuntimeError("the source is down")


def test_a_task_status_argument_is_replaced_by_its_result(way):
    load = bg.run(_load, 1.0, name="load")
    train = bg.run(_train, load, name="train")
    assert train.state == "waiting"
    assert train.to_dict()["after"] == [load.id]
    assert train.refresh().message == f"waiting for load ({load.id[:4]}…)"
    nested = bg.run(lambda items, by_name, pair: [items[0]["rows"], by_name["d"]["rows"], pair[1]["rows"]],
                    [load], {"d": load}, (1, load))
    assert train.result(timeout=60) == 6
    assert nested.result(timeout=60) == [[1, 2, 3]] * 3
    assert train.started >= load.refresh().finished


def test_after_waits_without_passing_results_and_waiting_tasks_take_no_slot(way):
    bg.configure(max_running=1)
    first = bg.run(_load, 0.5)
    second = bg.run(_train, {"rows": [1]}, after=[first])
    assert second.state == "waiting"
    assert second.result(timeout=60) == 1
    assert second.started >= first.refresh().finished


def test_a_failed_prerequisite_cancels_a_chain_of_three(way):
    load = bg.run(_fails, name="load")
    train = bg.run(_train, load, name="train")
    report = bg.run(_train, train, name="report")
    late = bg.run(_train, {"rows": []}, after=[report], name="late")
    for status in (train, report, late):
        with pytest.raises(bg.TaskCancelled) as caught:
            status.result(timeout=60)
        assert status.state == "cancelled"
    assert load.refresh().state == "failed"
    assert f"prerequisite load ({load.id[:8]}) failed (RuntimeError: the source is down)" in train.error
    assert f"prerequisite train ({train.id[:8]}) was cancelled" in report.error
    assert "prerequisite report" in str(caught.value)
    assert all(s.started is None for s in (train, report, late))  # none of them ever ran


def test_a_task_after_one_that_already_failed_ends_cancelled_at_once(way):
    failed = bg.run(_fails)
    failed.wait(60)
    status = bg.run(_train, failed)
    assert status.state == "cancelled" and "failed" in status.error


def test_cancelling_a_waiting_task_ends_it_and_it_never_starts(way):
    load = bg.run(_load, 1.0)
    train = bg.run(_train, load)
    assert train.cancel() is True
    assert train.state == "cancelled"
    load.wait(60)
    time.sleep(0.2)
    assert train.refresh().state == "cancelled" and train.started is None


def test_unknown_ids_and_cycles_are_refused_at_the_call(home):
    with pytest.raises(bg.TaskNotFound, match="not in the store"):
        bg.run(_train, {"rows": []}, after=["0" * 32])
    with pytest.raises(TypeError, match="after"):
        bg.run(_train, {"rows": []}, after=[42])
    # Records that wait for each other (only a hand-made store could hold them): refused too.
    store = store_for(home)
    a, b = "a" * 32, "b" * 32
    for me, other in ((a, b), (b, a)):
        store.insert({"id": me, "name": f"t{me[0]}", "state": "waiting", "created": time.time(), "after": [other]})
    with pytest.raises(ValueError, match="cycle"):
        bg.run(_train, {"rows": []}, after=[a])
    assert {s.id for s in bg.tasks()} == {a, b}
    for task_id in (a, b):
        store.finalize(task_id, {"state": "cancelled", "finished": time.time()})


_ABANDONS = """
import sys, time, nbbgtask as bg
bg.configure(home=sys.argv[1])
load = bg.run(time.sleep, 3)
print(bg.run(print, load, name="train").id, flush=True)
"""


def test_waiting_tasks_end_cancelled_when_the_process_that_made_them_exits(home, tmp_path):
    script = tmp_path / "abandons.py"
    script.write_text(textwrap.dedent(_ABANDONS))
    done = subprocess.run([sys.executable, str(script), str(home)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    status = bg.get(done.stdout.strip())
    assert status.state == "cancelled"
    assert "exited before its prerequisites completed" in status.error
