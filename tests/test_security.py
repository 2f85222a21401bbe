"""Issue 13: the attacks of the security review, one test per row of its table.

Each attack is made for real: another user of the machine (made with ``useradd`` when the tests
run as root; skipped otherwise) plants files, a harmless pickle payload appends a line to a marker
file, real processes are cancelled, a real Dask LocalCluster carries forged events.  Every test
asserts that the payload never ran (the marker file is absent) and that nothing outside the home
changed (a sentinel file beside it keeps its bytes, mode and owner).
"""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from fault_helpers import ATTACKER, in_child_as
from waiting import until

import nbbgtask as bg
from nbbgtask.commands import cli as _cli
from nbbgtask.core import config as _config
from nbbgtask.store import store as _store


class Payload:
    """Unpickled, it appends a line to the marker file: proof that forged data was run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"echo ran-as-$(id -u) >> {self.marker}",))


def payload(marker: Path) -> bytes:
    return pickle.dumps(Payload(str(marker)))


class Scene:
    """A place for one attack: ``base`` (root's, sticky and world-writable like /tmp), a
    sentinel file beside the home and a marker the payload would write."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.marker = base / "payload-ran"
        self.sentinel = base / "important"
        self.sentinel.write_text("root's own file\n")
        self.sentinel.chmod(0o644)
        self._before = self._snapshot()

    def _snapshot(self) -> tuple:
        st = self.sentinel.stat()
        return self.sentinel.read_bytes(), stat.S_IMODE(st.st_mode), st.st_uid, st.st_mtime_ns

    def assert_untouched(self) -> None:
        assert not self.marker.exists(), f"the payload ran: {self.marker.read_text()!r}"
        assert self.sentinel.exists(), "a file outside the home was deleted"
        assert self._snapshot() == self._before, "a file outside the home was changed"


@pytest.fixture
def scene() -> Iterator[Scene]:
    base = Path(tempfile.mkdtemp(prefix="nbbgtask-security-"))
    base.chmod(0o1777)  # like /tmp: anyone may make things here, nobody may move another's
    _config.reset()
    try:
        s = Scene(base)
        yield s
        s.assert_untouched()
    finally:
        _config.reset()
        _store.forget_instances()
        shutil.rmtree(base, ignore_errors=True)


def as_user(user: pwd.struct_passwd, fn, *args):  # type: ignore[no-untyped-def]
    """``fn(*args)`` in a forked child running as ``user``; what it returns (JSON), or its error."""
    found = in_child_as(user.pw_uid, user.pw_gid, fn, *args, umask=0o022)
    assert "error" not in found, found
    return found.get("value")


def _plant(home: str, spec: dict) -> None:
    """The attacker: make a home and plant records (and files, links) in it, in nbbgtask's formats."""
    os.makedirs(home, mode=0o755, exist_ok=True)
    for sub in ("logs", "results", "stacks", "live", "history", "locks"):
        os.makedirs(os.path.join(home, sub), mode=0o777, exist_ok=True)
        os.chmod(os.path.join(home, sub), 0o777)
    for rel, rec in spec.get("records", {}).items():
        with open(os.path.join(home, rel), "w") as f:
            json.dump({"tasks": {rec["id"]: rec}, "_meta": {"1": {"schema": 2}}}, f)
    for rel, data in spec.get("files", {}).items():
        with open(os.path.join(home, rel), "wb") as f:
            f.write(base64.b64decode(data))
    for rel, target in spec.get("links", {}).items():
        os.symlink(target, os.path.join(home, rel))


TASK_ID = "ab" * 16


def record(task_id: str = TASK_ID, **fields) -> dict:
    now = time.time()
    return {
        "id": task_id, "name": "planted", "state": "complete", "created": now - 10, "started": now - 9,
        "finished": now - 1, "percent": 100.0, "message": "", "backend": "local", "host": None,
        "has_result": False, "error": None, "traceback": None, **fields,
    }


def plant(user: pwd.struct_passwd, home: Path, **spec) -> None:
    spec["files"] = {k: base64.b64encode(v).decode() for k, v in spec.get("files", {}).items()}
    as_user(user, _plant, str(home), spec)


def cli(home: Path, *args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nbbgtask", "--home", str(home), *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


# -- row 1: another user's home, with a forged result ------------------------------------------


def test_row1_a_home_another_user_made_is_refused_and_its_result_never_unpickled(attacker, scene):
    home = scene.base / "shared-project"
    data = payload(scene.marker)
    plant(
        attacker, home,
        records={f"history/{int(TASK_ID[:2], 16) % 64:02d}.json": record(
            has_result=True, result_type="builtins.int", result_inline=base64.b64encode(data).decode())},
        files={f"results/{TASK_ID}.pkl": data},
    )
    with pytest.raises(bg.HomeError, match=f"refusing {home} .*belongs to {ATTACKER}"):
        bg.configure(home=home)
        bg.get(TASK_ID).result()  # what root would do next: the payload would run here
    os.environ["NBBGTASK_HOME"] = str(home)  # the same through the environment
    try:
        _config.reset()
        with pytest.raises(bg.HomeError, match="belongs to"):
            bg.get(TASK_ID).result()
    finally:
        del os.environ["NBBGTASK_HOME"]
    scene.assert_untouched()


# -- row 2: symlinks at the store's temp names -------------------------------------------------


def test_row2_planted_symlinks_at_temp_names_are_never_followed(attacker, scene):
    home = scene.base / "shared-project"
    temp_names = [f".{i:02d}{suffix}.tmp" for i in range(64) for suffix in (".json", ".recent.json")]
    links = {f"history/{name}": str(scene.sentinel) for name in temp_names}
    plant(attacker, home, links=links)
    with pytest.raises(bg.HomeError, match="belongs to"):
        bg.configure(home=home)
        bg.run(lambda: 1).wait(30)  # its end writes a history shard through its temp name
    # And in a home of one's own, a link left at a temp name (from before) is replaced, not followed.
    own = scene.base / "own"
    bg.configure(home=own)
    bg.run(print).wait(30)
    for name in temp_names:
        os.symlink(scene.sentinel, own / "history" / name)
    assert bg.run(lambda: 2).result(30) == 2
    scene.assert_untouched()


# -- row 3: a planted running record naming root's process -----------------------------------


def test_row3_cancel_of_a_planted_record_never_signals_roots_process(attacker, scene):
    victim = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        proc = psutil.Process(victim.pid)
        home = scene.base / "shared-project"
        plant(attacker, home, records={f"live/{TASK_ID}.json": record(
            state="running", finished=None, pid=victim.pid, pid_started=proc.create_time(),
            host=os.uname().nodename, owner_pid=victim.pid, owner_started=proc.create_time())})
        out = cli(home, "cancel", TASK_ID[:8])
        assert out.returncode == 2, out
        assert "belongs to" in out.stderr and "Traceback" not in out.stderr, out.stderr
        time.sleep(0.2)
        assert victim.poll() is None, "root's process was signalled"
    finally:
        victim.kill()
        victim.wait()
    scene.assert_untouched()


# -- row 4: an id that is a path ------------------------------------------------------------


def test_row4_a_record_whose_id_is_a_path_is_set_aside_and_never_becomes_a_path(attacker, scene):
    bad = "../../../../" + str(scene.sentinel.relative_to("/"))[:-len(".x")] + ".x"
    (scene.base / "important.x").write_text("keep\n")  # what logs/<id>.log's neighbour would hit
    # Planted in another user's home: refused outright.
    home = scene.base / "shared-project"
    plant(attacker, home, records={"history/00.json": record(task_id=bad)})
    assert cli(home, "prune").returncode == 2
    # In a home of one's own (written by a broken tool, say): set aside, never a path.
    own = scene.base / "own"
    bg.configure(home=own)
    bg.run(print).wait(30)
    shard = own / "history" / "00.json"
    doc = json.loads(shard.read_text()) if shard.exists() else {"_meta": {"1": {"schema": 2}}}
    doc.setdefault("tasks", {})[bad] = record(task_id=bad, has_result=True)
    shard.write_text(json.dumps(doc))
    _store.forget_instances()
    with pytest.warns(bg.StoreDamagedWarning, match="not 32 hex digits"):
        bg.prune()
    assert (scene.base / "important.x").read_text() == "keep\n"
    assert all(s.id != bad for s in bg.tasks())
    with pytest.raises(bg.TaskNotFound):
        bg.get(bad)
    scene.assert_untouched()


# -- row 5: the folder above the home can be written by another user --------------------------


def test_row5_a_home_under_a_folder_others_can_write_is_refused_and_a_swap_is_seen(attacker, scene):
    shared = scene.base / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # not sticky: anyone may rename what is in it
    home = shared / "home"
    with pytest.raises(bg.HomeError, match="writable by others and not sticky"):
        bg.configure(home=home)
    # Had it been accepted: the swap after the first check is seen before a result is unpickled.
    shared.chmod(0o755)
    bg.configure(home=home)
    status = bg.run(lambda: list(range(1000)))  # a result too big for the record: a file
    assert status.wait(30)
    shared.chmod(0o777)
    data = payload(scene.marker)
    as_user(attacker, _swap, str(home), status.id, data.hex())
    _store.forget_instances()
    with pytest.raises(bg.HomeError):
        bg.get(status.id).result()
    with pytest.raises(bg.HomeError):
        status.result()
    scene.assert_untouched()


def _swap(home: str, task_id: str, data: str) -> None:
    """The attacker: put a home of theirs where the victim's was, with the task's record and a
    forged result."""
    os.rename(home, home + ".real")
    _plant(home, {
        "records": {f"history/{int(task_id[:2], 16) % 64:02d}.json": record(task_id, has_result=True)},
        "files": {f"results/{task_id}.pkl": base64.b64encode(bytes.fromhex(data)).decode()},
    })
    os.chmod(home, 0o700)


# -- row 6: symlinked parts of the home -------------------------------------------------------


def test_row6_symlinked_sub_folders_and_a_symlinked_home_are_refused_and_left_as_they_are(scene):
    world = scene.base / "world"
    world.mkdir()
    world.chmod(0o777)
    home = scene.base / "home"
    bg.configure(home=home)
    shutil.rmtree(home / "results")
    os.symlink(world, home / "results")
    _config.reset()
    with pytest.raises(bg.HomeError, match=r"sub-folder results/ is a symlink"):
        bg.configure(home=home)
    link = scene.base / "link"
    os.symlink(world, link)
    before = (stat.S_IMODE(world.stat().st_mode), sorted(os.listdir(world)))
    out = cli(link, "list")
    assert out.returncode == 2 and "is a symlink" in out.stderr, out
    assert (stat.S_IMODE(world.stat().st_mode), sorted(os.listdir(world))) == before
    scene.assert_untouched()


# -- row 7: forged and malformed Dask events ------------------------------------------------


def test_row7_forged_dask_events_are_ignored_counted_and_results_are_not_readable(scene, dask_client):
    from distributed import Client

    from nbbgtask.dask import backend as _dask_backend
    from nbbgtask.dask.wire import TOPIC, seal, unseal

    bg.configure(home=scene.base / "home", backend="dask", dask_client=dask_client)

    def work():
        print("OUTPUT-CANARY-4711", flush=True)
        time.sleep(6)
        return "GENUINE-RESULT-" + "x" * 600  # too big for the record: it travels in the final event

    status = bg.run(work)
    assert until(lambda: status.refresh().state is bg.State.RUNNING, timeout=60)
    forged = payload(scene.marker)
    other = Client(dask_client.scheduler.address, set_as_default=False)  # another client of it
    backend = _dask_backend.backend()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            now = time.time()
            other.log_event(TOPIC, {"task_id": status.id, "kind": "progress", "percent": "x", "time": now})
            other.log_event(TOPIC, {"task_id": status.id, "kind": "final", "state": "complete", "time": now,
                                    "has_result": True, "result": forged})
            other.log_event(TOPIC, {"task_id": status.id, "v": 2, "nonce": "AAAAAAAAAAAAAAAA", "box": "AAAA" * 8})
            # Sealed with the task's own key but malformed (a broken worker): checked field by field.
            key = bytes.fromhex(status.to_dict()["event_key"])
            other.log_event(TOPIC, seal(key, status.id, {"kind": "progress", "percent": "x", "time": now,
                                                         "run": "0" * 16, "seq": 1}))
            assert until(lambda: backend.rejected >= 4, timeout=30), backend.rejected
            # A genuine event sent again (copied from the scheduler's log) is applied only once.
            assert until(lambda: "OUTPUT-CANARY-4711" in status.log(), timeout=30)
            [genuine] = [sealed for _, sealed in other.get_events(TOPIC)
                         if (unseal(key, status.id, sealed) or {}).get("kind") == "log"]
            other.log_event(TOPIC, genuine)
            # Then one more forged event: events reach the kernel in order, so once it is counted
            # the copy has been seen too.
            other.log_event(TOPIC, {"task_id": status.id, "v": 2, "nonce": "AAAAAAAAAAAAAAAA", "box": "BBBB" * 8})
            assert until(lambda: backend.rejected >= 5, timeout=30), backend.rejected
            assert status.refresh().state is bg.State.RUNNING  # seen while it ran, not refused as over
            assert status.log().count("OUTPUT-CANARY-4711") == 1
            assert status.refresh().state is bg.State.RUNNING  # the forged final was not taken
            assert status.result(timeout=60).startswith("GENUINE-RESULT-")
            events = repr(other.get_events(TOPIC))
        finally:
            other.close()
    assert sum("nbbgtask ignored an event" in str(w.message) for w in caught) >= 4
    assert any("bad 'percent'" in str(w.message) for w in caught)
    assert status.log().count("OUTPUT-CANARY-4711") == 1
    assert "OUTPUT-CANARY" not in events and "GENUINE-RESULT" not in events  # sealed for the kernel
    bg.configure(backend="local")
    scene.assert_untouched()


# -- rows 8 and 9: names and messages on a terminal -----------------------------------------


def _render_monitor() -> str:
    from rich.console import Console

    console = Console(file=io.StringIO(), force_terminal=True, width=200, color_system="truecolor")
    console.print(_cli._monitor_view(10))
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_row8_markup_in_names_and_errors_is_printed_as_text(scene, capsys, monkeypatch):
    bg.configure(home=scene.base / "home")

    def fail():
        raise KeyError("config section [/etc] missing")

    bg.run(print, name="report [/oops]").wait(30)
    bg.run(print, name="[link=https://example.invalid/]click[/link]").wait(30)
    bg.run(fail, name="[bold red]x").wait(30)
    monkeypatch.setenv("FORCE_COLOR", "1")  # a terminal: where links would be live
    monkeypatch.setenv("COLUMNS", "250")
    assert _cli.main(["--home", str(scene.base / "home"), "list"]) == 0
    listed = capsys.readouterr().out
    drawn = _render_monitor()
    assert "[link=https://example.invalid/]click[/link]" in listed
    for text in (listed, drawn):
        plain = re.sub(r"\x1b\[[0-9;]*m", "", text)  # rich's own styles aside
        assert "report [/oops]" in plain and "[link=" in plain and "[bold red]x" in plain
        assert "[/etc] missing" in plain
        assert "\x1b]8;" not in text  # no terminal hyperlink
    scene.assert_untouched()


def test_row9_escape_codes_and_newlines_are_made_visible(scene, capsys):
    home = scene.base / "home"
    bg.configure(home=home)
    evil = "\x1b]0;pwned\x07\x1b[2J"

    def fail():
        bg.progress(50, "fine\nstate:     complete")
        raise ValueError(f"bad {evil}")

    status = bg.run(fail, name=f"name {evil}")
    status.wait(30)
    outputs = []
    for args in (["show", status.id], ["wait", status.id], ["list"], ["logs", status.id]):
        _cli.main(["--home", str(home), *args])
        outputs.append(capsys.readouterr().out)
    outputs.append(_render_monitor().replace("\x1b[", "CSI"))  # rich's own styles aside
    for out in outputs[:4]:
        assert "\x1b" not in out and "\x07" not in out, out
    assert "\\x1b]0;pwned\\x07" in outputs[0]
    assert "\x07" not in outputs[4] and "\x1b]" not in outputs[4] and "2J" not in outputs[4].replace("\\x1b[2J", "")
    shown = outputs[0].splitlines()
    assert sum(line.startswith("state:") for line in shown) == 1, outputs[0]  # no faked field
    scene.assert_untouched()


# -- row 10: secrets in errors, tracebacks and the log ---------------------------------------


def test_row10_secrets_are_redacted_from_error_traceback_and_log(scene):
    bg.configure(home=scene.base / "home")
    token = "tok-9f8e7d6c5b4a"

    def call_api():
        secret = bg.current().secrets["token"]
        raise PermissionError(f"403 for https://api.example.invalid/x?key={secret} ({secret!r})")

    status = bg.run(call_api, secrets={"token": token})
    status.wait(30)
    texts = {"error": status.error, "traceback": status.traceback, "log": status.log()}
    stored = b"".join(p.read_bytes() for p in (scene.base / "home").rglob("*") if p.is_file())
    for where, text in texts.items():
        assert token not in text, where
        assert "key=***" in text, (where, text)
    assert token.encode() not in stored
    scene.assert_untouched()


# -- row 11: cancel without proof ----------------------------------------------------------


def _live_record(home: Path, pid: int, started: float | None) -> str:
    template = bg.run(lambda: None)
    template.wait(30)
    base = template.to_dict()
    task_id = os.urandom(16).hex()
    _store.store_for(home).insert({**base, "id": task_id, "state": "running", "finished": None,
                                   "pid": pid, "pid_started": started, "cancel_requested": False})
    return task_id


def test_row11_cancel_signals_only_a_proved_task_process(attacker, scene):
    home = scene.base / "home"
    bg.configure(home=home, cancel_grace=0.5)
    mine_no_group = subprocess.Popen(["sleep", "60"])  # in this process's group: not a leader
    theirs = subprocess.Popen(
        ["/bin/sleep", "60"], user=attacker.pw_uid, group=attacker.pw_gid, extra_groups=[], start_new_session=True
    )
    leader = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        cases = [
            (leader.pid, None),  # no start time: no proof
            (mine_no_group.pid, psutil.Process(mine_no_group.pid).create_time()),
            (theirs.pid, psutil.Process(theirs.pid).create_time()),
        ]
        for pid, started in cases:
            status = bg.get(_live_record(home, pid, started))
            with pytest.raises(bg.NbbgtaskError, match="not confirmed.*nothing was signalled"):
                status.cancel()
            assert bg.get(status.id).state is bg.State.RUNNING  # not falsely "cancelled"
        time.sleep(0.2)
        for proc in (mine_no_group, theirs, leader):
            assert proc.poll() is None, "a process that is not the task's was signalled"
        out = cli(home, "cancel", status.id)
        assert out.returncode == 2 and "not confirmed" in out.stderr and "Traceback" not in out.stderr, out
    finally:
        for proc in (mine_no_group, theirs, leader):
            proc.kill()
            proc.wait()
    scene.assert_untouched()


# -- row 12: root and a user's home ----------------------------------------------------------


def test_row12_root_does_not_rewrite_a_users_home(attacker, scene):
    home = scene.base / "users-home"
    bg.configure(home=home)
    bg.run(print, "theirs").wait(30)
    _config.reset()
    _store.forget_instances()
    for path in [home, *home.rglob("*")]:
        os.lchown(path, attacker.pw_uid, attacker.pw_gid)
    owners = {p: p.lstat().st_uid for p in home.rglob("*")}
    out = cli(home, "prune")
    assert out.returncode == 2 and "belongs to" in out.stderr, out
    assert {p: p.lstat().st_uid for p in home.rglob("*")} == owners
    # The user can still list their tasks.
    assert as_user(attacker, _list_states, str(home)) == ["complete"]
    scene.assert_untouched()


def _list_states(home: str) -> list[str]:
    _config.reset()
    _store.forget_instances()
    bg.configure(home=home)
    return [s.state.value for s in bg.tasks()]


# -- row 13: odd homes and options ----------------------------------------------------------


def test_row13_readonly_and_missing_homes_bounded_options_and_a_bad_pid(scene):
    home = scene.base / "home"
    bg.configure(home=home)
    keep = bg.run(print, "kept", name="kept")
    keep.wait(30)
    home.chmod(0o500)
    try:
        _store.forget_instances()
        with pytest.raises(bg.StoreError, match="read-only"):
            bg.run(print)
        assert stat.S_IMODE(home.stat().st_mode) == 0o500  # never chmodded
        assert [s.name for s in bg.tasks()] == ["kept"]
    finally:
        home.chmod(0o700)
    missing = scene.base / "no-such-home"
    out = cli(missing, "list")
    assert out.returncode == 2 and "no nbbgtask home" in out.stderr and not missing.exists(), out
    for args in (["monitor", "--interval", "inf"], ["monitor", "--interval", "nan"], ["wait", keep.id, "--timeout", "inf"]):
        out = cli(home, *args)
        assert out.returncode == 2 and "Traceback" not in out.stderr, (args, out)
    _store.store_for(home).insert({**keep.to_dict(), "id": os.urandom(16).hex(), "state": "running", "pid": -1})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bg.StoreDamagedWarning)
        out = cli(home, "list")
    assert out.returncode == 0 and "kept" in out.stdout, out
    scene.assert_untouched()

