"""The public functions (`run`, `BackgroundTask`, lookups, `configure`) and `TaskStatus`, the handle
they return.  A status displays as a bar through `nbbgtask.core.display`, a name the package sets, so
this layer never imports the notebook's.

May import: ``backends`` (the seam), ``task``, ``store``, ``core``; never a backend directly.
"""
