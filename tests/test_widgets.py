"""The widgets' own behaviour, without a front end: what their traits say as tasks move."""

from __future__ import annotations

import time

import pytest
from waiting import until

import nbbgtask as bg


def _steps(n=10, pause=0.05):
    for _ in bg.track(range(n), message="working"):
        time.sleep(pause)
    return n


def test_without_a_kernel_a_status_displays_as_text_and_html(home):
    status = bg.run(_steps)
    status.wait(30)
    bundle = status._repr_mimebundle_()
    assert set(bundle) == {"text/plain", "text/html"}
    assert "_steps" in bundle["text/plain"] and "100%" in bundle["text/plain"]
    assert "complete after" in bundle["text/html"] and "width:100.0%" in bundle["text/html"]


def test_the_bar_settles_green_at_100(home):
    status = bg.run(_steps)
    bar = bg.ProgressBar(status)
    assert until(lambda: bar._bar.bar_style == "success")
    assert bar._bar.value == 100.0
    assert "complete after" in bar._text.value


def test_a_failed_bar_stays_red_with_its_error(home):
    def breaks():
        bg.progress(60, "nearly")
        raise RuntimeError("disk on fire")

    bar = bg.ProgressBar(bg.run(breaks))
    assert until(lambda: bar._bar.bar_style == "danger")
    assert "RuntimeError: disk on fire" in bar._text.value
    time.sleep(0.3)
    assert bar._bar.bar_style == "danger" and bar._bar.value == 60.0


def test_elapsed_and_eta_are_shown_while_running(home):
    bar = bg.ProgressBar(bg.run(_steps, 40, 0.05))
    assert until(lambda: "ETA" in bar._text.value)
    assert "elapsed" in bar._text.value


def test_last_running_picks_up_the_next_running_task(home):
    long = bg.run(_steps, 40, 0.05, name="long")
    time.sleep(0.05)
    short = bg.run(_steps, 5, 0.05, name="short")
    bar = bg.ProgressBar.last_running()
    assert bar.task_id == short.id
    assert until(lambda: bar.task_id == long.id)
    long.wait(30)
    assert until(lambda: bar._bar.bar_style == "success")


def test_last_running_waits_when_nothing_runs(home):
    bar = bg.ProgressBar.last_running(name="later")
    assert "waiting for a task named 'later'" in bar._text.value
    status = bg.run(_steps, 20, 0.05, name="later")
    assert until(lambda: bar.task_id == status.id)


def test_progress_bar_refuses_what_it_cannot_follow(home):
    with pytest.raises(TypeError, match="TaskStatus"):
        bg.ProgressBar(42)
    with pytest.raises(bg.TaskNotFound):
        bg.ProgressBar("no-such-id")


def test_monitor_shows_running_and_recent_finished_tasks(home):
    done = bg.run(_steps, 1, 0)
    done.wait(30)
    running = bg.run(_steps, 100, 0.05, name="busy")
    m = bg.monitor(finished=5)
    assert until(lambda: running.id in m._rows and done.id in m._rows)
    assert "1 running" in m._header.value
    m._rows[running.id].cancel.click()
    assert until(lambda: running.refresh().state == "cancelled")
    assert until(lambda: "cancelled" in m._rows[running.id].state.value)


def test_full_focus_outside_a_front_end_returns_the_result(home):
    calls = []
    assert bg.full_focus(bg.run(lambda: 7), acceptable_wait=5, on_complete=calls.append) == 7
    assert len(calls) == 1 and calls[0].state == "complete"
    with pytest.raises(ValueError, match="acceptable_wait"):
        bg.full_focus(bg.run(lambda: 7), acceptable_wait=-1)
    with pytest.raises(TypeError, match="holding"):
        bg.full_focus(bg.run(lambda: 7), holding=object())


def test_monitor_shows_at_most_max_rows_and_counts_the_rest(home):
    statuses = [bg.run(_steps, 100, 0.05, name=f"job{i}") for i in range(6)]
    m = bg.monitor(max_rows=4)
    assert len(m._rows) == 4  # made at once, in the cell that shows it
    assert [r.task_id for r in m._rows.values()] == [s.id for s in reversed(statuses)][:4]
    assert "+2 more not shown" in m._footer.value and m.children[-1] is m._footer
    with pytest.raises(ValueError, match="max_rows"):
        bg.monitor(max_rows=-1)
