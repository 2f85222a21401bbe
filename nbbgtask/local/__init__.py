"""The local backend: tasks run as processes of this machine, started by fork, the fork server or
spawn (one `Starter` each), reaped by the supervisor; whether forking is still safe here; reading
a local task's stack.

May import: ``task``, ``store``, ``core``; never ``dask`` (an independence contract).
"""
