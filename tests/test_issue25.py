"""Issue 25: nothing lost, no one in, round three: one test per row of its table that this round
handles (rows 1-6 and 9-11; rows 7 and 8, the terminal's, are the command table's).

Made for real: a second user (``useradd``) plants files, a small tmpfs (mounted here as root)
stands in for a full disk, tasks run in real processes and the command line is run as
``python -m nbbgtask``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from fault_helpers import fill_disk, in_child_as, sleeper, use_home
from waiting import until

import nbbgtask as bg
from nbbgtask.store import store as _store
from nbbgtask.store.files import log_path

MiB = 1024 * 1024


def cli(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nbbgtask", "--home", str(home), *args], capture_output=True, text=True, timeout=timeout
    )


# -- row 1: a module planted in the kernel's folder ------------------------------------------------


def _plant_module(folder: str, marker: str) -> None:
    with open(os.path.join(folder, "json.py"), "w") as f:
        f.write(f"open({marker!r}, 'a').write('planted json.py ran as uid %d\\n' % __import__('os').getuid())\n")
    with open(os.path.join(folder, "data.txt"), "w") as f:
        f.write("the caller's own file\n")


KERNEL = textwrap.dedent("""
    import json, sys
    import nbbgtask as bg
    # As IPython does in a kernel: the kernel's folder is first on its sys.path.
    sys.path.insert(0, "")
    bg.configure(home=sys.argv[1])

    def reads_a_relative_file():
        return open("data.txt").read()

    found = {}
    for method in ("spawn", "forkserver", "auto-after-polars"):
        if method == "auto-after-polars":
            import polars as pl
            pl.DataFrame({"a": list(range(1000))}).select(pl.col("a").sum())  # its thread pool now runs
            bg.configure(start_method="auto")
        else:
            bg.configure(start_method=method)
        status = bg.run(reads_a_relative_file)
        status.wait(60)
        found[method] = [status.state.value, status.start_method, status.error, status.result() if status.state == "complete" else None]
    print(json.dumps(found))
""")


@pytest.fixture
def open_place() -> Iterator[Path]:
    """A folder of root's under /tmp that the second user can reach."""
    base = Path(tempfile.mkdtemp(prefix="nbbgtask-issue25-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_row1_a_module_planted_in_the_kernels_folder_is_never_imported_by_a_task(attacker, open_place, tmp_path):
    shared = open_place / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp, or a project folder others can write
    marker = open_place / "marker"
    open_place.chmod(0o1777)
    found = in_child_as(attacker.pw_uid, attacker.pw_gid, _plant_module, str(shared), str(marker), umask=0o022)
    assert "error" not in found, found
    assert (shared / "json.py").stat().st_uid == attacker.pw_uid
    script = tmp_path / "kernel.py"
    script.write_text(KERNEL)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "home")], cwd=shared, capture_output=True, text=True, timeout=180
    )
    assert not marker.exists(), f"the planted module ran: {marker.read_text()!r}"
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    for method, (state, started_by, error, result) in outcome.items():
        assert state == "complete", (method, error)
        assert result == "the caller's own file\n", method
        assert started_by == ("forkserver" if method == "auto-after-polars" else method)


# -- row 2: a full disk --------------------------------------------------------------------------


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs, mounted here (root); skipped, saying why, where mounting is refused."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        _store.forget_instances()
        for _ in range(50):
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _prints_64_mib() -> int:
    line = b"x" * 1023 + b"\n"
    for i in range(64):
        os.write(1, b"%06d" % i + line[6:] * 1 + line * 1023)  # 1 MiB through fd 1, as C code writes
        time.sleep(0.02)
    print("the last line")
    return 64


def _big_result() -> bytes:
    return os.urandom(300_000)


def test_row2_a_full_disk_loses_nothing_and_stops_nothing_that_can_go_on(disk, home):
    original = home
    home = use_home(disk / "home")
    try:
        bg.configure(log_max="4 MiB")
        chatty = bg.run(_prints_64_mib)
        result = bg.run(_big_result)
        assert chatty.result(timeout=60) == 64
        assert len(result.result(timeout=60)) == 300_000
        log = log_path(home, chatty.id)
        on_disk = os.stat(log).st_blocks * 512
        assert on_disk <= 4 * MiB + 2 * MiB, on_disk  # the cap, and at most what one round printed
        text = chatty.log()
        assert text.count("bytes of this log were dropped here") == 1
        assert "000000" in text and text.endswith("the last line\n")  # head and tail kept
        assert "the last line" in chatty.log(tail=1)

        # The disk fills up from elsewhere while a task runs; the task is then killed.
        running = bg.run(sleeper, 60)
        assert until(lambda: running.refresh().pid is not None)
        filler = fill_disk(disk, last_write=512)
        with pytest.raises(bg.StoreError) as refused:
            bg.run(print, "no room")
        assert "disk is full" in str(refused.value) and str(disk) in str(refused.value), refused.value
        os.kill(running.pid, signal.SIGKILL)
        time.sleep(0.3)
        # Reads answer from what is on disk although recording the death needs room.
        listed = {s.id: s.state.value for s in bg.tasks()}
        assert listed[chatty.id] == listed[result.id] == "complete"
        assert running.wait(0.5) in (True, False)
        assert len(bg.get(result.id).result()) == 300_000  # never deleted to make room
        shown = cli(home, "list")
        assert shown.returncode == 0, shown.stderr
        filler.unlink()
        assert running.wait(15) and running.state == "failed", running.state
        assert bg.run(print, "room again").wait(30)
    finally:
        use_home(original)


# -- row 3: long lines ---------------------------------------------------------------------------


def test_row3_the_tail_of_a_one_line_log_is_fast_and_bounded(home):
    status = bg.run(print, "x")
    status.wait(30)
    path = log_path(home, status.id)
    with open(path, "ab") as f:
        for _ in range(32):
            f.write(b"\r" + b"y" * (MiB - 1))  # a \r progress meter: one line of 32 MiB
    began = time.perf_counter()
    text = status.log(tail=15)
    took = time.perf_counter() - began
    assert took < 1.0, took
    assert len(text.encode()) <= MiB + 200
    assert text.startswith("[nbbgtask: ") and "earlier bytes of this log are not shown" in text
    from nbbgtask.notebook import monitor

    row = monitor._Row(status.refresh()._record, home)
    row.show_log.value = True  # the Log opened: what it sends to the browser every round
    assert len(row.log.value.encode()) <= 20 * 1024, len(row.log.value)
    assert "not shown" in row.log.value
    done = cli(home, "logs", status.id[:8], "-n", "15")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.encode()) <= MiB + 400


# -- row 4: following a log by byte offset ---------------------------------------------------------


def test_row4_following_a_log_never_loses_a_line_after_invalid_utf8(home):
    from nbbgtask.store.tail import follow  # for nbbgtask logs -f (its loop is the command table's)

    status = bg.run(print, "start")
    status.wait(30)
    path = log_path(home, status.id)
    with open(path, "ab") as f:
        f.write(b"bad \xff\xfe bytes\n")
    got, offset = follow(path, 0)
    assert b"bad \xff\xfe bytes\n" in got and offset == os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(b"printed after the bad bytes\n")
    more, offset2 = follow(path, offset)
    assert more == b"printed after the bad bytes\n" and offset2 == os.path.getsize(path)
    assert follow(path, offset2) == (b"", offset2)
    # -n 5 -f on a big log reads its end only: the follow starts at the size, one read per call.
    with open(path, "ab") as f:
        f.write(b"z" * (8 * MiB))
    chunk, end = follow(path, offset2)
    assert len(chunk) <= 1 * MiB and end == offset2 + len(chunk)


# -- rows 5 and 6: hostile and damaged store files -------------------------------------------------


def test_row5_one_deeply_nested_live_file_hides_no_other_task(home):
    done = bg.run(print, "a finished task")
    done.wait(30)
    hostile = home / "live" / ("cd" * 16 + ".json")
    hostile.write_bytes(b"[" * 100_000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        listed = [s.id for s in bg.tasks()]
        assert bg.get(done.id).state == "complete"
    assert done.id in listed
    assert any(issubclass(w.category, bg.StoreDamagedWarning) for w in caught)
    assert not hostile.exists() and list((home / "live").glob("*.damaged-*"))
    shown = cli(home, "list")
    assert shown.returncode == 0, shown.stderr


def _history_file(home: Path, many: int = 200) -> tuple[Path, list[str]]:
    base = bg.run(print, "template")
    base.wait(30)
    record = next(iter(json.loads(next((home / "history").glob("*.recent.json")).read_text())["tasks"].values()))
    now = time.time()
    ids = [f"{i:02x}" + "0" * 30 for i in range(many)]
    tasks = {tid: {**record, "id": tid, "name": f"t{n}", "created": now - 1000 + n} for n, tid in enumerate(ids)}
    path = home / "history" / "07.json"  # one shard file holding them all, as a hand-built store would
    path.write_text(json.dumps({"tasks": tasks, "_meta": {"1": {"schema": 3}}}, separators=(",", ":")))
    _store.forget_instances()
    return path, ids


@pytest.mark.parametrize("damage", ["invalid-utf8", "last-byte-cut"])
def test_row6_a_damaged_history_shard_is_salvaged_record_by_record(home, damage):
    path, ids = _history_file(home)
    raw = bytearray(path.read_bytes())
    if damage == "invalid-utf8":
        at = raw.index(b'"name":"t100"') + len('"name":"t1')
        raw[at] = 0xFF
        lost = {ids[100]}
    else:
        del raw[-1]
        lost = set()
    path.write_bytes(bytes(raw))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        listed = {s.id for s in bg.tasks()}
        bg.tasks()
    assert set(ids) - lost <= listed and not lost & listed
    said = [str(w.message) for w in caught if issubclass(w.category, bg.StoreDamagedWarning)]
    assert len(said) == 1, said  # once
    assert f"its {len(ids) - len(lost)} sound record(s) were kept" in said[0]
    if lost:
        assert "1 damaged record(s) could not be read" in said[0]
    aside = list(path.parent.glob("07.json.damaged-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == bytes(raw)  # the damaged copy is kept


# -- row 9: a planted stack file -------------------------------------------------------------------


def test_row9_stack_never_signals_another_users_process_named_by_a_planted_file(attacker, home, open_place):
    open_place.chmod(0o777)
    marker, ready = open_place / "signalled", open_place / "ready"
    victim = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import os, signal, time
            os.setsid()  # leading its own group, as a task does
            os.setgid({attacker.pw_gid}); os.setuid({attacker.pw_uid})
            def got(signum, frame):
                open({str(marker)!r}, "a").write("signalled\\n")
            signal.signal(signal.SIGUSR2, got)
            open({str(ready)!r}, "w").close()
            time.sleep(30)
        """)],
    )
    try:
        assert until(ready.exists)
        task = bg.run(sleeper, 30)
        assert until(lambda: any((home / "stacks").glob(f"{task.id}.*")))
        for own in (home / "stacks").glob(f"{task.id}.*"):
            own.unlink()  # only the planted file names a process now
        started = psutil.Process(victim.pid).create_time()
        from nbbgtask.store.files import stack_path

        Path(stack_path(home, task.id, victim.pid, started)).touch(mode=0o600)
        with pytest.raises(bg.NbbgtaskError):
            task.stack()
        time.sleep(0.3)
        assert not marker.exists(), "another user's process was signalled"
    finally:
        victim.kill()
        victim.wait()


# -- row 10: the memory watcher and a reused pid ---------------------------------------------------


def test_row10_the_memory_watcher_never_signals_a_process_that_is_not_its_task(tmp_path):
    """The watcher is told a task's pid and start time; by the time it acts, the pid is another
    process's (a stand-in: a sleeper of ours, in a group of its own, started at another time)."""
    other = subprocess.Popen(["sleep", "30"], start_new_session=True)
    ours, theirs = socket.socketpair()
    script = Path(bg.__file__).parent / "task" / "memwatch.py"
    started = psutil.Process(other.pid).create_time() - 100  # the task it was: started earlier
    try:
        watcher = subprocess.Popen(
            [sys.executable, str(script), str(other.pid), "1", "0.2", "0.05", "0", repr(started)],
            stdin=theirs.fileno(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        theirs.close()
        watcher.wait(20)  # it saw "the task" past its 1-byte limit, and would stop it
        assert other.poll() is None, "the watcher signalled a process that is not its task"
    finally:
        ours.close()
        other.kill()
        other.wait()


# -- row 11: a burst between two samples -----------------------------------------------------------


def hog() -> int:
    blocks = list(map(bytearray, [16 * MiB] * 64))  # 1 GiB in one call, and returns at once
    return len(blocks)


def test_row11_a_burst_past_the_memory_cap_never_ends_complete(home):
    status = bg.run(hog, limits=bg.Limits(memory="300 MiB"))
    assert status.wait(60)
    assert status.state == "failed", (status.state, status.error)
    assert "MemoryLimitExceeded" in status.error and "300 MiB" in status.error, status.error
    peak = status.to_dict().get("peak_memory") or status._record.get("peak_memory")
    # The growth of the process's own high-water mark over what it held at its start: a lower
    # bound, which pages shared with the parent at the fork can keep a few MiB under the 1 GiB.
    assert peak is not None and peak >= 1000 * MiB, peak
