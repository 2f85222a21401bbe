"""Writes tour.ipynb, the notebook that tests/test_browser.py opens in JupyterLab.

Run it after changing the cells below:  .venv/bin/python tests/browser/make_tour.py
The notebook is stored without outputs; the browser test runs it.
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


def build() -> nbformat.NotebookNode:
    nb = new_notebook(cells=CELLS)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"tour-{i}"  # stable ids: the file does not change when it is rewritten
    nbformat.validate(nb)
    return nb


if __name__ == "__main__":
    nbformat.write(build(), HERE / "tour.ipynb")
    print("wrote", HERE / "tour.ipynb")
