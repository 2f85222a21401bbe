"""The widgets of a notebook: the refresher (one thread per kernel that brings every widget up to
date), the bar and the output area under it, the monitor, the full-focus cell, and the
workarounds for each ipykernel line.

May import: ``api``, ``backends``, ``task``, ``store``, ``core``, and ipywidgets.
"""
