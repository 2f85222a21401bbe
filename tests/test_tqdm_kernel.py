"""tqdm.auto in a task started from a real kernel: in the kernel it is tqdm.notebook's widget bar;
in the task (whose kernel connection is silenced) it draws text, as in a terminal, and reports to
the task's status, forked (tqdm.auto inherited) or spawned (tqdm.notebook imported afresh); the log keeps a line per state worth keeping, not a redraw per 0.1 s."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.timeout(240)

CELL = """
import json, time, nbbgtask as bg
from tqdm.auto import tqdm
in_kernel = tqdm.__mro__[1].__module__     # tqdm.notebook: widgets in the kernel

def train(steps):
    for _ in tqdm(range(steps), desc="training"):
        time.sleep(0.05)
    return steps

def imported_in_the_task(steps):
    from tqdm.notebook import trange       # spawned: first imported in the task's process
    for _ in trange(steps, desc="tuning", display=False):
        time.sleep(0.01)
    return steps

def watch(status):
    seen = []
    while not status.done():
        seen.append((status.percent, status.message))
        time.sleep(0.05)
    return {"seen": seen, "result": status.result(), "percent": status.percent, "message": status.message,
            "log": status.log()}

train_run = watch(bg.run(train, 60))
bg.configure(start_method="spawn")
print(json.dumps({"in_kernel": in_kernel, "train": train_run, "tuning": watch(bg.run(imported_in_the_task, 40))}))
"""


def _has_tqdm(kernel):
    return kernel.ok("import importlib.util; print(importlib.util.find_spec('tqdm') is not None)").strip() == "True"


def test_tqdm_auto_in_a_task_from_a_kernel_draws_text_and_reports(kernel):
    if not _has_tqdm(kernel):
        pytest.skip("tqdm is not installed in this kernel's environment")
    out = json.loads(kernel.ok(CELL, timeout=120))
    assert out["in_kernel"] == "tqdm.notebook"
    train, tuning = out["train"], out["tuning"]
    assert train["result"] == 60 and train["percent"] == 100.0
    assert train["message"].startswith("training: 60/60 [")
    running = [(p, m) for p, m in train["seen"] if 0 < p < 100]
    assert running and all(m.startswith("training: ") for _, m in running)
    for task in (train, tuning):
        log = task["log"]
        assert "\r" not in log and "\x1b" not in log
        assert "tried to send a message to the notebook" not in log  # no widget was made
        assert "HBox" not in log and "<bar/>" not in log
    assert train["log"].startswith("nbbgtask: started by fork (")  # nbbgtask's note, then the bar's lines
    assert [line.split("|")[0] for line in train["log"].splitlines()[1:]] == ["training:   0%", "training: 100%"]
    assert train["log"].splitlines()[-1].endswith("it/s]")
    assert tuning["result"] == 40 and tuning["message"].startswith("tuning: 40/40 [")
    assert [line.split("|")[0] for line in tuning["log"].splitlines()[1:]] == ["tuning:   0%", "tuning: 100%"]
