"""What runs inside a task's own process: the runner around the task's code, its progress reporter,
limits enforcement and the memory watcher, the capture of tqdm, ``display()`` and matplotlib, the
detached fork that every way of starting a task uses, and what a running task costs.

May import: ``store``, ``core``.
"""
