"""Finding tasks again: get, tasks, find_last, prune."""

from __future__ import annotations

import datetime as dt
import time

import pytest

import nbbgtask as bg


def _finished(*names, fail=()):
    out = []
    for name in names:
        status = bg.run((lambda: 1 / 0) if name in fail else (lambda name=name: name), name=name)
        status.wait(30)
        out.append(status)
        time.sleep(0.01)  # distinct creation times
    return out


def test_tasks_are_listed_newest_first_and_filtered(home):
    a, b, c = _finished("load", "train", "load", fail=("train",))
    running = bg.run(time.sleep, 5, name="load")
    assert [s.id for s in bg.tasks()] == [running.id, c.id, b.id, a.id]
    assert [s.id for s in bg.tasks(name="load")] == [running.id, c.id, a.id]
    assert [s.id for s in bg.tasks(state="failed")] == [b.id]
    assert [s.id for s in bg.tasks(state=bg.State.RUNNING)] == [running.id]
    assert [s.id for s in bg.tasks(state=["complete", "failed"], limit=2)] == [c.id, b.id]
    assert bg.tasks(limit=0) == []


def test_find_last_is_the_newest_match_or_none(home):
    a, b = _finished("load", "load")
    assert bg.find_last(name="load").id == b.id
    assert bg.find_last(state="complete", name="load").id == b.id
    assert bg.find_last(state="failed") is None
    assert bg.find_last(name="nothing") is None


def test_bad_filters_get_clear_errors(home):
    with pytest.raises(ValueError, match="unknown task state 'done'.*'complete'"):
        bg.tasks(state="done")
    with pytest.raises(ValueError, match="limit"):
        bg.tasks(limit=-1)


def test_get_returns_an_equal_handle(home):
    (a,) = _finished("x")
    again = bg.get(a.id)
    assert again == a and again.result() == "x" and hash(again) == hash(a)


def test_prune_forgets_finished_tasks_with_their_logs_and_results(home):
    # Results this big get a file of their own (small ones are kept in the record).
    old = []
    for k in "abc":  # one after another: prune keeps the last to finish
        old.append(bg.run(lambda k=k: k * 1000, name=k))
        old[-1].wait(30)
        time.sleep(0.01)
    assert all((home / "results" / f"{status.id}.pkl").exists() for status in old)
    running = bg.run(time.sleep, 5)
    assert bg.prune(keep=1) == 2
    assert [s.id for s in bg.tasks()] == [running.id, old[2].id]
    for status in old[:2]:
        with pytest.raises(bg.TaskNotFound):
            bg.get(status.id)
        assert not (home / "logs" / f"{status.id}.log").exists()
        assert not (home / "results" / f"{status.id}.pkl").exists()
    assert bg.get(old[2].id).result() == "c" * 1000
    assert bg.prune() == 1
    assert [s.id for s in bg.tasks()] == [running.id]


def test_prune_removes_every_file_a_pruned_task_left_and_no_other(home, tmp_path):
    # Each folder is listed once and its files matched by their names' first part: a task's log,
    # outputs, result and the temp and stack files a killed task leaves go, a kept one's stay.
    gone, kept = _finished("gone", "kept")
    running = bg.run(time.sleep, 5)
    outside = tmp_path / "not-in-the-home.txt"
    outside.write_text("stays")
    left = {
        "outputs": [f"{gone.id}.jsonl", f"{kept.id}.jsonl"],
        "results": [f"{gone.id}.pkl", f"{gone.id}.1234.5678.tmp", f"{kept.id}.pkl", f"{gone.id}x.pkl"],
        "stacks": [f"{gone.id}.4242.1700000000.000.txt", f"{gone.id}.4242.1700000000.000.txt.tmp"],
    }
    for folder, names in left.items():
        for name in names:
            (home / folder / name).write_bytes(b"x")
    (home / "logs" / f"{gone.id}.link").symlink_to(outside)  # a link goes, never what it names
    assert (home / "logs" / f"{gone.id}.log").exists() and (home / "logs" / f"{kept.id}.log").exists()
    assert bg.prune(keep=1) == 1
    assert sorted(p.name for p in (home / "logs").iterdir()) == sorted([f"{kept.id}.log", f"{running.id}.log"])
    assert sorted(p.name for p in (home / "outputs").iterdir()) == [f"{kept.id}.jsonl"]
    assert sorted(p.name for p in (home / "results").iterdir()) == sorted([f"{kept.id}.pkl", f"{gone.id}x.pkl"])
    assert all(p.name.startswith(f"{running.id}.") for p in (home / "stacks").iterdir())
    assert outside.read_text() == "stays"
    assert bg.get(kept.id).result() == "kept"


def test_prune_older_than_keeps_recent_tasks(home):
    _finished("a")
    assert bg.prune(older_than=dt.timedelta(hours=1)) == 0
    assert bg.prune(older_than=0) == 1
    with pytest.raises(ValueError, match="keep"):
        bg.prune(keep=-1)
    with pytest.raises(ValueError, match="older_than"):
        bg.prune(older_than="yesterday")
