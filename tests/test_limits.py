"""Limits (API.md: Limits) and what a task costs (`TaskStatus.resources`): parsing, the memory
cap in a real kernel, the OOM score, CPU and memory figures, the figures in the bar, the monitor
and the command line.  The timeout on every way a task runs is in tests/test_contract.py."""

from __future__ import annotations

import math
import os
import time

import psutil
import pytest
from waiting import until

import nbbgtask as bg
from nbbgtask.commands.cli import main as cli
from nbbgtask.core import format as _format
from nbbgtask.core import limits as _limits


@pytest.mark.parametrize(
    ("value", "expected"),
    [("300 MiB", 300 << 20), ("4 GiB", 4 << 30), ("1.5GB", 1_500_000_000), (1024, 1024), ("2k", 2048), (None, None)],
)
def test_memory_sizes_are_read_with_their_units(value, expected):
    assert bg.Limits(memory=value).memory == expected


@pytest.mark.parametrize("value", ["4 parsecs", -1, 0, math.nan, math.inf, "", "MiB", True, [1]])
def test_invalid_memory_is_refused_naming_the_value(value):
    with pytest.raises(ValueError, match="memory must be") as info:
        bg.Limits(memory=value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("value", [-1, 0, math.nan, math.inf, "10", True])
def test_invalid_timeout_is_refused_naming_the_value(value):
    with pytest.raises(ValueError, match="timeout must be") as info:
        bg.Limits(timeout=value)
    assert repr(value) in str(info.value)


def test_limits_must_be_a_limits_everywhere(home):
    with pytest.raises(TypeError, match="bg.Limits"):
        bg.run(print, limits={"timeout": 1})
    with pytest.raises(TypeError, match="bg.Limits"):
        bg.configure(limits=3)


class Sleepy(bg.BackgroundTask):
    limits = bg.Limits(timeout=1)

    def execute(self, status):
        time.sleep(30)


def test_a_class_attribute_and_the_configured_default_apply(home):
    bg.configure(start_method="fork", cancel_grace=1.0)
    status = Sleepy.initiate()
    assert status.wait(10) and "timed out after 1 s" in status.error
    # initiate(limits=...) wins over the class's
    status = Sleepy.initiate(limits=bg.Limits(timeout=2))
    assert status.wait(10) and "timed out after 2 s" in status.error
    bg.configure(limits=bg.Limits(timeout=1.5))
    try:
        status = bg.run(time.sleep, 30)
        assert status.wait(10) and "timed out after 1.5 s" in status.error
        # an empty Limits() is "no limits" for this task, whatever the default
        status = bg.run(time.sleep, 2, limits=bg.Limits())
        assert status.result(10) is None and status.state == "complete"
    finally:
        bg.configure(limits=bg.Limits())


def _oom_score_adj(pid):
    with open(f"/proc/{pid}/oom_score_adj") as f:
        return int(f.read())


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_a_task_is_the_oom_killers_first_choice_not_the_kernel(home, method):
    bg.configure(start_method=method)
    status = bg.run(time.sleep, 30)
    assert until(lambda: status.refresh().pid is not None, timeout=10)
    try:
        assert _oom_score_adj(status.pid) == 1000 > _oom_score_adj(os.getpid())
    finally:
        status.cancel()


def _busy(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_resources_of_a_task_busy_on_one_core(home):
    bg.configure(start_method="fork")
    status = bg.run(_busy, 20)
    assert until(lambda: status.refresh().pid is not None, timeout=10)
    try:
        time.sleep(0.5)
        proc = psutil.Process(status.pid)
        assert status.resources() is not None  # the reading the next one's CPU % starts from
        proc.cpu_percent()
        time.sleep(1.0)
        figures = status.resources()
        theirs = proc.cpu_percent()  # psutil's own, over the same second
        own = proc.memory_info().rss
        assert figures is not None
        # On an idle machine 50-150 %; on these shared ones the task may get less of a core,
        # so it is also held to psutil's own reading of the same second.
        assert abs(figures["cpu_percent"] - theirs) <= 15, (figures, theirs)
        assert 50 <= figures["cpu_percent"] <= 150 or theirs < 60, (figures, theirs)
        assert abs(figures["rss"] - own) <= 0.2 * own, (figures, own)
        assert 0 < figures["uss"] <= figures["rss"]
        # the same, compact, in the command line's list and show
        assert _limits.compact(figures).startswith("CPU ")
    finally:
        status.cancel()
    assert status.resources() is None  # ended


def test_list_and_show_tell_a_running_tasks_costs_and_a_finished_ones_peak(home, capsys):
    bg.configure(start_method="fork")
    status = bg.run(_busy, 20)
    assert until(lambda: status.refresh().pid is not None, timeout=10)
    try:
        assert cli(["--home", str(home), "list"]) == 0
        assert "CPU" in capsys.readouterr().out
        assert cli(["--home", str(home), "show", status.id]) == 0
        assert "resources: CPU" in capsys.readouterr().out
    finally:
        status.cancel()

    def grows():
        block = bytearray(64 << 20)
        block[:] = b"x" * len(block)
        time.sleep(1.5)  # the peak is sampled each second
        return len(block)

    done = bg.run(grows)
    assert done.result(30) == 64 << 20
    assert done.peak_memory is not None and done.peak_memory >= 64 << 20
    assert cli(["--home", str(home), "show", done.id]) == 0
    assert "peak memory: " in capsys.readouterr().out
    assert "peak memory" in _format.details(done.to_dict())


MEMORY_CELL = """
import nbbgtask as bg, time
bg.configure(start_method={method!r}, cancel_grace=2.0)
def hog():
    block = bytearray(1 << 30)
    block[:] = b"x" * len(block)
    return len(block)
status = bg.run(hog, limits=bg.Limits(memory="300 MiB"))
status.wait(60)
print(status.state, "|", status.error)
"""


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_task_past_its_memory_limit_fails_naming_it_and_the_kernel_lives(kernel, method):
    out = kernel.ok(MEMORY_CELL.format(method=method), timeout=90).strip()
    state, error = out.split(" | ")
    assert state == "failed", out
    assert "MemoryLimitExceeded" in error and "300 MiB" in error, out
    assert kernel.ok("print(6 * 7)").strip() == "42"
