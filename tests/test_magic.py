"""%bgtask and %%bgtask in a real kernel."""

from __future__ import annotations

import json

import pytest

import nbbgtask as bg

pytestmark = pytest.mark.timeout(240)


def test_names_the_cell_assigns_come_back_at_a_safe_point(kernel, tmp_path):
    gate = tmp_path / "gate"
    kernel.ok(f"%load_ext nbbgtask\nbase = 10\ngate = {str(gate)!r}")
    out = kernel.run("""%%bgtask --name crunch
import os, time
for _ in range(3000):  # ends once the next cell lets it (at most 30 s)
    if os.path.exists(gate):
        break
    time.sleep(0.01)
total = sum(range(base))
pairs = [(i, i * i) for i in range(3)]
def helper(v):
    return v + total
""")
    assert out["status"] == "ok"
    assert "application/vnd.jupyter.widget-view+json" in out["data"][0]  # a live bar
    # The task ends during this cell, which then runs on for ten of the magic's looks for ended
    # cell tasks: nothing may change under the cell's feet.
    during = kernel.ok("""
import time, nbbgtask as bg
from nbbgtask.commands.magic import POLL
seen = ['total' in dir()]
open(gate, 'w').close()
ended = bg.find_last(name="crunch").wait(30)  # complete in the store
for look in range(10):
    seen.append('total' in dir())
    time.sleep(POLL)
seen.append('total' in dir())
print(ended, set(seen))
""")
    assert during.strip() == "True {False}"
    assert kernel.ok("print(total, pairs, helper(1))").strip() == "45 [(0, 0), (1, 1), (2, 4)] 46"
    assert kernel.ok("print(bg_names_ok := 'os' in dir())").strip() == "True"


def test_names_come_back_while_the_kernel_is_idle_and_unpicklable_ones_are_reported(kernel):
    kernel.ok("%load_ext nbbgtask")
    kernel.ok("""%%bgtask
import threading
count = 3
lock = threading.Lock()
""")
    late = kernel.drain_all(2.0)  # no cell runs meanwhile
    stderr = "".join(m["content"].get("text", "") for m in late if m["msg_type"] == "stream")
    assert "could not be copied back (not picklable): lock" in stderr
    assert kernel.ok("print(count, 'lock' in dir())").strip() == "3 False"


def test_focus_blocks_and_the_names_are_there_for_the_next_line(kernel):
    kernel.ok("%load_ext nbbgtask")
    out = kernel.run("""%%bgtask --focus
import time
time.sleep(1)
answer = 42
""")
    assert out["status"] == "ok"
    assert kernel.ok("print(answer)").strip() == "42"


def test_an_error_in_the_body_shows_a_traceback_pointing_at_the_cell(kernel):
    kernel.ok("%load_ext nbbgtask")
    out = kernel.run("""%%bgtask --focus
rows = [1, 2]
raise ValueError("bad row")
""")
    assert out["status"] == "error" and out["error"]["ename"] == "TaskFailed"
    text = "\n".join(out["error"]["traceback"])
    assert 'raise ValueError("bad row")' in text and "line 2" in text

    kernel.ok("""%%bgtask
x = 1
y = 1 / 0
""")
    kernel.drain_all(1.5)  # reported while the kernel is idle, under the cell that started it
    stderr = "".join(m["content"]["text"] for m in kernel.iopub if m["msg_type"] == "stream" and m["content"]["name"] == "stderr")
    assert "ZeroDivisionError" in stderr and "y = 1 / 0" in stderr


def test_line_forms(kernel, home):
    kernel.ok("%load_ext nbbgtask")
    usage = kernel.ok("%bgtask")
    assert "%bgtask list" in usage and "%%bgtask [--name NAME] [--focus]" in usage
    kernel.ok("""
import time, nbbgtask as bg
def chatty():
    print("hello from the task")
    return {"rows": 3}
done = bg.run(chatty, name="chatty")
done.wait(30)
slow = bg.run(time.sleep, 30, name="sleepy")
""")
    done_id, slow_id = kernel.ok("print(done.id, slow.id)").split()
    listing = kernel.ok("%bgtask list")
    assert listing.splitlines()[0].split() == ["id", "name", "state", "percent", "message", "elapsed"]
    assert done_id[:8] in listing and "sleepy" in listing and "running" in listing
    assert f"id:        {done_id}" in kernel.ok(f"%bgtask show {done_id[:6]}")
    assert kernel.ok(f"%bgtask logs {done_id[:6]} -n 1") == "hello from the task\n"
    result = kernel.run(f"%bgtask result {done_id[:6]}")
    assert result["data"] == [{"text/plain": "{'rows': 3}"}]
    assert kernel.ok(f"%bgtask wait {done_id[:6]} --timeout 5").strip() == f"{done_id[:8]} complete"
    assert kernel.ok(f"%bgtask wait {slow_id[:6]} --timeout 0.2").strip() == f"{slow_id[:8]} still running"
    assert kernel.ok(f"%bgtask cancel {slow_id[:6]}").strip() == f"{slow_id[:8]} cancelled"
    monitor = kernel.run("%bgtask monitor")
    assert "application/vnd.jupyter.widget-view+json" in monitor["data"][0]
    assert kernel.ok("%bgtask prune --keep 1").strip() == "forgot 1 finished tasks"


def test_unknown_and_ambiguous_ids_get_one_line(kernel, home):
    kernel.ok("%load_ext nbbgtask")
    unknown = kernel.run("%bgtask show zzzz")
    assert unknown["stderr"] == "UsageError: no task id starts with 'zzzz' (see the list of tasks)\n"
    statuses = [bg.run(lambda: None) for _ in range(40)]  # 40 ids: some share a first hex digit
    firsts = [s.id[0] for s in statuses]
    shared = next(c for c in firsts if firsts.count(c) > 1)
    ambiguous = kernel.run(f"%bgtask show {shared}")["stderr"]
    assert ambiguous.startswith(f"UsageError: '{shared}' matches") and ambiguous.endswith("give more of the id\n")
    assert ambiguous.count("\n") == 1
    bad = kernel.run(f"%bgtask logs {statuses[0].id} -n many")["stderr"]
    assert bad == "UsageError: -n takes a whole number, got 'many'\n"


def test_stack_line_form(kernel, home, tmp_path):
    kernel.ok("%load_ext nbbgtask")
    marker = tmp_path / "blocked"
    kernel.ok(f"""
import time, nbbgtask as bg
def wait_for_the_network():
    open({str(marker)!r}, "w").close()
    time.sleep(60)
stuck = bg.run(wait_for_the_network)
quick = bg.run(int, "3")
quick.wait(30)
""")
    stuck_id, quick_id = kernel.ok("print(stuck.id, quick.id)").split()
    kernel.ok(f"import os, time\nwhile not os.path.exists({str(marker)!r}): time.sleep(0.02)", timeout=30)
    text = kernel.ok(f"%bgtask stack {stuck_id[:6]}")
    assert text.split("Current thread", 1)[1].splitlines()[1].endswith("in wait_for_the_network"), text
    ended = kernel.run(f"%bgtask stack {quick_id[:6]}")["stderr"]
    assert ended.startswith("UsageError: task 'int'") and "has ended (complete)" in ended and ended.count("\n") == 1
    kernel.ok(f"%bgtask cancel {stuck_id[:6]}")


def test_the_table_gives_each_line_form_the_clis_options_and_help(kernel, home):
    from test_cli import cli

    from nbbgtask.commands import table

    kernel.ok("%load_ext nbbgtask")
    usage = kernel.ok("%bgtask")
    for command in table.COMMANDS:
        if table.MAGIC not in command.forms:
            continue
        assert f"%bgtask {table.synopsis(command, table.MAGIC)}" in usage
        shown = " ".join(kernel.ok(f"%bgtask {command.name} --help").split())  # argparse wraps the lines
        assert shown.startswith(f"usage: %bgtask {command.name}") and command.help in shown
        for option in command.offered(table.MAGIC):
            assert option.flags[0] in shown and option.help in shown
        if table.CLI in command.forms:  # the same help on the command line, for the options both offer
            cli_help = " ".join(cli(home, command.name, "--help").stdout.split())
            assert command.help in cli_help
            assert all(o.help in cli_help for o in command.offered(table.MAGIC))


def test_the_same_bad_option_is_a_usage_error_in_the_magic_and_exit_2_in_the_cli(kernel, home):
    from test_cli import cli

    kernel.ok("%load_ext nbbgtask")
    done = bg.run(int, "3")
    done.wait(30)
    # The magic names the option; argparse on the command line says "argument -n/--lines: " first.
    for words, option, said in (
        (["logs", done.id, "-n", "many"], "-n", "takes a whole number, got 'many'"),
        (["list", "--since", "2x"], "--since", "takes a duration such as 90s, 30m, 2h or 1d, got '2x'"),
        (["list", "--limit", "-1"], "--limit", "takes a whole number, 0 or more, got '-1'"),
        (["list", "--all", "--limit", "3"], "--limit:", "not allowed with argument --all"),
        (["wait", done.id, "--timeout", "inf"], "--timeout", "takes a number of seconds from 0 to 1e+09, got 'inf'"),
    ):
        assert kernel.run("%bgtask " + " ".join(words))["stderr"] == f"UsageError: {option} {said}\n", words
        out = cli(home, *words)
        assert out.returncode == 2 and said in out.stderr.splitlines()[-1], (words, out.stderr)
    unknown = kernel.run("%bgtask list --bogus")["stderr"]
    assert unknown == "UsageError: unrecognized arguments: --bogus (see %bgtask list --help)\n"
    assert "unrecognized arguments: --bogus" in cli(home, "list", "--bogus").stderr


def test_list_line_form_pages_like_the_cli(kernel, home):
    from test_cli import _plant, _planted, _rows

    kernel.ok("%load_ext nbbgtask")
    _plant(home, _planted(30))
    listing = kernel.ok("%bgtask list")
    assert len(_rows(listing)) == 20 and listing.endswith("… 10 more: --limit N or --all\n")
    assert len(_rows(kernel.ok("%bgtask list --all"))) == 30
    assert len(_rows(kernel.ok("%bgtask list --since 1h --limit 25"))) == 25
    lines = kernel.ok("%bgtask list --json --limit 2").splitlines()
    assert [json.loads(line)["id"] for line in lines] == [s.id for s in bg.tasks(limit=2)]
