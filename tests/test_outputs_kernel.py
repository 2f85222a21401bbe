"""Output under the bar, in a real kernel: what a background task prints and displays, and a
%%bgtask cell's last value, reach the notebook's iopub traffic (an ipywidgets Output under the
bar) within a second of being produced, and come back when the task is shown again."""

from __future__ import annotations

import base64
import json

import pytest
from widget_traffic import Models

pytestmark = pytest.mark.timeout(240)

#: the longest a print, a display or a cell's value may take to reach the notebook
LATENCY = 1.0


def _output_updates(kernel):
    """(time the kernel sent it, outputs) for every state of every Output widget, in order."""
    models = Models(kernel.iopub)
    found = []
    for model_id in models.of("OutputModel"):
        for msg, state in models.history[model_id]:
            if "outputs" in state:
                found.append((msg["header"]["date"].timestamp(), state["outputs"], model_id))
    return found


def _first_seen(updates, predicate):
    for sent, outputs, _ in updates:
        if any(predicate(o) for o in outputs):
            return sent
    return None


def _text(outputs):
    return "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream")


def _records(kernel, task_id):
    out = kernel.ok(f"from nbbgtask.core import config as _config; from nbbgtask.store import outputs as _o; print(__import__('json').dumps(_o.read_records(_config.home(), {task_id!r})))")
    return json.loads(out)


CELL = """%%bgtask --name demo
from IPython.display import HTML
for i in range(3):
    print('step', i, repr(time.time()))
    time.sleep(0.4)
display(HTML('<b>shown</b>'))
time.sleep(0.4)
x = 41 + 1
x
"""


def test_a_bgtask_cell_shows_its_prints_displays_and_last_value_under_its_bar(kernel):
    kernel.ok("%load_ext nbbgtask\nimport time, nbbgtask as bg")
    out = kernel.run(CELL)
    assert out["status"] == "ok"
    task_id = kernel.ok("print(bg.find_last(name='demo').id)").strip()
    assert kernel.ok(f"print(bg.get({task_id!r}).wait(30))").strip() == "True"
    kernel.drain_all(2.0)
    assert kernel.ok("print(x)").strip() == "42"
    updates = _output_updates(kernel)
    assert updates, "no output area under the bar"
    final = updates[-1][1]
    text = _text(final)
    assert [line.split()[:2] for line in text.splitlines()] == [["step", "0"], ["step", "1"], ["step", "2"]]
    assert "nbbgtask: started by" not in text
    for line in text.splitlines():  # each printed line, within a second of its print
        printed = float(line.split()[2])
        seen = _first_seen(updates, lambda o, line=line: o["output_type"] == "stream" and line in o["text"])
        assert seen is not None and seen - printed < LATENCY, (line, seen - printed if seen else None)
    records = {r["kind"]: r for r in _records(kernel, task_id)}
    html = _first_seen(updates, lambda o: o.get("data", {}).get("text/html") == "<b>shown</b>")
    assert html is not None and html - records["display"]["time"] < LATENCY
    value = _first_seen(updates, lambda o: o["output_type"] == "execute_result" and o["data"]["text/plain"] == "42")
    assert value is not None and value - records["result"]["time"] < LATENCY
    kinds = [o["output_type"] for o in final]
    assert kinds == ["stream", "display_data", "execute_result"], kinds


def test_a_cell_ending_with_a_semicolon_shows_no_value(kernel):
    kernel.ok("%load_ext nbbgtask\nimport nbbgtask as bg")
    kernel.run("%%bgtask --name quiet\ny = 7\ny;")
    task_id = kernel.ok("print(bg.find_last(name='quiet').id)").strip()
    assert kernel.ok(f"print(bg.get({task_id!r}).wait(30))").strip() == "True"
    assert _records(kernel, task_id) == []


def test_a_run_tasks_display_reaches_the_notebook_and_a_figure_arrives_as_png(kernel):
    kernel.ok("""
import time, nbbgtask as bg
from IPython.display import HTML, display
def plots():
    time.sleep(0.5)
    display(HTML('<i>from the task</i>'))
    import matplotlib.pyplot as plt
    plt.plot([1, 4, 9])
    time.sleep(0.5)
    plt.show()
    time.sleep(0.5)
    return 1
""")
    out = kernel.run("status = bg.run(plots); status")
    assert "application/vnd.jupyter.widget-view+json" in out["data"][0]
    assert kernel.ok("print(status.wait(30), status.state)").strip() == "True complete"
    kernel.drain_all(1.5)
    task_id = kernel.ok("print(status.id)").strip()
    records = _records(kernel, task_id)
    updates = _output_updates(kernel)
    html = _first_seen(updates, lambda o: o.get("data", {}).get("text/html") == "<i>from the task</i>")
    png = _first_seen(updates, lambda o: "image/png" in o.get("data", {}))
    assert html is not None and html - records[0]["time"] < LATENCY
    assert png is not None and png - records[1]["time"] < LATENCY
    (image,) = [o["data"]["image/png"] for o in updates[-1][1] if "image/png" in o.get("data", {})]
    assert base64.b64decode(image).startswith(b"\x89PNG\r\n\x1a\n")


def test_a_finished_task_shown_again_in_a_new_kernel_shows_its_outputs_again(kernel):
    kernel.ok("%load_ext nbbgtask\nimport nbbgtask as bg")
    kernel.run("%%bgtask --name again\nprint('printed once')\nfrom IPython.display import Markdown\ndisplay(Markdown('*marked*'))\n6 * 7")
    task_id = kernel.ok("print(bg.find_last(name='again').id)").strip()
    assert kernel.ok(f"print(bg.get({task_id!r}).wait(30))").strip() == "True"
    kernel.restart()
    kernel.iopub.clear()
    out = kernel.run(f"import nbbgtask as bg; bg.get({task_id!r})")
    assert out["status"] == "ok"
    updates = _output_updates(kernel)
    assert len({model for _, _, model in updates}) == 1
    outputs = updates[-1][1]
    assert _text(outputs) == "printed once\n"
    assert [o["data"].get("text/markdown") for o in outputs if o["output_type"] == "display_data"] == ["*marked*"]
    assert [o["data"]["text/plain"] for o in outputs if o["output_type"] == "execute_result"] == ["42"]
