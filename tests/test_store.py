"""The TinyDB store: shared by many processes at once, atomic, private, and self-healing."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
from fault_helpers import history_file
from waiting import until

import nbbgtask as bg
from nbbgtask.core import config as _config
from nbbgtask.core import record as _record
from nbbgtask.store import store as _store
from nbbgtask.store.locks import held


def test_home_is_private_to_its_owner(home):
    bg.run(print, "hello").wait(30)
    running = bg.run(time.sleep, 5)
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    files = [p for p in home.rglob("*")]
    names = {str(p.relative_to(home)) for p in files}
    assert {f"live/{running.id}.json", "history", "locks", f"logs/{running.id}.log"} <= names
    assert any(p.parent.name == "locks" for p in files)
    for path in files:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))


def test_an_existing_home_is_never_chmodded_and_one_others_can_write_is_refused(tmp_path):
    """Issue 13: a home is used as its owner left it (0755: others may read, not write), and one
    that others can write is refused, never silently made private."""
    path = tmp_path / "open"
    path.mkdir(mode=0o755)
    _config.reset()
    try:
        bg.configure(home=path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o755
        path.chmod(0o777)
        with pytest.raises(bg.HomeError, match="writable by others"):
            bg.configure(home=path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o777
    finally:
        _config.reset()


def test_a_home_under_a_file_raises_one_clear_error_naming_it(tmp_path):
    (tmp_path / "file").write_text("x")
    bad = tmp_path / "file" / "home"
    with pytest.raises(bg.StoreError, match="cannot use .* as the nbbgtask home: Not a directory") as info:
        bg.configure(home=bad)
    assert str(bad) in str(info.value)


def test_a_home_without_permission_raises_one_clear_error_naming_it(tmp_path):
    """Run as an ordinary user (a forked child drops root), as permissions do not bind root."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    tmp_path.chmod(0o755)
    bad = locked / "home"
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            try:
                bg.configure(home=bad)
                message = "no error"
            except bg.StoreError as exc:
                message = str(exc)
            os.write(write, message.encode())
        finally:
            os._exit(0)
    os.close(write)
    message = os.read(read, 4096).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert message.startswith(f"cannot use {bad} as the nbbgtask home: Permission denied"), message


def test_home_defaults_to_the_env_var_then_the_jupyter_data_dir(tmp_path, monkeypatch):
    from jupyter_core.paths import jupyter_data_dir

    monkeypatch.setenv("NBBGTASK_HOME", str(tmp_path / "from-env"))
    assert _config.default_home() == tmp_path / "from-env"
    monkeypatch.delenv("NBBGTASK_HOME")
    assert str(_config.default_home()) == os.path.join(jupyter_data_dir(), "nbbgtask")


def test_configure_checks_everything_before_changing_anything(home):
    with pytest.raises(ValueError, match="start_method"):
        bg.configure(start_method="thread", max_running=3)
    assert _config.settings().max_running == float("inf")
    with pytest.raises(ValueError, match="max_running"):
        bg.configure(max_running=0)
    with pytest.raises(ValueError, match="refresh_interval"):
        bg.configure(refresh_interval=-1)


def _files(home):
    """The store's files now (a live file vanishes when its task ends, so read with care)."""
    return [*sorted((home / "live").glob("*.json")), *sorted((home / "history").glob("*.json"))]


def test_a_schema_version_is_recorded(home):
    bg.run(print).wait(30)
    bg.run(time.sleep, 5)
    assert len(_files(home)) == 2  # one live file, one history shard
    for path in _files(home):
        data = json.loads(path.read_text())
        assert data["_meta"]["1"]["schema"] == _store.SCHEMA_VERSION


@pytest.mark.parametrize("which", ["live", "history"])
def test_a_store_from_a_newer_version_is_refused_clearly(home, which):
    bg.run(print).wait(30)  # makes the folders
    path = home / "live" / f"{'0123abcd' * 4}.json" if which == "live" else home / "history" / "07.json"
    path.write_text(json.dumps({"_meta": {"1": {"schema": 99}}, "tasks": {}}))
    with pytest.raises(bg.StoreError, match="newer nbbgtask"):
        bg.tasks()
    path.unlink()


@pytest.mark.parametrize("which", ["live", "history"])
def test_a_damaged_store_is_kept_aside_and_work_goes_on(home, which):
    done = bg.run(lambda: 1)
    done.wait(30)
    running = bg.run(time.sleep, 1)
    _store.forget_instances()  # as a new process would
    path = home / "live" / f"{running.id}.json" if which == "live" else history_file(home, done.id)
    name, folder = path.name, path.parent
    path.write_text('{"tasks": {"abc": {"id": "ab')
    with pytest.warns(bg.StoreDamagedWarning, match=f"{name} was damaged") as caught:
        listed = bg.tasks()
    kept = [p for p in folder.iterdir() if p.name.startswith(f"{name}.damaged-")]
    assert len(kept) == 1 and str(kept[0]) in str(caught[0].message)
    assert kept[0].read_text() == '{"tasks": {"abc": {"id": "ab'
    assert (which == "live") == (done.id in [s.id for s in listed])
    assert bg.run(lambda: 2).result(timeout=30) == 2
    assert running.result(timeout=30) is None  # its end is recorded, whichever file was damaged
    assert bg.get(running.id).state == "complete"


def test_a_running_task_recreates_its_record_after_the_live_store_is_replaced(home):
    bg.configure()
    _config.settings().progress_interval = 0.02

    def steady():
        for i in range(100):
            bg.progress(i, f"step {i}")
            time.sleep(0.01)
        return "done"

    status = bg.run(steady)
    time.sleep(0.2)
    store = _store.store_for(home)
    with held(store._locks.stripe(_store.shard_of(status.id))):  # not in the task's own write
        (home / "live" / f"{status.id}.json").write_text("garbage")
    # Whichever process reads it first (this one, or the task's writer thread) sets it aside.
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always", bg.StoreDamagedWarning)
        bg.tasks()
    assert status.result(timeout=30) == "done"
    assert [p for p in (home / "live").iterdir() if p.name.startswith(f"{status.id}.json.damaged-")]
    assert bg.get(status.id).state == "complete"


def test_progress_writes_are_throttled(home):
    def hammer():
        calls = 0
        original = _store.Store.patch

        def counting(self, *args, **kwargs):
            nonlocal calls
            calls += 1
            return original(self, *args, **kwargs)

        _store.Store.patch = counting
        status = bg.current()
        started = time.monotonic()
        for i in range(1_000_000):
            status.update(percent=i / 10_000, message="busy")
        return calls, time.monotonic() - started

    status = bg.run(hammer)
    calls, seconds = status.result(timeout=60)
    assert calls <= seconds / 0.1 + 2, (calls, seconds)
    assert status.percent == 100.0


def test_the_last_progress_before_a_final_state_is_written(home):
    def quick():
        bg.progress(37, "last words")
        raise RuntimeError("boom")

    status = bg.run(quick)
    status.wait(30)
    assert (status.percent, status.message, status.state) == (37, "last words", "failed")


READER = textwrap.dedent("""
    import glob, json, os, sys, time
    import nbbgtask as bg
    home, stop = sys.argv[1], sys.argv[2]
    bg.configure(home=home)
    reads = errors = 0
    open(stop + ".ready", "w").close()
    while not os.path.exists(stop):
        try:
            for path in glob.glob(os.path.join(home, "live", "*.json")) + glob.glob(os.path.join(home, "history", "*.json")):
                try:
                    raw = open(path, "rb").read()
                except FileNotFoundError:  # a live file goes when its task ends
                    continue
                json.loads(raw)
            bg.tasks()
            reads += 1
        except Exception as exc:
            errors += 1
            print(repr(exc), file=sys.stderr)
    print(reads, errors)
""")


def test_twenty_writers_and_a_reader_never_corrupt_the_store(home, tmp_path):
    _config.settings().progress_interval = 0.002  # write as often as the lock allows
    stop = tmp_path / "stop"
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(home), str(stop)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )

    def work(k):
        status = bg.current()
        end = time.monotonic() + 1.5  # long enough for the reader to read many times
        i = 0
        while time.monotonic() < end:
            i += 1
            status.update(percent=min(99.0, i / 20), message=f"{k}:{i}")
            if i % 20 == 0:
                time.sleep(0.001)
        return k

    assert until(lambda: (tmp_path / "stop.ready").exists(), 60)
    statuses = [bg.run(work, k) for k in range(20)]
    results = [s.result(timeout=120) for s in statuses]
    stop.touch()
    out, err = reader.communicate(timeout=60)
    reads, errors = map(int, out.split())
    assert results == list(range(20))
    assert errors == 0, err
    assert reads > 10
    final = {s.id: s for s in bg.tasks()}
    assert all(final[s.id].state == "complete" and final[s.id].percent == 100 for s in statuses)
    assert list((home / "live").iterdir()) == []


def test_a_writer_killed_mid_write_never_damages_the_store(home):
    """SIGKILL processes while they rewrite the store; every file stays whole and nothing finished is lost."""
    import random
    import signal

    finished = [bg.run(lambda k=k: k) for k in range(5)]
    for s in finished:
        s.wait(30)
    writer = textwrap.dedent(f"""
        import time, nbbgtask as bg
        from nbbgtask.store import store as _store
        bg.configure(home={str(home)!r})
        store = _store.store_for(__import__("pathlib").Path({str(home)!r}))
        ids = [s.id for s in bg.tasks()]
        print("ready", flush=True)
        i = 0
        while True:
            rec = dict(store.get(ids[i % len(ids)]))
            rec["id"] = "w" + str(i % 50)
            rec["state"] = "running"
            store.remove(["w" + str((i + 25) % 50)])
            store.admit(rec, float("inf")) if store.get(rec["id"]) is None else store.patch(rec["id"], {{"percent": i % 100}})
            i += 1
    """)
    rng = random.Random(7)
    for _ in range(25):
        proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.01, 0.15))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        for path in _files(home):
            json.loads(path.read_text())  # no task ends here, so no live file vanishes meanwhile
    assert [bg.get(s.id).state for s in finished] == ["complete"] * 5
    assert not [p for p in home.rglob("*") if "damaged" in p.name]


def test_a_hand_edited_record_is_set_aside_and_the_rest_of_its_file_kept(home):
    """One bad record (an unknown state, as a hand edit might leave) in a history shard: the file
    is kept aside as it was, and its sound records are written back, so nothing else is lost."""
    statuses = []
    while len(statuses) < 2 or _store.shard_of(statuses[-1].id) != _store.shard_of(statuses[0].id):
        statuses.append(bg.run(int, len(statuses)))  # until two share a shard
        statuses[-1].wait(30)
    first, last = statuses[0], statuses[-1]
    shard = history_file(home, first.id)
    assert shard == history_file(home, last.id)
    data = json.loads(shard.read_text())
    data["tasks"][first.id]["state"] = "exploded"
    shard.write_text(json.dumps(data))
    _store.forget_instances()  # as a new process would
    with pytest.warns(bg.StoreDamagedWarning, match=r"unknown state 'exploded'.*sound record"):
        listed = {s.id for s in bg.tasks()}
    assert last.id in listed and first.id not in listed
    assert bg.get(last.id).result() == len(statuses) - 1
    kept = [p for p in shard.parent.iterdir() if p.name.startswith(f"{shard.name}.damaged-")]
    assert len(kept) == 1 and json.loads(kept[0].read_text())["tasks"][first.id]["state"] == "exploded"


def test_prune_sweeps_temp_files_left_by_a_start_cut_short(home):
    """A process killed while it made a new task's file leaves a temp file no task owns."""
    bg.run(print).wait(30)
    orphan = home / "live" / ".0123456789abcdef0123456789abcdef.json.tmp"
    orphan.write_text('{"tasks": {')
    fresh = home / "live" / ".fedcba9876543210fedcba9876543210.json.tmp"
    fresh.write_text('{"tasks": {')
    os.utime(orphan, (time.time() - 7200, time.time() - 7200))
    assert bg.prune() == 1
    assert not orphan.exists()
    assert fresh.exists()  # it may be a start under way: only old ones go
    assert [s.name for s in bg.tasks()] == []


def _store_in_child():
    import psutil

    from nbbgtask.core import procs as _procs
    from nbbgtask.store import store as _store
    store = next(iter(_store._instances.values()))
    return {"ready": store._ready, "inherited": len(_store._inherited), "started": _procs.own_process()["pid_started"],
            "psutil": psutil.Process().create_time(), "pid": os.getpid()}


def test_a_kernel_keeps_nothing_of_the_tasks_it_watched_end(home):
    """Reading a task while it runs keeps a table of its live file; once the task has ended it
    is dropped, so a kernel that ran thousands of tasks holds none of them (each one it held was
    also freed, page by page, by every later forked task)."""
    statuses = [bg.run(time.sleep, 0.05) for _ in range(12)]
    for status in statuses:
        status.refresh()  # read while live: a table is made
    for status in statuses:
        status.wait(timeout=30)
    store = _store.store_for(_config.home())
    assert statuses[0].state == "complete" and not store._live


def test_a_forked_task_starts_with_the_stores_its_parent_proved(home):
    """The child gets new stores (locks are per process) that know the folders are proved, and
    keeps the parent's rather than freeing them; its start time is psutil's reckoning."""
    status = bg.run(_store_in_child)
    out = status.result(timeout=30)
    assert out["ready"] is True and out["inherited"] >= 1
    assert out["pid"] != os.getpid() and abs(out["started"] - out["psutil"]) < 0.01
    assert status.to_dict()["pid_started"] == out["started"]  # what the task recorded at its end


def test_a_patch_decided_from_the_record_under_its_lock_may_leave_it_unchanged(home):
    store = _store.Store(home)
    record = dict(_record.new_record("p", None, {"backend": "local", "host": "h"}, None))
    store.insert(record)
    task = record["id"]
    live = home / "live" / f"{task}.json"

    def once(doc):  # what the Dask backend does with an event's number
        return None if doc.get("percent") == 10 else {"percent": 10}

    assert store.patch(task, once)["percent"] == 10
    written = live.stat().st_mtime_ns, live.read_bytes()
    assert store.patch(task, once) is None  # decided against: not written at all
    assert (live.stat().st_mtime_ns, live.read_bytes()) == written
    assert store.get(task)["percent"] == 10
    store.finalize(task, {"state": "complete", "finished": time.time()})
    assert store.patch(task, lambda doc: {"percent": 50}) is None  # not live


# -- a shard's recent file ----------------------------------------------------------------------


def _ended_in_shard(store: _store.Store, index: int, count: int) -> list[str]:
    """``count`` tasks of shard ``index`` made and ended through the store's own API; their ids."""
    ids = []
    for i in range(count):
        record = dict(_record.new_record(f"r{i}", None, {"backend": "local", "host": "h"}, None))
        record["id"] = f"{index:02x}" + record["id"][2:]
        store.admit(record, float("inf"))
        store.finalize(record["id"], {"state": "complete", "finished": time.time()})
        ids.append(record["id"])
    return ids


def _shard_files(home, index):
    main, recent = home / "history" / f"{index:02d}.json", home / "history" / f"{index:02d}{_store.RECENT_SUFFIX}"
    tasks = [set(json.loads(p.read_bytes())["tasks"]) if p.exists() else None for p in (main, recent)]
    return main, recent, *tasks


def test_a_task_that_ends_rewrites_its_shards_recent_file_not_the_growing_main_file(home):
    """Ending a task writes a small file; its shard's main file (which grows with the history) is
    rewritten once per `RECENT_MAX` ends, when the recent file's tasks join it."""
    store = _store.store_for(_config.home())
    first = _ended_in_shard(store, 5, _store.RECENT_MAX)  # the last of these fills the recent file
    main, recent, in_main, in_recent = _shard_files(home, 5)
    assert in_main == set(first) and in_recent is None  # joined in one write, the recent file gone
    before = main.stat()
    later = _ended_in_shard(store, 5, _store.RECENT_MAX - 1)
    _, _, in_main, in_recent = _shard_files(home, 5)
    assert (main.stat().st_ino, main.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # untouched
    assert in_main == set(first) and in_recent == set(later)
    assert [bg.get(i).state for i in (first[0], later[-1])] == ["complete", "complete"]
    assert {s.id for s in bg.tasks()} == set(first) | set(later)
    assert _ended_in_shard(store, 5, 1)[0] in _shard_files(home, 5)[2]  # the next end joins them all
    assert _shard_files(home, 5)[3] is None


def test_a_move_into_the_main_file_cut_short_loses_nothing_and_counts_each_task_once(home):
    """A crash after the main file took the recent file's tasks but before the recent file was
    removed (and a crash before a task's live file was removed): each task is read once, its
    first final state stands, and the next move clears what was left."""
    store = _store.store_for(_config.home())
    ids = _ended_in_shard(store, 7, _store.RECENT_MAX - 1)
    main, recent, _, waiting = _shard_files(home, 7)
    saved = recent.read_bytes()
    stale = home / "live" / f"{ids[0]}.json"  # as if its end was cut short before the unlink
    stale.write_text(json.dumps({"tasks": {ids[0]: {**store.get(ids[0]), "state": "running"}}}))
    last = _ended_in_shard(store, 7, 1)[0]  # the move: main file written, recent file removed
    assert _shard_files(home, 7)[2] == waiting | {last} and not stale.exists()
    recent.write_bytes(saved)  # ...as if the removal never happened
    stale.write_text(json.dumps({"tasks": {ids[1]: {**json.loads(saved)["tasks"][ids[1]], "state": "running"}}}))
    stale.rename(home / "live" / f"{ids[1]}.json")
    _store.forget_instances()  # as a new process would read it
    store = _store.store_for(_config.home())
    assert len(store.history()) == len(ids) + 1
    assert sorted(s.id for s in bg.tasks()) == sorted([*ids, last])
    assert len(bg.tasks(limit=5)) == 5 and len({s.id for s in bg.tasks(limit=5)}) == 5
    again = store.finalize(ids[1], {"state": "failed", "error": "late", "finished": time.time()})
    assert again["state"] == "complete" and bg.get(ids[1]).state == "complete"  # the first final state
    assert not (home / "live" / f"{ids[1]}.json").exists()
    _ended_in_shard(store, 7, 1)  # the recent file is full again: its tasks join the main file
    main_now, recent_now, in_main, in_recent = _shard_files(home, 7)
    assert in_recent is None and len(in_main) == len(ids) + 2 and len(store.history()) == len(ids) + 2


def test_a_task_still_ends_when_the_main_file_cannot_be_written(home):
    """The move into the main file fails (here its temp name is taken by a folder that cannot be
    removed): the task's end goes into the recent file, which is small, and the move is tried
    again at the next end."""
    store = _store.store_for(_config.home())
    ids = _ended_in_shard(store, 9, _store.RECENT_MAX - 1)
    blocker = home / "history" / ".09.json.tmp"
    (blocker / "in-the-way").mkdir(parents=True)
    late = _ended_in_shard(store, 9, 1)  # the move fails; the end is kept all the same
    main, recent, in_main, in_recent = _shard_files(home, 9)
    assert in_main is None and in_recent == {*ids, *late} and bg.get(late[0]).state == "complete"
    shutil.rmtree(blocker)
    last = _ended_in_shard(store, 9, 1)
    assert _shard_files(home, 9)[2:] == ({*ids, *late, *last}, None)


def _seconds_to_first_progress_write() -> float | None:
    """In a task: seconds from the start of its code to the first write its progress writer
    makes, seen by counting the store's writes in this process (waits for it, up to 30 s)."""
    writes: list[float] = []
    original = _store.Store.patch

    def counting(self, *args, **kwargs):
        writes.append(time.monotonic())
        return original(self, *args, **kwargs)

    _store.Store.patch = counting
    started = time.monotonic()
    until(lambda: writes, timeout=30)
    return writes[0] - started if writes else None


def test_many_live_tasks_pace_a_new_tasks_first_write_too(home):
    """With 100 tasks live, each writes its progress every 0.5 s (`WRITE_SHARE`); the first
    write of a task started then keeps to that pace too, instead of coming after 0.1 s, so a
    burst of tasks that wait their turn for a CPU does not write all at once.  Its end still
    records who ran it."""
    store = _store.store_for(_config.home())
    fakes = []
    for _ in range(100):
        record = dict(_record.new_record("fake", None, {"backend": "local", "host": "elsewhere"}, None))
        store.admit(record, float("inf"))
        fakes.append(record["id"])
    try:
        status = bg.run(_seconds_to_first_progress_write)
        first = status.result(timeout=60)
        assert first is not None, "the task saw no progress write in 30 s"
        # the pace is 101 x 0.005 = 0.505 s; the base interval, 0.1 s, would have written before 0.3 s
        assert first >= 0.3, first
        assert status.state == "complete" and status.pid is not None
    finally:
        store.remove(fakes)
