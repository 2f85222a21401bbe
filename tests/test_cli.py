"""The nbbgtask command line, run as a separate process against tasks this process started."""

from __future__ import annotations

import argparse
import json
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


# -- one table for the command line and the magic -------------------------------------------------


def test_every_command_of_the_table_is_a_cli_sub_parser_and_the_magic_parses_it_alike():
    from nbbgtask.commands import cli as _cli
    from nbbgtask.commands import table

    (sub,) = [a for a in _cli._parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert sorted(sub.choices) == sorted(c.name for c in table.COMMANDS if table.CLI in c.forms)
    magic_forms = [c.name for c in table.COMMANDS if table.MAGIC in c.forms]
    assert set(magic_forms) == set(sub.choices) | {"result"}  # result hands back a value: the magic's only
    for name, parser in sub.choices.items():
        command = table.find(name, table.CLI)
        offered = {o.flags[0] for o in command.offered(table.CLI)}
        assert offered == {a.option_strings[0] for a in parser._actions if a.option_strings and a.dest != "help"}
        if name in magic_forms:  # the magic offers the same options where both front ends can use them
            shared = {o.flags[0] for o in command.options if o.forms == table.BOTH}
            with pytest.raises(table.Help) as shown:
                table.parse(command, ["--help"], f"%bgtask {name}")
            assert all(flag in str(shown.value) for flag in shared)
            assert command.help in parser.description and command.help in str(shown.value)


def test_the_same_bad_option_is_exit_2_naming_it_on_the_command_line(home):
    status = bg.run(_chatty)
    status.wait(30)
    for args, said in (
        (["logs", status.id, "-n", "many"], "takes a whole number, got 'many'"),
        (["list", "--limit", "-1"], "takes a whole number, 0 or more, got '-1'"),
        (["list", "--limit", "3", "--all"], "not allowed with argument --limit"),
        (["wait", status.id, "--timeout", "nan"], "takes a number of seconds from 0 to 1e+09, got 'nan'"),
    ):
        out = cli(home, *args)
        assert out.returncode == 2 and said in out.stderr and "Traceback" not in out.stderr, (args, out)


# -- list pages ------------------------------------------------------------------------------------


def _planted(n, *, created=None, name="planted", state="complete", **fields):
    """``n`` finished tasks' records, one second apart, the newest ``created`` (default: now)."""
    from nbbgtask.core.record import new_task_id

    newest = time.time() if created is None else created
    return [
        {
            "id": new_task_id(), "name": name, "state": state, "created": newest - i, "started": newest - i,
            "finished": newest - i + 0.5, "percent": 100.0, "message": f"planted {i}", "start_method": "fork",
            "pid": 4242, "host": "elsewhere", "error": None, "traceback": None, "has_result": False,
            "settings": {"token": "not-for-listing"}, **fields,
        }
        for i in range(n)
    ]


def _plant(home, records):
    from nbbgtask.store.store import store_for

    assert store_for(home).add_finished(records) == len(records)


def _rows(stdout):
    """The task rows of a listing: not its header, nor its '… N more' line."""
    return [line for line in stdout.splitlines()[1:] if not line.startswith("…")]


def test_list_shows_the_newest_20_of_30_and_ends_with_how_many_more(home):
    real = bg.run(_chatty, name="real")
    real.wait(30)
    _plant(home, _planted(29, created=time.time() - 60))
    out = cli(home, "list")
    assert out.returncode == 0, out.stderr
    rows = _rows(out.stdout)
    assert len(rows) == 20 and rows[0].startswith(real.id[:8])
    assert out.stdout.splitlines()[-1] == "… 10 more: --limit N or --all"
    assert [r.split()[0] for r in rows] == [s.id[:8] for s in bg.tasks(limit=20)]  # the newest, in order
    limited = cli(home, "list", "--limit", "25")
    assert len(_rows(limited.stdout)) == 25 and limited.stdout.endswith("… 5 more: --limit N or --all\n")
    none = cli(home, "list", "--limit", "0")
    assert none.stdout == "… 30 more: --limit N or --all\n"


def test_list_all_shows_every_task_and_no_more_line(home):
    _plant(home, _planted(30))
    out = cli(home, "list", "--all")
    assert out.returncode == 0 and len(_rows(out.stdout)) == 30 and "more" not in out.stdout


def test_list_says_how_many_more_of_thousands_from_the_summaries(home):
    _plant(home, _planted(5_000))  # more than a shard's summary keeps (64 a shard)
    out = cli(home, "list", "--state", "complete")
    assert len(_rows(out.stdout)) == 20 and out.stdout.endswith("… 4,980 more: --limit N or --all\n")
    assert cli(home, "list", "--state", "failed").stdout == "no tasks\n"


def test_list_since_keeps_the_tasks_created_within_the_duration_and_refuses_a_bad_one(home):
    now = time.time()
    _plant(home, _planted(4, created=now - 3 * 3600, name="old"))
    _plant(home, _planted(3, created=now - 600, name="recent"))
    names = lambda out: sorted({row.split()[1] for row in _rows(out.stdout)})  # noqa: E731
    assert names(cli(home, "list", "--since", "1h")) == ["recent"]
    assert len(_rows(cli(home, "list", "--since", "30m").stdout)) == 3
    assert len(_rows(cli(home, "list", "--since", "1d").stdout)) == 7
    assert cli(home, "list", "--since", "90s").stdout == "no tasks\n"
    paged = cli(home, "list", "--since", "4h", "--limit", "5")
    assert len(_rows(paged.stdout)) == 5 and paged.stdout.endswith("… 2 more: --limit N or --all\n")
    for bad in ("2x", "10", "h", "1e400d"):
        out = cli(home, "list", "--since", bad)
        assert out.returncode == 2 and repr(bad) in out.stderr and "--since" in out.stderr, out
        assert "Traceback" not in out.stderr


def test_list_json_is_one_object_a_line_with_the_public_fields_only(home):
    from nbbgtask.core.record import PUBLIC_FIELDS

    status = bg.run(_chatty, name="jsonish", secrets={"password": "hunter2-secret"})
    status.wait(30)
    _plant(home, _planted(25))
    out = cli(home, "list", "--json")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 20  # the same page as the table, and no '… more' line
    objects = [json.loads(line) for line in lines]
    assert all(list(o) == list(PUBLIC_FIELDS) for o in objects)
    assert [o["id"] for o in objects] == [s.id for s in bg.tasks(limit=20)]
    mine = next(o for o in objects if o["id"] == status.id)
    record = status.refresh().to_dict()
    assert mine == {field: record.get(field) for field in PUBLIC_FIELDS}
    assert mine["state"] == "complete" and mine["start_method"] == "fork" and mine["pid"] > 0
    assert "hunter2-secret" not in out.stdout and "not-for-listing" not in out.stdout
    assert len(cli(home, "list", "--json", "--all").stdout.splitlines()) == 26


def test_list_json_streams_into_a_pipe_that_closes_early(home):
    _plant(home, _planted(3_000))
    with subprocess.Popen(
        [sys.executable, "-m", "nbbgtask", "--home", str(home), "list", "--json", "--all"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        first = json.loads(proc.stdout.readline())
        proc.stdout.close()  # as `| head -1` does
        assert proc.wait(timeout=60) == 0
        assert proc.stderr.read() == b""
    assert first["name"] == "planted"


# -- terminal text is text -------------------------------------------------------------------------

#: a bidi override, a zero-width space and a lone surrogate
ODD = "ab\u202ecd\u200bef\udc80gh"
ODD_SHOWN = "ab\\u202ecd\\u200bef\\udc80gh"


def _odd_reporter():
    from IPython.display import display

    bg.progress(50, ODD)
    display({"text/plain": "shown\u202eout"}, raw=True)
    time.sleep(0.3)  # long enough for the progress to be written


def _odd_failure():
    raise ValueError(ODD)


def _printable(text):
    return all(ch.isprintable() or ch == "\n" for ch in text)


def test_format_characters_and_a_lone_surrogate_are_shown_escaped_and_exit_0(home):
    status = bg.run(_odd_reporter, name="odd\u202ename")
    status.wait(30)
    assert status.refresh().message == ODD
    for args in (["list"], ["show", status.id], ["list", "--json"]):
        out = cli(home, *args)
        assert out.returncode == 0 and "Traceback" not in out.stderr, (args, out)
        assert _printable(out.stdout), (args, out.stdout)
    shown = cli(home, "show", status.id).stdout
    assert f"progress:  100.0%  {ODD_SHOWN}" in shown
    assert "name:      odd\\u202ename" in shown and "  shown\\u202eout" in shown
    assert json.loads(cli(home, "list", "--json").stdout)["message"] == ODD
    failed = bg.run(_odd_failure)
    waited = cli(home, "wait", failed.id)
    assert waited.returncode == 1 and f"failed: ValueError: {ODD_SHOWN}" in waited.stdout
    listing = cli(home, "list")
    assert listing.returncode == 0 and _printable(listing.stdout) and "\\u202e" in listing.stdout


def test_a_huge_or_nan_number_in_a_record_prints_as_text_never_a_traceback(home):
    huge, nan = _planted(1, created=1e300, name="huge")[0], _planted(1, name="nan")[0]
    _plant(home, [huge, nan])
    # NaN is no JSON the store writes: put it in the shard's file, as a damaged or foreign one could have it
    (shard,) = [p for p in (home / "history").iterdir() if not p.name.endswith(".index.json") and nan["id"] in p.read_text()]
    data = json.loads(shard.read_text())
    data["tasks"][nan["id"]]["started"] = float("nan")
    shard.write_text(json.dumps(data))
    for args in (["list"], ["list", "--all", "--json"], ["list", "--since", "1h"], ["show", huge["id"]], ["show", nan["id"]]):
        out = cli(home, *args)
        assert out.returncode == 0 and out.stderr == "", (args, out)
    assert "created:   1e+300 (not a time)" in cli(home, "show", huge["id"]).stdout
    shown = cli(home, "show", nan["id"]).stdout
    assert "started:   nan (not a time)" in shown and "elapsed:   -" in shown
    objects = {o["name"]: o for o in map(json.loads, cli(home, "list", "--json").stdout.splitlines())}
    assert objects["huge"]["created"] == 1e300 and objects["nan"]["started"] is None
