"""The Dask backend, imported only when a task of it is started or read (``bg.configure(backend="dask")``):
the kernel's side (`backend`), and what runs on a worker (`worker`, its spares and their forker, a
task's child), with every message between them in `wire`.

May import: ``task``, ``store``, ``core``, and ``distributed``; never ``local``.
"""
