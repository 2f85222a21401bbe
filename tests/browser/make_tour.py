"""Writes the notebooks that tests/test_browser.py opens in the browser.

tour.ipynb: the tour, in JupyterLab.  focus_cancel.ipynb: a Cancel click in a blocked focus cell
with the next cell queued behind it, in JupyterLab and in Notebook 7.  magic_output.ipynb: a
%%bgtask cell that prints and plots, its output under its bar (JupyterLab).

Run it after changing the cells below:  .venv/bin/python tests/browser/make_tour.py
The notebooks are stored without outputs; the browser test runs them.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

CELLS = [
    new_markdown_cell("# nbbgtask in JupyterLab\n\nA live bar, a full-focus cell, and the task monitor."),
    new_code_cell(
        "import time\n"
        "import nbbgtask as bg\n"
        "\n"
        "def reticulate_splines(n=40):\n"
        '    for i in bg.track(range(n), message="reticulating"):\n'
        "        time.sleep(0.4)\n"
        "    return n\n"
        "\n"
        "splines = bg.run(reticulate_splines)\n"
        "splines"
    ),
    new_code_cell(
        "def process_payment(steps=40):\n"
        '    for i in bg.track(range(steps), message="talking to the bank"):\n'
        "        time.sleep(0.1)\n"
        '    return "paid"\n'
        "\n"
        'result = bg.full_focus(bg.run(process_payment), acceptable_wait=0.2, holding="<b>Payment processing…</b>")'
    ),
    new_code_cell('print("resumed with", result)'),
    new_code_cell("bg.monitor()"),
]

#: Issue 16: the click on Cancel must reach the blocked cell while the next cell waits behind it.
FOCUS_CANCEL_CELLS = [
    new_markdown_cell("# Cancel in a blocked focus cell\n\nRun All, then click Cancel while the focus cell holds."),
    new_code_cell(
        "import time\n"
        "import nbbgtask as bg\n"
        "\n"
        "def slow(n):\n"
        '    for i in bg.track(range(n), message="working"):\n'
        "        time.sleep(0.25)\n"
        "    return n\n"
        "\n"
        "status = bg.run(slow, 400)  # 100 s: far longer than the test waits for the Cancel to work\n"
        'print("task id:", status.id)'
    ),
    # The cell ends in bg.TaskCancelled; "raises-exception" (JupyterLab's and Notebook 7's own
    # tag) asks the kernel not to abort the queued cells after it, so the next cell runs on.
    new_code_cell(
        'bg.full_focus(status, acceptable_wait=0.2, holding="Cancel me")',
        metadata={"tags": ["raises-exception"]},
    ),
    new_code_cell('print("next cell ran; the task is", status.state.value)'),
]

#: Issue 17: what a %%bgtask cell prints and plots appears under its bar.
MAGIC_OUTPUT_CELLS = [
    new_markdown_cell("# Output under the bar\n\nA background cell that prints and plots."),
    new_code_cell("%load_ext nbbgtask"),
    new_code_cell(
        "%%bgtask --name plotting\n"
        "import time\n"
        "import matplotlib.pyplot as plt\n"
        "for i in range(5):\n"
        '    print("step", i)\n'
        "    time.sleep(0.3)\n"
        "plt.plot([i * i for i in range(10)])\n"
        'plt.title("squares, from a background cell")\n'
        "plt.show()\n"
        "total = sum(range(10))\n"
        "total"
    ),
]


def _notebook(cells: list[nbformat.NotebookNode], prefix: str) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{prefix}-{i}"  # stable ids: the file does not change when it is rewritten
    nbformat.validate(nb)
    return nb


def build() -> nbformat.NotebookNode:
    return _notebook(CELLS, "tour")


def build_focus_cancel() -> nbformat.NotebookNode:
    return _notebook(FOCUS_CANCEL_CELLS, "focus-cancel")


#: file name -> what it holds
def build_magic_output() -> nbformat.NotebookNode:
    return _notebook(MAGIC_OUTPUT_CELLS, "magic-output")


NOTEBOOKS = {"tour.ipynb": build, "focus_cancel.ipynb": build_focus_cancel, "magic_output.ipynb": build_magic_output}


if __name__ == "__main__":
    for name, make in NOTEBOOKS.items():
        nbformat.write(make(), HERE / name)
        print("wrote", HERE / name)
