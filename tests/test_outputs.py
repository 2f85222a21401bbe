"""What a task displays is kept with it, in every way a task runs: display(), a figure, an object
whose display fails; read back as the bar reads it (`_output_tail.Tail`) and by ``nbbgtask show``.
The widget that shows them under a bar is tested in a real kernel (tests/test_outputs_kernel.py)."""

from __future__ import annotations

import base64
import json
import os
import sys

import cloudpickle
import pytest
from IPython.display import HTML, display

import nbbgtask as bg
from nbbgtask.store import outputs as _stored_outputs
from nbbgtask.store import tail as _output_tail

cloudpickle.register_pickle_by_value(sys.modules[__name__])

PNG = b"\x89PNG\r\n\x1a\n"


class Unshowable:
    """An object whose every display raises."""

    def __repr__(self):
        raise ValueError("no repr today")

    def _repr_html_(self):
        raise RuntimeError("no html either")


class HalfShowable:
    def __repr__(self):
        return "HalfShowable()"

    def _repr_html_(self):
        raise RuntimeError("the html broke")


def _shows_things():
    print("before", flush=True)
    display(HTML("<b>bold</b>"))
    print("between", flush=True)
    display(Unshowable())
    display(HalfShowable())
    import matplotlib.pyplot as plt

    plt.plot([1, 3, 2])
    plt.show()
    plt.figure()
    plt.plot([2, 1])  # left open: shown at the end, as in a cell
    print("after", flush=True)
    return "done"


def _records(status):
    return _stored_outputs.read_records(status.home, status.id)


def test_a_tasks_displays_are_kept_in_order_among_its_prints(way):
    status = bg.run(_shows_things)
    assert status.result(timeout=120) == "done"
    records = _records(status)
    kinds = [sorted(r["data"]) for r in records]
    assert kinds == [
        ["text/html", "text/plain"],
        ["text/plain"],
        ["text/plain"],
        ["image/png", "text/plain"],
        ["image/png", "text/plain"],
    ], kinds
    assert records[0]["data"]["text/html"] == "<b>bold</b>"
    unshowable, half = records[1]["data"]["text/plain"], records[2]["data"]["text/plain"]
    assert unshowable.startswith("<") and "Unshowable object at" in unshowable
    assert "[nbbgtask: it could not be displayed" in unshowable and "no html either" in unshowable
    assert half.startswith("HalfShowable()\n[nbbgtask: it could not be displayed (_repr_html_: RuntimeError: the html broke)")
    for record in records[3:]:
        assert base64.b64decode(record["data"]["image/png"]).startswith(PNG)
    outputs = _output_tail.Tail(status.home, status.id, status.id[:8])
    assert outputs.read()
    shown = [(o["output_type"], o.get("text") or sorted(o["data"])) for o in outputs.outputs()]
    if way.name == "dask":
        # On a worker the printed output and the outputs come by two pipes: an output comes after
        # everything printed before it, and maybe after some that was printed just after it.
        assert shown[0][0] == "stream" and shown[0][1].startswith("before\n")
        assert shown[1] == ("display_data", ["text/html", "text/plain"])
    else:
        assert shown[0] == ("stream", "before\n")
        assert shown[1] == ("display_data", ["text/html", "text/plain"])
        assert shown[2][0] == "stream" and shown[2][1].startswith("between\n")
    assert [s for s in shown if s[0] == "display_data"][-2:] == [("display_data", ["image/png", "text/plain"])] * 2
    assert "after\n" in "".join(s[1] for s in shown if s[0] == "stream")
    assert "nbbgtask: started by" not in json.dumps(shown)


def test_the_outputs_file_is_the_owners_only(home):
    status = bg.run(_shows_things)
    status.result(timeout=60)
    path = home / "outputs" / f"{status.id}.jsonl"
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"


def test_nbbgtask_show_prints_the_text_of_what_a_task_displayed(home):
    from test_cli import cli

    status = bg.run(_shows_things)
    status.result(timeout=60)
    out = cli(home, "show", status.id[:8])
    assert out.returncode == 0, out.stderr
    text = out.stdout.split("outputs:\n", 1)[1]
    assert text.splitlines()[0] == "  <IPython.core.display.HTML object>"
    assert "  HalfShowable()\n  [nbbgtask: it could not be displayed" in text
    assert text.count("<Figure size") == 2
    assert "<b>bold</b>" not in text and "iVBOR" not in text  # text parts only


def _escapes():
    display({"text/plain": "\x1b[31mred\x1b[0m\x07"}, raw=True)


def test_nbbgtask_show_does_not_pass_a_tasks_escape_sequences_to_the_terminal(home):
    from test_cli import cli

    status = bg.run(_escapes)
    status.wait(60)
    out = cli(home, "show", status.id)
    assert "\x1b" not in out.stdout and "\x07" not in out.stdout
    assert "\\x1b[31mred\\x1b[0m\\x07" in out.stdout


def _floods(n):
    for i in range(n):
        print("line", i)


def test_the_tail_under_a_bar_is_bounded_and_says_what_it_left_out(home):
    status = bg.run(_floods, 5000)
    status.wait(60)
    tail = _output_tail.Tail(status.home, status.id, status.id[:8])
    tail.read()
    shown = tail.outputs()
    note, text = shown[0]["text"], "".join(o["text"] for o in shown[1:])
    assert note.startswith("… ") and f"nbbgtask logs {status.id[:8]}" in note and "status.log()" in note
    lines = text.splitlines()
    assert len(lines) == _output_tail.TAIL_LINES and lines[-1] == "line 4999"
    assert len(text.encode()) <= _output_tail.TAIL_BYTES


def test_a_reader_skips_lines_that_are_not_outputs_and_never_unpickles(home, tmp_path):
    import pickle

    (home / "outputs").mkdir(exist_ok=True)
    task_id = "0123" * 8
    path = home / "outputs" / f"{task_id}.jsonl"
    canary = tmp_path / "unpickled"
    evil = pickle.dumps(Exploit(str(canary)))
    good = {"kind": "display", "data": {"text/plain": "fine"}, "metadata": {}, "offset": None}
    path.write_bytes(evil + b"\n[1, 2]\n" + json.dumps({"kind": "shell"}).encode() + b"\n" + json.dumps(good).encode() + b"\n{\"kind\"")
    assert _stored_outputs.text_parts(_stored_outputs.read_records(home, task_id)) == ["fine"]
    assert not canary.exists()


class Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _updates():
    handle = display(HTML("<i>0</i>"), display_id=True)
    for i in range(1, 4):
        handle.update(HTML(f"<i>{i}</i>"))
    from IPython.display import clear_output

    display("gone soon")
    clear_output()
    display("kept")


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_display_handles_update_in_place_and_clear_output_clears(home, method):
    bg.configure(start_method=method)
    status = bg.run(_updates)
    status.wait(60)
    assert status.state == "complete", status.error
    assert _stored_outputs.text_parts(_records(status)) == ["'kept'"]
    tail = _output_tail.Tail(status.home, status.id, status.id[:8])
    tail.read()
    assert [o["data"]["text/plain"] for o in tail.outputs()] == ["'kept'"]
    records = _records(status)
    updated = [r for r in records if r.get("update")]
    assert [r["data"]["text/html"] for r in updated] == ["<i>1</i>", "<i>2</i>", "<i>3</i>"]


def _prints_for(seconds):
    import time

    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        print("line", n, flush=True)
        n += 1
        time.sleep(0.005)
    return n


def test_the_area_under_a_bar_follows_a_flood_of_prints_at_its_own_pace(home):
    """Each update of an output area sends its whole tail: while a task prints without pause it
    is updated at most every OUTPUT_EVERY, however often it is looked at; its end shows all."""
    from nbbgtask.notebook import output_area as _output_area
    status = bg.run(_prints_for, 1.5)
    area = _output_area.OutputArea(status)  # a widget without a front end: outputs are set all the same
    area.close()  # follows nothing by itself: this test looks at it
    updates, last = 0, area.outputs
    import time

    began = time.monotonic()
    while not status.done():
        area._nbbg_poll()
        if area.outputs != last:
            updates, last = updates + 1, area.outputs
        time.sleep(0.01)
    spent = time.monotonic() - began
    assert 2 <= updates <= spent / _output_area.OUTPUT_EVERY + 2  # looked at 100 times a second
    area._nbbg_poll(final=True)
    text = "".join(o.get("text", "") for o in area.outputs)
    assert text.rstrip().endswith(f"line {status.result() - 1}")
