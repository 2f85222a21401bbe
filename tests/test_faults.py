"""Fault injection: processes killed at random moments and mid-write, a killed kernel, a full disk,
damaged and unwritable stores, reused pids and a 10,000-task history.

Every test is bounded in time.  The figures each test measured (faults injected, tasks lost, how
long things took) are printed, and appended as JSON lines to the file named by the environment
variable NBBGTASK_FIGURES when it is set; docs/reliability.md quotes them.

A library bug found here gets a test marked xfail(strict=True) whose reason names it; the test
turns red (XPASS) once the bug is fixed, so the marker can go.  None is open now.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from pathlib import Path

import psutil
import pytest
from fault_helpers import (
    as_nobody,
    assert_store_intact,
    death_said,
    fill_disk,
    fill_history,
    fill_recent,
    history_file,
    history_states,
    limit_file_size,
    live_records,
    parses,
    record_figures,
    sigkill,
    sleeper,
    store_files,
    supervisor_idle,
    task_pid,
    thread_crashes,
    use_home,
)
from waiting import until

import nbbgtask as bg
from nbbgtask.core import config as _config
from nbbgtask.local import supervisor as _supervisor
from nbbgtask.store import store as _store

# -- 1. SIGKILL storm ----------------------------------------------------------------------------


def _steady(k, seconds, go):
    """Wait for the start signal, then report progress as often as it may for ``seconds``."""
    status = bg.current()
    while not os.path.exists(go):
        status.update(message="waiting")
        time.sleep(0.005)
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        i += 1
        status.update(percent=min(99.0, 100 * (1 - (end - time.monotonic()) / seconds)), message=f"{k}:{i}")
        time.sleep(0.001)
    return k


def test_sigkill_storm_every_task_ends_and_the_store_stays_readable(home, tmp_path):
    """30 tasks report progress; 15 are SIGKILLed at random moments.  Every one ends complete or
    failed within seconds, none stays running, and a reader never sees a broken store."""
    _config.settings().progress_interval = 0.01
    rng = random.Random()
    n_tasks, n_killed, run_for = 30, 15, 1.5
    stop = threading.Event()
    reads, read_errors = [0], []

    def reader():
        while not stop.is_set():
            try:
                for path in store_files(home):
                    try:
                        raw = path.read_bytes()
                    except FileNotFoundError:  # a live file goes when its task ends
                        continue
                    json.loads(raw)
                bg.tasks()
                reads[0] += 1
            except Exception as exc:  # counted, and the test fails on any
                read_errors.append(repr(exc))

    watcher = threading.Thread(target=reader, name="storm-reader")
    watcher.start()
    try:
        started = time.monotonic()
        go = tmp_path / "go"
        statuses = [bg.run(_steady, k, run_for, str(go), name=f"storm-{k}") for k in range(n_tasks)]
        victims = rng.sample(range(n_tasks), n_killed)
        schedule = sorted((rng.uniform(0.05, 1.2), k) for k in victims)
        assert until(lambda: all(st.refresh().pid for st in statuses), 30)  # each has reported once
        go.touch()
        all_started = time.monotonic()
        hit_running = 0
        for at, k in schedule:
            time.sleep(max(0.0, all_started + at - time.monotonic()))
            pid = statuses[k].refresh().pid
            assert pid is not None  # every task reported it before "go"
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                hit_running += 1
            sigkill(pid)
        last_kill = time.monotonic()
        assert until(lambda: all(s.done() for s in statuses), timeout=15), [s.state for s in statuses]
        all_done = time.monotonic()
    finally:
        stop.set()
        watcher.join(10)
    states = {s.id: s.state for s in statuses}
    vague = 0
    for k, status in enumerate(statuses):
        if k in victims:
            assert status.state == "failed", status
            vague += death_said(status) == "vague"
        else:
            assert (status.state, status.result(), status.percent) == ("complete", k, 100.0)
    assert not bg.tasks(state=["queued", "running"])
    records = assert_store_intact(home)
    assert set(records) == set(states)  # every task is in the store, once finished
    assert live_records(home) == {}
    assert read_errors == [] and reads[0] > 5
    assert all_done - last_kill < 10.0  # about 0.5 s when the machine is not overloaded
    record_figures(
        "sigkill_storm", tasks=n_tasks, killed=n_killed, killed_while_running=hit_running,
        failed=sum(s == "failed" for s in states.values()), complete=sum(s == "complete" for s in states.values()),
        failed_error_without_the_signal=vague,
        still_running=0, lost=0, reader_passes=reads[0], reader_errors=len(read_errors),
        seconds_last_kill_to_all_done=round(all_done - last_kill, 2), seconds_total=round(all_done - started, 2),
    )


def test_a_task_reaped_by_two_threads_at_once_still_says_how_it_died(home, monkeypatch):
    status = bg.run(sleeper)
    assert until(lambda: status.refresh().pid is not None and "go" in status.log())
    pid = status.pid
    real_waitpid = os.waitpid
    held = threading.Event()

    def slow_waitpid(target, options):
        got = real_waitpid(target, options)
        if target == pid and got[0] == pid and not held.is_set():
            held.set()
            time.sleep(0.5)  # the supervisor thread, between reaping and recording
        return got

    monkeypatch.setattr(os, "waitpid", slow_waitpid)
    os.kill(pid, signal.SIGKILL)
    assert held.wait(5)
    assert status.wait(5)  # this thread reaps too, and records first
    monkeypatch.undo()
    assert supervisor_idle()
    record_figures("reap_race", error=status.refresh().error)
    assert "killed by signal 9 (SIGKILL)" in status.error


# -- 2. task processes SIGKILLed while they write the store -----------------------------------------


def _fast_writer(seconds):
    """Progress as fast as the writer thread takes it (the loop lets go of the GIL now and then,
    or the writer thread would hardly ever run), then a result, and so a finalize."""
    status = bg.current()
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        i += 1
        status.update(percent=i % 100, message=f"write {i}")
        if i % 5 == 0:
            time.sleep(0.0001)
    return i


def test_task_processes_killed_at_random_moments_never_damage_the_store(home):
    """25 fast-writing tasks, each SIGKILLed at a random moment: while it writes progress, while
    it finalizes, or just after.  The store is never damaged and no finished task is lost."""
    _config.settings().progress_interval = 0.001
    rng = random.Random()
    earlier = [bg.run(lambda k=k: k, name="earlier") for k in range(10)]
    for status in earlier:
        status.wait(30)
    before = history_states(home)
    assert len(before) == 10
    outcomes = {"failed": 0, "complete": 0}
    worst, vague = 0.0, 0
    for round_ in range(25):
        status = bg.run(_fast_writer, rng.uniform(0.0, 0.05), name="victim")
        time.sleep(rng.uniform(0.0, 0.06))
        sigkill(task_pid(status))  # None if it has already ended and been reaped: nothing to kill
        killed = time.monotonic()
        assert status.wait(10), status
        worst = max(worst, time.monotonic() - killed)
        outcomes[status.state.value] += 1
        if status.state == "failed":
            vague += death_said(status) == "vague"
        else:
            assert status.state == "complete" and status.result() >= 0  # how many updates it made
        assert_store_intact(home)
        history = history_states(home)
        assert {k: history[k] for k in before} == before  # nothing finished earlier is lost or changed
        assert len(history) == len(before) + round_ + 1
        assert not (home / "live" / f"{status.id}.json").exists()
    assert [s.refresh().result() for s in earlier] == list(range(10))
    record_figures(
        "random_kills_of_writing_tasks", kills=25, ended_failed=outcomes["failed"],
        ended_complete_before_the_kill=outcomes["complete"], failed_error_without_the_signal=vague, finished_before=10,
        finished_after=len(history_states(home)), lost=0, damaged_files=0, worst_seconds_kill_to_done=round(worst, 2),
    )


#: where, inside one store or result write, the task process is killed
KILL_POINTS = {
    "progress: temp file half written": "failed",
    "progress: temp file written, not yet renamed": "failed",
    "finalize: history shard half written": "failed",
    "finalize: history renamed, live file not yet removed": "complete",
    "result file written, not yet renamed": "failed",
}


def _arm_kill(point: str, nth: int) -> None:
    """Inside a task process: SIGKILL it at the ``nth`` write of the kind ``point`` names."""
    real_write, real_replace = os.write, os.replace
    seen = [0]

    def due():
        seen[0] += 1
        return seen[0] >= nth

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def target(fd):
        try:
            return Path(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            return Path("")

    in_progress_thread = lambda: threading.current_thread().name == "nbbgtask-progress"  # noqa: E731

    def write(fd, data):
        path = target(fd)
        if (
            (point == "progress: temp file half written" and path.parent.name == "live" and in_progress_thread())
            or (point == "finalize: history shard half written" and path.parent.name == "history")
        ) and due():
            real_write(fd, bytes(data)[: len(data) // 2])
            die()
        return real_write(fd, data)

    def replace(src, dst, *args, **kwargs):
        src, dst = Path(src), Path(dst)
        if point == "progress: temp file written, not yet renamed" and src.parent.name == "live":
            if in_progress_thread() and due():
                die()
        if point == "result file written, not yet renamed" and src.parent.name == "results" and due():
            die()
        real_replace(src, dst, *args, **kwargs)
        if point == "finalize: history renamed, live file not yet removed" and dst.parent.name == "history" and due():
            die()

    os.write, os.replace = write, replace


def _doomed_writer(point, nth, seconds):
    _arm_kill(point, nth)
    updates = _fast_writer(seconds) or 1
    # A small result is kept in the task's record; one this big gets a file of its own.
    return [updates] * 1000 if point.startswith("result") else updates


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="finds a descriptor's file through /proc")
def test_task_processes_killed_at_exact_points_of_a_store_write(home):
    """5 kill points x 5 rounds: a task process SIGKILLs itself in the middle of a store write.
    The store is never damaged, the task ends as the point implies, nothing finished is lost."""
    _config.settings().progress_interval = 0.001
    rng = random.Random()
    for k in range(5):
        bg.run(lambda k=k: k, name="earlier").wait(30)
    before = history_states(home)
    results = {point: [] for point in KILL_POINTS}
    vague = 0
    for _ in range(5):
        for point, expected in KILL_POINTS.items():
            # Progress points: killed at the 1st to 10th progress write.  The others: killed in
            # the finalize that follows 0 to 0.1 s of progress.
            progress = point.startswith("progress")
            seconds = 5.0 if progress else rng.uniform(0.0, 0.1)
            nth = rng.randint(1, 10) if progress else 1
            status = bg.run(_doomed_writer, point, nth, seconds, name="doomed")
            assert status.wait(30), status
            assert status.state == expected, (point, status, status.log())
            if expected == "failed":
                vague += death_said(status) == "vague"
            else:
                assert status.result() > 0
            assert_store_intact(home)
            history = history_states(home)
            assert {k: history[k] for k in before} == before
            assert history[status.id] == expected
            assert not (home / "live" / f"{status.id}.json").exists()
            assert not list((home / "live").glob(".*.tmp"))  # a temp file cut short goes with the task
            results[point].append(status.state.value)
    assert not bg.tasks(state=["queued", "running"])
    leftovers = [p.name for p in (home / "results").iterdir() if p.suffix == ".tmp"]
    record_figures(
        "kills_at_exact_write_points", kills=25, points={p: len(v) for p, v in results.items()},
        outcomes={p: sorted(set(v)) for p, v in results.items()}, failed_error_without_the_signal=vague,
        finished_before=len(before),
        finished_after=len(history_states(home)), lost=0, damaged_files=0, orphaned_result_temp_files=len(leftovers),
    )


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="finds a descriptor's file through /proc")
def test_a_task_killed_while_saving_its_result_leaves_nothing_once_pruned(home):
    status = bg.run(_doomed_writer, "result file written, not yet renamed", 1, 0.0)
    assert status.wait(10) and status.state == "failed"
    assert bg.prune() == 1
    assert sorted(p.name for p in (home / "results").iterdir()) == []


# -- 3. the kernel SIGKILLed while its tasks run -----------------------------------------------------


KERNEL_CELL = """
import os, time, nbbgtask as bg
bg.configure(max_running=2)
def work(k):
    for i in range(25):
        bg.progress(4 * (i + 1), f"step {i + 1}")
        time.sleep(0.1)
    return {"k": k, "pid": os.getpid()}
running = [bg.run(work, k, name=f"survivor-{k}") for k in (1, 2)]
queued = bg.run(work, 3, name="queued-behind")
print(*[s.id for s in running], queued.id, queued.state)
"""


def test_tasks_outlive_a_sigkilled_kernel(kernel, home, request):
    """SIGKILL the kernel while two tasks run and one waits queued: the running ones finish and a
    new kernel reads their results; the queued one ends failed saying why, none stays running."""
    from kernel_driver import Kernel

    first, second, queued, state = kernel.ok(KERNEL_CELL).split()
    assert state == "queued"
    kernel_pid = kernel.pid()
    victim = psutil.Process(kernel_pid)
    victim.kill()
    killed_at = time.monotonic()
    victim.wait(10)
    assert bg.get(first).state == "running" and bg.get(second).state == "running"
    python = Path(kernel.km.kernel_spec.argv[0])
    fresh = Kernel(env={**os.environ, "NBBGTASK_HOME": str(home)}, python=python)
    try:
        out = fresh.ok(textwrap.dedent(f"""
            import json, nbbgtask as bg
            results = [bg.get(i).result(timeout=30) for i in ({first!r}, {second!r})]
            try:
                bg.get({queued!r}).result(timeout=30)
                late = "no error"
            except bg.TaskFailed as exc:
                late = exc.error
            live = [s.id for s in bg.tasks(state=["queued", "running"])]
            print(json.dumps([results, late, live, [bg.get(i).percent for i in ({first!r}, {second!r})]]))
        """), timeout=90)
        answered_at = time.monotonic()
    finally:
        fresh.shutdown()
    results, late, live, percents = json.loads(out)
    assert [r["k"] for r in results] == [1, 2]
    assert percents == [100.0, 100.0]
    assert late.startswith("NotStarted") and str(kernel_pid) in late
    assert live == []
    assert_store_intact(home)
    record_figures(
        "kernel_sigkilled", kernel=request.node.callspec.params["kernel"], tasks_running=2, tasks_queued=1,
        results_read_from_new_kernel=len(results), queued_ended=late.split(":")[0],
        seconds_kill_to_results=round(answered_at - killed_at, 2), still_running=0,
    )


# -- 4. a full disk -----------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs, when this process may mount one (root, and the container allows it)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _big_result():
    limit_file_size(200_000)
    bg.progress(50, "half way")
    return b"x" * 1_000_000


def test_a_result_too_big_for_the_disk_fails_the_task_with_the_reason(home):
    status = bg.run(_big_result)
    assert status.wait(30)
    assert status.state == "failed"
    assert "File too large" in status.error
    assert (status.percent, status.message) == (50.0, "half way")
    assert_store_intact(home)
    assert not list((home / "results").iterdir())  # the partial result file was removed
    assert bg.run(lambda: "after").result(timeout=30) == "after"
    record_figures("full_disk_result", injected="RLIMIT_FSIZE 200 kB in the task, 1 MB result", state="failed",
            error=status.error, store_intact=True)


def _chatty():
    limit_file_size(100_000)
    for i in range(100_000):
        print("line", i, "x" * 50)
    return "printed everything"


def test_a_log_that_cannot_be_written_fails_the_task_with_the_reason(home):
    status = bg.run(_chatty)
    assert status.wait(30)
    assert_store_intact(home)
    record_figures("full_disk_log", injected="RLIMIT_FSIZE 100 kB in the task, 5 MB printed", state=status.state.value,
            error=status.error)
    assert status.state == "failed"
    assert "File too large" in status.error


def _finish_on_a_full_disk(mode):
    """(rlimit) fill its shard's recent file nearly full, then limit this process's writes to just
    over that file's size, so the finalize's rewrite of it runs out of room part way; (tmpfs) the
    test fills the disk.
    Either way it waits for the test's signal, and returns nothing, so no result file takes the
    last free page."""
    me = bg.current()
    home = bg.configure().home  # the home the task was started with
    if mode == "rlimit":
        recent = fill_recent(home, me.id, _store.RECENT_MAX - 2)  # one more fits: no move into the main file
        limit_file_size(os.path.getsize(recent) + 100)
    while not (home / "go").exists():
        time.sleep(0.01)
    bg.progress(50, "about to finish")


@pytest.mark.parametrize("mode", ["rlimit", "tmpfs"])
def test_a_full_disk_at_finalize_never_damages_the_history(mode, home, request):
    """The disk runs out while a task's finalize rewrites its history shard (640 finished tasks
    in the history): the store stays intact, no finished task is lost, the task ends."""
    original = home
    if mode == "tmpfs":
        disk = request.getfixturevalue("small_disk")
        home = use_home(disk / "home")
    try:
        expected = fill_history(home, per_shard=10) + 1
        if mode == "rlimit":
            expected += _store.RECENT_MAX - 2  # what the task puts in its shard's recent file
        filler = None
        with warnings.catch_warnings(record=True) as caught, thread_crashes() as crashes:
            warnings.simplefilter("always")
            status = bg.run(_finish_on_a_full_disk, mode)
            assert until(lambda: status.refresh().pid is not None)  # reported once: the handle knows its pid
            if mode == "tmpfs":
                filler = fill_disk(disk, leave=4096)
            (home / "go").touch()
            try:
                waited = status.wait(15)
            except bg.StoreError:  # recording a dead task needs room too: fine while the disk is full
                waited = False
            if filler is not None:
                filler.unlink()
            waited = waited or status.wait(15)
            assert supervisor_idle()
            _store.forget_instances()
            listed = bg.tasks()
            status.refresh()
        damaged = sorted(p.name for p in home.rglob("*") if ".damaged-" in p.name)
        history = history_states(home)
        record_figures(
            f"full_disk_finalize_{mode}", finished_before=expected - 1, finished_after=len(history),
            lost=expected - len(history), damaged_files=damaged, state=status.state.value, error=status.error,
            thread_crashes=crashes,
        )
        assert waited
        assert not damaged and not [w for w in caught if issubclass(w.category, bg.StoreDamagedWarning)]
        assert len(listed) == len(history) == expected
        assert status.state in ("complete", "failed")
        if status.state == "failed":  # it says why, not "exited with code 70"
            assert "could not record how: writing the nbbgtask store failed" in status.error, status.error
    finally:
        if mode == "tmpfs":
            use_home(original)


STARTER = textwrap.dedent("""
    import json, resource, signal, sys
    import nbbgtask as bg
    home, limit = sys.argv[1], int(sys.argv[2])
    if limit >= 0:  # a full disk for this process (and the task it forks) only
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    bg.configure(home=home)
    try:
        print(json.dumps(["started", bg.run(print, "started").id]))
    except bg.StoreError as exc:
        print(json.dumps(["StoreError", str(exc)]))
    except BaseException as exc:
        print(json.dumps([type(exc).__name__, str(exc)]))
""")



@pytest.mark.parametrize(
    "mode, room",
    [
        ("rlimit", "none"),
        ("rlimit", "4 KiB"),
        ("tmpfs", "none"),
        ("tmpfs", "4 KiB"),
    ],
)
def test_starting_a_task_when_the_homes_disk_is_full_raises_store_error(mode, room, home, request):
    """bg.run() in a caller whose disk is full: a clear StoreError, and the store unchanged."""
    original = home
    if mode == "tmpfs":
        disk = request.getfixturevalue("small_disk")
        home = use_home(disk / "home")
    sleepers = [bg.run(time.sleep, 20, name=f"sleeper-{k}-" + "x" * 200) for k in range(10)]
    assert until(lambda: all(s.refresh().pid for s in sleepers), 30)  # each has reported once
    pids = [s.pid for s in sleepers]
    before = live_records(home)
    assert len(before) == 10
    leave = 0 if room == "none" else 4096
    filler = fill_disk(disk, leave) if mode == "tmpfs" else None
    limit = -1 if mode == "tmpfs" else leave
    try:
        with warnings.catch_warnings(record=True), thread_crashes() as crashes:
            warnings.simplefilter("always")
            out = subprocess.run(
                [sys.executable, "-c", STARTER, str(home), str(limit)], capture_output=True, text=True, timeout=60
            )
            outcome, message = json.loads(out.stdout.strip().splitlines()[-1])
            files_parse = all(parses(p.read_bytes()) for p in store_files(home))
            after = live_records(home)
            damaged = sorted(p.name for p in home.rglob("*") if ".damaged-" in p.name)
    finally:
        if filler is not None:
            filler.unlink()
        for pid in pids:
            sigkill(pid)
        with warnings.catch_warnings(record=True), thread_crashes():
            warnings.simplefilter("always")
            supervisor_idle()
            if mode == "tmpfs":
                use_home(original)
    record_figures(f"full_disk_bg_run_{mode}_room_{room.replace(' ', '')}", outcome=outcome, message=message[:160],
            store_files_parse=files_parse, damaged_files=damaged, thread_crashes=crashes)
    assert files_parse and not damaged and crashes == []
    if room == "none":
        assert outcome == "StoreError", (outcome, message, out.stderr[-2000:])
        assert "No space left on device" in message or "File too large" in message
        assert after == before  # the store is unchanged
    else:  # a new task's record is a small file of its own, and 4 KiB is room enough for it
        assert outcome == "started", (outcome, message, out.stderr[-2000:])
        assert {k: after[k] for k in before} == before  # nothing else was touched
        assert message in after or bg.get(message)


@pytest.mark.parametrize("mode", ["tmpfs", "simulated"])
def test_a_store_error_while_reaping_does_not_stall_queued_tasks(mode, home, request, monkeypatch):
    """One task runs and one waits queued (max_running=1); the running one is SIGKILLed while the
    store cannot be written.  Once there is room again, the queued one starts."""
    original = home
    if mode == "tmpfs":
        disk = request.getfixturevalue("small_disk")
        home = use_home(disk / "home")
    bg.configure(max_running=1)
    first = bg.run(sleeper)
    second = bg.run(lambda: "second ran")
    assert second.state == "queued"
    assert until(lambda: first.refresh().pid is not None and "go" in first.log())
    filler = None
    try:
        with thread_crashes() as crashes:
            if mode == "tmpfs":
                filler = fill_disk(disk)
            else:
                failing = _store.Store.finalize

                def finalize(self, *args, **kwargs):
                    if threading.current_thread().name == "nbbgtask-supervisor":
                        raise bg.StoreError("cannot write the nbbgtask store: No space left on device (injected)")
                    return failing(self, *args, **kwargs)

                monkeypatch.setattr(_store.Store, "finalize", finalize)
            os.kill(first.pid, signal.SIGKILL)
            sup = _supervisor.supervisor()  # it has collected the child, and cannot record its end yet
            assert until(lambda: first.pid in sup.exits or first.pid not in sup.children, 5)
            time.sleep(0.3)
            if filler is not None:
                filler.unlink()
            monkeypatch.undo()
            started = until(lambda: second.done(), timeout=3)
        record_figures(f"store_error_while_reaping_{mode}", first=first.refresh().state.value,
                second=second.refresh().state.value, supervisor_thread_crashes=crashes)
        assert first.state == "failed"
        assert started and second.result() == "second ran", (second, crashes)
    finally:
        with contextlib.suppress(Exception):
            second.cancel()
        if mode == "tmpfs":
            use_home(original)


# -- 5. damaged store, unwritable home, reused pids ---------------------------------------------------


def _damage(kind: str, path: Path, task_id: str) -> None:
    if kind == "NUL bytes (a crash on some filesystems)":
        path.write_bytes(b"\0" * 4096)
    elif kind == "random bytes":
        path.write_bytes(os.urandom(4096))
    elif kind == "a JSON list":
        path.write_text("[1, 2, 3]")
    elif kind == "a tasks table that is a list":
        path.write_text('{"tasks": []}')
    else:
        data = json.loads(path.read_bytes())
        if kind == "a record that is not an object":
            data["tasks"][task_id] = 5
        elif kind == "a record without its fields":
            data["tasks"][task_id] = {}
        elif kind == "an unknown state":
            data["tasks"][task_id]["state"] = "exploded"
        elif kind == "a schema version that is not a number":
            data["_meta"] = {"1": {"schema": "one"}}
        path.write_text(json.dumps(data))


@pytest.mark.parametrize("which", ["live", "history"])
@pytest.mark.parametrize(
    "kind",
    [
        "NUL bytes (a crash on some filesystems)",
        "random bytes",
        "a JSON list",
        "a tasks table that is a list",
        "a record that is not an object",
        "a record without its fields",
        "an unknown state",
        "a schema version that is not a number",
    ],
)
def test_a_damaged_store_is_set_aside_or_refused_clearly(home, which, kind):
    """Kinds of damage test_store.py does not cover (it truncates the file): every public call
    either works (the damaged file set aside, with a warning) or raises a StoreError."""
    finished = bg.run(lambda: "old")
    running = bg.run(sleeper, 1)
    finished.wait(30)
    assert until(lambda: running.refresh().pid is not None)
    path = home / "live" / f"{running.id}.json" if which == "live" else history_file(home, finished.id)
    _damage(kind, path, running.id if which == "live" else finished.id)
    _store.forget_instances()
    outcomes = {}
    with warnings.catch_warnings(record=True) as caught, thread_crashes() as crashes:
        warnings.simplefilter("always")
        calls = {
            "tasks": lambda: bg.tasks(),
            "get": lambda: bg.get(finished.id),
            "find_last": lambda: bg.find_last(),
            "run": lambda: bg.run(lambda: "new").result(timeout=30),
            "running task ends": lambda: running.result(timeout=30),
        }
        for label, call in calls.items():
            try:
                call()
                outcomes[label] = "ok"
            except (bg.StoreError, bg.TaskNotFound) as exc:
                outcomes[label] = f"clear: {type(exc).__name__}"
            except Exception as exc:
                outcomes[label] = f"{type(exc).__name__}: {exc}"
        # Put things right so the next test (and the fixture's teardown) starts clean.
        for p in store_files(home):
            if not parses(p.read_bytes()) or p == path:
                p.unlink()
        _store.forget_instances()
        with contextlib.suppress(Exception):
            running.wait(5)
        bg.run(print).wait(5)  # a new task restarts a crashed supervisor thread, which reaps the rest
        supervisor_idle(5)
    record_figures(f"damaged_store_{which}", kind=kind, outcomes=outcomes, warned=len(caught), thread_crashes=crashes)
    assert all(v == "ok" or v.startswith("clear") for v in outcomes.values()), outcomes
    assert outcomes["run"] == "ok" and outcomes["running task ends"] == "ok"
    assert [w for w in caught if issubclass(w.category, bg.StoreDamagedWarning)]
    assert crashes == []


def test_a_handle_whose_record_was_lost_does_not_stay_running_forever(home):
    status = bg.run(lambda: "done")  # this handle is never refreshed before the damage
    assert until(lambda: not _supervisor.supervisor().children and bg.get(status.id).state == "complete")
    history_file(home, status.id).write_bytes(b"\0" * 512)  # disk trouble
    _store.forget_instances()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        with pytest.raises(bg.TaskNotFound):
            bg.get(status.id)  # the record is gone...
        try:
            ended = status.wait(2)  # ...so the handle must not say "running" for ever
        except bg.TaskNotFound:
            ended = True
    record_figures("handle_of_a_lost_record", ended=ended, state=status.state.value)
    assert ended, status


def _in_read_only_home(home: str) -> dict:
    """In a child running as the home's (ordinary) owner: make the home read-only and use it."""
    home = Path(home)
    bg.configure(home=home)
    folders = [home, *(p for p in home.rglob("*") if p.is_dir())]
    for folder in folders:  # as a read-only mount would be
        os.chmod(folder, 0o500)
    found: dict = {}
    try:
        _store.forget_instances()
        try:
            found["run"] = f"started {bg.run(lambda: 1).id}"
        except bg.StoreError as exc:
            found["run"] = f"StoreError: {exc}"
        except Exception as exc:
            found["run"] = f"{type(exc).__name__}: {exc}"
        try:
            found["tasks"] = [s.state.value for s in bg.tasks()]
        except Exception as exc:
            found["tasks"] = f"{type(exc).__name__}: {exc}"
    finally:
        for folder in folders:
            os.chmod(folder, 0o700)
    return found


@pytest.mark.parametrize(
    "variant",
    [
        "used",
        "fresh",
    ],
)
def test_a_home_that_became_unwritable_gives_store_error_and_stays_readable(variant):
    """The home was usable when configured and is read-only now (a chmod, a read-only mount)."""
    base = Path(tempfile.mkdtemp(prefix="nbbgtask-readonly-"))
    home = base / "home"
    try:
        if variant == "used":  # a task ran and finished there
            use_home(home)
            bg.run(lambda: "before").wait(30)
        else:  # configured (folders made), never written
            _config.ensure_home(home)
        _config.reset()
        _store.forget_instances()
        if os.geteuid() == 0:  # the child runs as nobody: give the home to nobody
            for path in [base, *base.rglob("*")]:
                os.chown(path, 65534, 65534)
        found = as_nobody(_in_read_only_home, str(home))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    record_figures(f"unwritable_home_{variant}", **found)
    assert "child_error" not in found, found
    assert found["run"].startswith("StoreError: cannot write the nbbgtask store"), found
    assert "Permission denied" in found["run"]
    assert found["tasks"] == (["complete"] if variant == "used" else [])


def test_a_reused_owner_pid_or_a_zombie_pid_does_not_keep_a_task_alive(home):
    """test_lifecycle.py covers a task whose own pid was reused; this covers the process that
    queued a task (its pid now someone else's), and a task process that is a zombie of another."""
    template = bg.run(lambda: None)
    template.wait(30)
    store = _store.store_for(home)
    base = store.get(template.id)
    me = psutil.Process()

    def put(state, **fields):
        record = {**base, "id": secrets.token_hex(16), "state": state, "finished": None, **fields}
        store.insert(record)
        return record["id"]

    reused_owner = put("queued", pid=None, owner_pid=me.pid, owner_started=me.create_time() - 100)
    live_owner = put("queued", pid=None, owner_pid=me.pid, owner_started=me.create_time())
    zombie = subprocess.Popen(["true"])
    try:
        assert until(lambda: psutil.Process(zombie.pid).status() == psutil.STATUS_ZOMBIE, 5)
        zombie_task = put("running", pid=zombie.pid, pid_started=psutil.Process(zombie.pid).create_time())
        assert bg.get(reused_owner).state == "failed"
        assert bg.get(reused_owner).error.startswith("NotStarted: the process that queued it")
        assert bg.get(live_owner).state == "queued"  # its owner is really alive: it waits
        assert bg.get(zombie_task).state == "failed"
        assert f"task process {zombie.pid} ended without reporting" in bg.get(zombie_task).error
    finally:
        zombie.wait()
    store.remove([live_owner])
    record_figures("reused_pids", reused_owner_pid="failed NotStarted", zombie_pid="failed", live_owner="queued")


# -- 6. a 10,000-task history ---------------------------------------------------------------------


def _timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def test_a_10000_task_history_stays_usable_and_prunable(home):
    """Listing, lookups, a new task and prune stay correct and quick with 10,048 finished tasks."""
    total = fill_history(home, per_shard=157)  # 10,048 finished tasks and the template
    assert total > 10_000
    every, t_tasks_cold = _timed(bg.tasks)
    assert len(every) == total
    _, t_tasks_warm = _timed(bg.tasks)
    newest, t_limit = _timed(lambda: bg.tasks(limit=10))
    assert [s.id for s in newest] == [s.id for s in every[:10]]
    assert all(a.created >= b.created for a, b in zip(every, every[1:], strict=False))
    some = random.Random().choice(every)
    _store.forget_instances()
    got, t_get_cold = _timed(lambda: bg.get(some.id))
    assert got == some and got.state == "complete"
    _, t_get_warm = _timed(lambda: bg.get(some.id))
    with pytest.raises(bg.TaskNotFound):
        bg.get("f" * 32)
    found, t_find = _timed(lambda: bg.find_last(name="filler-3"))
    assert found.name == "filler-3"
    value, t_run = _timed(lambda: bg.run(lambda: "new").result(timeout=30))
    assert value == "new"
    pruned, t_prune = _timed(lambda: bg.prune(keep=5000))
    assert pruned == total + 1 - 5000
    assert len(bg.tasks()) == 5000
    pruned_old, t_prune_old = _timed(lambda: bg.prune(older_than=3600))
    assert pruned_old == 4998  # the fillers finished hours ago; the template and the new task stay
    assert [s.result() for s in bg.tasks()] == ["new", "template"]
    assert_store_intact(home)
    record_figures(
        "history_10000", tasks=total, seconds_tasks_cold=round(t_tasks_cold, 3), seconds_tasks_warm=round(t_tasks_warm, 3),
        seconds_tasks_limit_10=round(t_limit, 3), seconds_get_cold=round(t_get_cold, 4),
        seconds_get_warm=round(t_get_warm, 4), seconds_find_last=round(t_find, 3),
        seconds_run_to_result=round(t_run, 3), pruned=pruned, seconds_prune_keep_5000=round(t_prune, 3),
        pruned_older_than=pruned_old, seconds_prune_older_than=round(t_prune_old, 3),
    )
    assert t_tasks_cold < 5 and t_tasks_warm < 5 and t_limit < 5
    assert t_get_cold < 0.5 and t_get_warm < 0.5
    assert t_run < 5 and t_prune < 15 and t_prune_old < 15
