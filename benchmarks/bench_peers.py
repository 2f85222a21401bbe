"""nbbgtask against its peers, each measured in the same run as the baselines it is compared with.

Medians over many rounds; within a round every method runs once, in a new random order, so the
noise of a shared machine hits all of them alike.  One Dask ``LocalCluster`` (2 worker processes,
1 thread each, no dashboard) is started at the beginning, kept warm, and closed at the end.

1. Start latency: just before the call that starts the work -> first line of the task's code,
   which sends ``time.perf_counter()`` (CLOCK_MONOTONIC, the same clock in every process of the
   machine) through a named pipe.  Methods: a bare ``os.fork()``; ``multiprocessing.Process``
   (fork and spawn contexts); ``concurrent.futures.ProcessPoolExecutor`` (cold: made for the
   call; warm: its workers already started); a fresh interpreter (``subprocess``, ``python -c``:
   the floor for anything that spawns); ``client.submit`` on the warm cluster; and nbbgtask:
   ``bg.run`` and ``initiate`` (fork), ``bg.run`` with ``start_method="spawn"``, and ``bg.run``
   with ``bg.configure(backend="dask")`` on the same cluster.  Goal: nbbgtask on Dask <= 1.5 x a
   plain ``client.submit`` doing the same; the rest is informational.
2. Throughput: 1,000 trivial tasks end to end, from the first submit until every result is in the
   caller: ``bg.run`` + ``status.result()`` for each (a persistent status for every task) vs one
   ``multiprocessing.Process`` per task (fork; results through a ``SimpleQueue``), a
   ``ProcessPoolExecutor()`` (made inside the timed span) and ``client.submit`` + ``gather`` on the
   warm cluster.  Then issue 14's case: 300 tasks from this process while it holds 200 MB (every
   page written), nbbgtask against the Process per task only.  nbbgtask runs each case twice,
   forked (``start_method="fork"``) and through the fork server.  Goal: from the process holding
   200 MB, the fork server takes no longer than a Process per task (ratio <= 1.0), as the README
   advises for a burst of small tasks from a kernel holding data; the forked rows are
   informational, since each of those tasks is a fork of the caller, as a Process is, and more.
3. Memory: a real ipykernel (``tests/kernel_driver.Kernel``) holds a 1 GiB ``bytearray`` whose
   pages are all written (so resident); it starts a task that sleeps, and the task process's
   unique memory (USS, ``psutil`` ``memory_full_info``; its peak over the task's life) is set
   against the kernel's RSS.  Also measured from the same kernel: a bare ``os.fork()`` child that
   sleeps, and a ``start_method="spawn"`` task.  Informational.

    .venv/bin/python benchmarks/bench_peers.py [--quick] [--json OUT.json]

A full run takes about 4 minutes, --quick about 1.

Top-level code stays light: multiprocessing's spawn context and Dask's worker processes import
this file again (as ``__mp_main__``), and that import would otherwise be counted in their start.
"""

import argparse
import contextlib

# Unused here since the table and the machine block moved to common.py, but kept: a spawned child
# imports this file again, and dropping them would make the spawn baselines cheaper than before.
import datetime  # noqa: F401
import json  # noqa: F401
import os
import platform  # noqa: F401
import random
import select
import shutil
import statistics
import struct
import sys
import tempfile
import time
import warnings
from pathlib import Path

perf = time.perf_counter
median = statistics.median
_DIRS: list[str] = []
PYTHON = Path(sys.executable)  # the venv's interpreter (not resolved: that would leave the venv)
warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*fork\(\) may lead to deadlocks")


def tmpdir(prefix: str) -> str:
    path = tempfile.mkdtemp(prefix=prefix)
    _DIRS.append(path)
    return path


def p95(xs):
    return sorted(xs)[round(0.95 * (len(xs) - 1))]


def interleaved(fns: dict, rounds: int, label: str = "") -> dict:
    """Call each of ``fns`` once per round, in a new random order each round; their results."""
    out = {name: [] for name in fns}
    for k in range(rounds):
        for name in random.sample(list(fns), len(fns)):
            out[name].append(fns[name]())
        if label:
            print(f"    {label} round {k + 1}/{rounds}", flush=True)
    return out


# -- what the tasks run (module level: picklable by reference for spawn, by value for Dask) -------


def probe(path: str) -> None:
    """The first line of task code: stamp the clock, then send the stamp through the named pipe."""
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, struct.pack("d", t))
    finally:
        os.close(fd)


def trivial(i: int) -> int:
    return i


def trivial_to_queue(queue, i: int) -> None:
    queue.put(i)


class Stamps:
    """A named pipe the parent reads 8-byte clock stamps from; any process can write to it by path.
    The parent keeps a writer open itself, so the pipe never reads as closed between messages."""

    def __init__(self) -> None:
        self.path = os.path.join(tmpdir("nbbg-peers-fifo-"), "stamps")
        os.mkfifo(self.path, 0o600)
        self.r = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        self.w = os.open(self.path, os.O_WRONLY)

    def drain(self) -> None:
        """Drop anything left over (a stamp that came after its measurement gave up)."""
        while select.select([self.r], [], [], 0)[0]:
            try:
                if not os.read(self.r, 4096):
                    return
            except BlockingIOError:
                return

    def recv(self, timeout: float = 60.0) -> float:
        if not select.select([self.r], [], [], timeout)[0]:
            raise TimeoutError("the task never reported its first line")
        return struct.unpack("d", os.read(self.r, 8))[0]

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


# -- the Dask cluster ---------------------------------------------------------------------------


class Cluster:
    """One warm LocalCluster for the whole run: a plain client, and nbbgtask's own client of it."""

    def __init__(self) -> None:
        import logging

        from distributed import Client, LocalCluster

        t0 = perf()
        self.cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                    silence_logs=logging.ERROR)
        self.client = Client(self.cluster, set_as_default=False)
        self.client.wait_for_workers(2, timeout=60)
        self.start_s = perf() - t0
        self.address = self.cluster.scheduler_address
        self.nb_client = None
        self.worker_pids = list(self.client.run(os.getpid).values())

    def nbbgtask_on(self) -> None:
        """``bg.configure(backend="dask", ...)``: the first time by address (as a user does), later
        with the client that made, so that switching back and forth does not connect again."""
        import nbbgtask as bg

        if self.nb_client is None:
            self.nb_client = bg.configure(backend="dask", address=self.address).dask_client
        else:
            bg.configure(backend="dask", dask_client=self.nb_client)

    def close(self) -> None:
        import nbbgtask as bg
        from nbbgtask.dask import backend as _dask_backend
        bg.configure(backend="local")
        _dask_backend.close()  # before the cluster goes, so its client does not try to reconnect
        self.client.close()
        self.cluster.close()


# -- 1. start latency ---------------------------------------------------------------------------


class ProbeTask:
    """Made a bg.BackgroundTask subclass at run time (nbbgtask is imported lazily)."""


def bench_start(rounds: int, cluster: Cluster) -> dict:
    import multiprocessing as mp
    import subprocess
    from concurrent.futures import ProcessPoolExecutor

    import nbbgtask as bg

    global ProbeTask

    class ProbeTask(bg.BackgroundTask):  # noqa: F811  (module level, so spawn could find it too)
        def execute(self, status):
            probe(status.settings["path"])

    bg.configure(home=tmpdir("nbbg-peers-start-"), start_method="fork")
    stamps = Stamps()
    path = stamps.path
    fork_ctx, spawn_ctx = mp.get_context("fork"), mp.get_context("spawn")
    warm_pool = ProcessPoolExecutor()
    list(warm_pool.map(trivial, range(8)))  # every worker started
    snippet = (f"import os, struct, time; t = time.perf_counter(); fd = os.open({path!r}, os.O_WRONLY); "
               "os.write(fd, struct.pack('d', t)); os.close(fd)")

    def timed(start, finish, setup=None, teardown=None):
        """start() begins the work; finish(handle) waits for it to end (not timed).  setup() and
        teardown() run before and after, untimed (switching nbbgtask to the Dask backend and back,
        which is configuration, not starting a task)."""
        def run():
            stamps.drain()
            if setup is not None:
                setup()
            try:
                t0 = perf()
                handle = start()
                t1 = stamps.recv()
                finish(handle)
            finally:
                if teardown is not None:
                    teardown()
            return t1 - t0
        return run

    def fork_start():
        pid = os.fork()
        if pid == 0:
            try:
                probe(path)
            finally:
                os._exit(0)
        return pid

    def mp_start(ctx):
        def start():
            p = ctx.Process(target=probe, args=(path,))
            p.start()
            return p
        return start

    def mp_join(p):
        p.join(30)
        assert p.exitcode == 0, p.exitcode

    def pool_cold():
        pool = ProcessPoolExecutor()
        return pool, pool.submit(probe, path)

    def pool_cold_end(h):
        h[1].result(timeout=30)
        h[0].shutdown(wait=True)

    def bg_end(status):
        if not status.wait(timeout=60) or status.state != "complete":
            raise RuntimeError(f"probe task ended {status.state}: {status.error}")

    def bg_spawn():
        bg.configure(start_method="spawn")
        try:
            return bg.run(probe, path)
        finally:
            bg.configure(start_method="fork")

    fns = {
        "os.fork": timed(fork_start, lambda pid: os.waitpid(pid, 0)),
        "mp.Process fork": timed(mp_start(fork_ctx), mp_join),
        "mp.Process spawn": timed(mp_start(spawn_ctx), mp_join),
        "ProcessPoolExecutor cold": timed(pool_cold, pool_cold_end),
        "ProcessPoolExecutor warm": timed(lambda: warm_pool.submit(probe, path), lambda f: f.result(timeout=30)),
        "subprocess python -c": timed(lambda: subprocess.Popen([str(PYTHON), "-c", snippet]),
                                      lambda p: p.wait(30)),
        "dask client.submit": timed(lambda: cluster.client.submit(probe, path, pure=False),
                                    lambda f: f.result(timeout=30)),
        "bg.run fork": timed(lambda: bg.run(probe, path), bg_end),
        "initiate fork": timed(lambda: ProbeTask.initiate(settings={"path": path}), bg_end),
        "bg.run spawn": timed(bg_spawn, bg_end),
        "bg.run dask": timed(lambda: bg.run(probe, path), bg_end, setup=cluster.nbbgtask_on,
                             teardown=lambda: bg.configure(backend="local")),
    }
    try:
        interleaved(fns, 2)  # warm-up: imports, first store files, the Dask connection, caches
        samples = interleaved(fns, rounds, "start")
    finally:
        warm_pool.shutdown(wait=True)
        stamps.close()
    return {k: {"median_ms": 1e3 * median(v), "p95_ms": 1e3 * p95(v), "samples_ms": [1e3 * x for x in v]}
            for k, v in samples.items()}


# -- 2. throughput ------------------------------------------------------------------------------


def bench_throughput(n: int, rounds: int, cluster: Cluster) -> dict:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    import nbbgtask as bg

    ctx = mp.get_context("fork")
    fs_ctx = mp.get_context("forkserver")

    def check(total, what, count=n):
        expected = count * (count - 1) // 2
        if total != expected:
            raise RuntimeError(f"{what}: results add up to {total}, not {expected}")

    def nbbgtask_run(count=n, method="fork"):
        bg.configure(home=tmpdir("nbbg-peers-tp-"), start_method=method)
        if method == "forkserver":
            close_fork_server()  # its start is counted: started by the first task, inside the clock
        before = cpu_now(None) | ({"server": 0.0} if method == "forkserver" else {})
        t0 = perf()
        statuses = [bg.run(trivial, i) for i in range(count)]
        t_sub = perf() - t0
        check(sum(s.result(timeout=600) for s in statuses), f"nbbgtask ({method})", count)
        elapsed = perf() - t0
        server = fork_server() if method == "forkserver" else None
        reaped(server)
        used = cpu_used(before, cpu_now(server), count)
        bg.configure(start_method="fork")
        return elapsed, t_sub, used

    def mp_forkserver(count=n):
        """multiprocessing's own fork server, the same design: a Process per task, forked by a
        server started for the round (inside the clock) and stopped after it (so its children's
        CPU time is counted)."""
        from multiprocessing import forkserver

        forkserver._forkserver._stop()
        before = cpu_now(None)
        elapsed, t_sub, _ = mp_process(count, fs_ctx)
        forkserver._forkserver._stop()
        return elapsed, t_sub, cpu_used(before, cpu_now(None), count)

    def mp_process(count=n, ctx=ctx):
        before = cpu_now(None)
        t0 = perf()
        queue = ctx.SimpleQueue()
        procs = [ctx.Process(target=trivial_to_queue, args=(queue, i)) for i in range(count)]
        for p in procs:
            p.start()
        t_sub = perf() - t0
        got = [queue.get() for _ in range(count)]
        for p in procs:
            p.join()
        check(sum(got), "multiprocessing", count)
        elapsed = perf() - t0
        queue.close()
        return elapsed, t_sub, cpu_used(before, cpu_now(None), count)

    def pool():
        t0 = perf()
        with ProcessPoolExecutor() as ex:
            futures = [ex.submit(trivial, i) for i in range(n)]
            t_sub = perf() - t0
            check(sum(f.result() for f in futures), "ProcessPoolExecutor")
            elapsed = perf() - t0
        return elapsed, t_sub

    def dask():
        client = cluster.client
        t0 = perf()
        futures = [client.submit(trivial, i, pure=False) for i in range(n)]
        t_sub = perf() - t0
        check(sum(client.gather(futures)), "dask")
        elapsed = perf() - t0
        del futures
        return elapsed, t_sub

    # The fork server is started by its first task; each round starts it again, inside the clock,
    # as multiprocessing's forkserver context (the same design) starts its own.
    fns = {"bg.run + result()": nbbgtask_run, "bg.run forkserver + result()": lambda: nbbgtask_run(n, "forkserver"),
           "mp.Process per task": mp_process, "mp forkserver Process per task": mp_forkserver,
           "ProcessPoolExecutor": pool, "dask client.submit": dask}
    samples = interleaved(fns, rounds, "throughput")
    out = {k: {"median_s": median(e for e, *_ in v), "submit_median_s": median(s for _, s, *_ in v),
               "tasks_per_s": n / median(e for e, *_ in v), "samples_s": [e for e, *_ in v]}
           for k, v in samples.items()} | {"tasks": n, "rounds": rounds}
    # Issue 14's case: 300 tasks started at once from a process holding 200 MB (as a kernel with
    # data does), where the fork itself and the copy-on-write of shared pages cost most.  The fork
    # server does not copy the caller: each task is a fork of that small process.
    global _BALLAST
    _BALLAST = bytearray(b"\x01") * (200 << 20)  # every page written: resident
    heavy_n = 300
    try:
        heavy = interleaved({"bg.run + result()": lambda: nbbgtask_run(heavy_n),
                             "bg.run forkserver + result()": lambda: nbbgtask_run(heavy_n, "forkserver"),
                             "mp.Process per task": lambda: mp_process(heavy_n),
                             "mp forkserver Process per task": lambda: mp_forkserver(heavy_n)},
                            max(3, 2 * rounds + 1), "throughput, 200 MB")
    finally:
        _BALLAST = None
    out["heavy"] = {k: {"median_s": median(e for e, *_ in v), "samples_s": [e for e, *_ in v],
                        "cpu_ms_per_task": {part: median(r[2][part] for r in v) for part in v[0][2]}}
                    for k, v in heavy.items()}
    out["heavy"] |= {"tasks": heavy_n, "held_mb": 200}
    return out


def fork_server():
    """The fork server's process (started by the first fork-server task, before any clock)."""
    import psutil

    from nbbgtask.local import forkserver as _forkserver
    return psutil.Process(_forkserver._connection.reaper()[0])


def cpu_now(server) -> dict:
    """CPU seconds (user + system) so far: this process's, its reaped children's and, with a
    fork server, the server's own and its reaped children's (the tasks it forked)."""
    t = os.times()
    got = {"caller": t.user + t.system, "tasks": t.children_user + t.children_system}
    if server is not None:
        c = server.cpu_times()
        got["server"] = c.user + c.system
        got["tasks"] += c.children_user + c.children_system
    return got


def reaped(server) -> None:
    """Wait until every task's process has been reaped (by this process's supervisor, or by the
    fork server), so that its CPU time is counted."""
    from nbbgtask.local.supervisor import supervisor

    deadline = perf() + 30
    while perf() < deadline:
        if not (supervisor().children if server is None else server.children()):
            return
        time.sleep(0.01)


def cpu_used(before: dict, after: dict, count: int) -> dict:
    """Milliseconds of CPU per task, by who spent them."""
    return {k: 1e3 * (after[k] - before[k]) / count for k in before}


#: what the process holds during the 200 MB throughput case
_BALLAST = None


# -- 3. memory of a forked task, from a kernel holding 1 GiB --------------------------------------

MEMORY_SETUP = r"""
import os, time
import nbbgtask as bg
data = bytearray(b"\x01") * (1 << 30)   # 1 GiB, every page written: resident, not a lazy zero page

def hold(seconds):
    time.sleep(seconds)

def bare_fork(seconds):
    pid = os.fork()
    if pid == 0:
        try:
            time.sleep(seconds)
        finally:
            os._exit(0)
    return pid

def spawned(seconds):
    bg.configure(start_method="spawn")
    try:
        return bg.run(hold, seconds)
    finally:
        bg.configure(start_method="fork")

def pid_of(status, timeout=10.0):
    # the pid may be recorded by the task itself, with its first report
    end = time.time() + timeout
    while status.refresh().pid is None and time.time() < end:
        time.sleep(0.005)
    return status.pid

print(os.getpid(), len(data))
"""


def sample_memory(pid: int, seconds: float) -> dict:
    """Peak USS (and the RSS then) of ``pid`` while it lives, sampled every 0.1 s for ``seconds``."""
    import psutil

    proc = psutil.Process(pid)
    best = {"uss": 0, "rss": 0, "samples": 0}
    end = perf() + seconds
    while perf() < end:
        try:
            info = proc.memory_full_info()
        except psutil.Error:
            break
        best["samples"] += 1
        if info.uss > best["uss"]:
            best.update(uss=info.uss, rss=info.rss)
        time.sleep(0.1)
    return best


def bench_memory(rounds: int, hold: float) -> dict:
    import psutil

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from kernel_driver import Kernel

    home = tmpdir("nbbg-peers-mem-")
    t0 = perf()
    k = Kernel(env={**os.environ, "NBBGTASK_HOME": home}, python=PYTHON)
    try:
        kernel_pid, size = map(int, k.ok(MEMORY_SETUP, timeout=120).split())
        kernel = psutil.Process(kernel_pid)
        setup_s = perf() - t0
        # start the child with a cell, then sample it from here while it sleeps (the cell has returned)
        starts = {
            "bg.run fork": f"s = bg.run(hold, {hold}); print(pid_of(s))",
            "os.fork": f"print(bare_fork({hold}))",
            "bg.run spawn": f"s = spawned({hold}); print(pid_of(s))",
        }
        ends = {
            "bg.run fork": "assert s.wait(timeout=60) and s.state == 'complete', s",
            "os.fork": "os.waitpid(int({pid}), 0)",
            "bg.run spawn": "assert s.wait(timeout=60) and s.state == 'complete', s",
        }

        def measure(kind):
            def run():
                pid = int(k.ok(starts[kind]).strip())
                kernel_rss = kernel.memory_info().rss
                got = sample_memory(pid, hold - 0.3)
                k.ok(ends[kind].format(pid=pid), timeout=90)
                return {**got, "kernel_rss": kernel_rss}
            return run

        samples = interleaved({kind: measure(kind) for kind in starts}, rounds, "memory")
        kernel_full = kernel.memory_full_info()
    finally:
        k.shutdown()
        for folder in k.km.kernel_spec_manager.kernel_dirs:  # the kernelspec kernel_driver wrote
            if Path(folder).name.startswith("nbbgtask-kernels-"):
                shutil.rmtree(folder, ignore_errors=True)
    mb = 2**20
    out = {kind: {"uss_mb": median(s["uss"] for s in v) / mb, "rss_mb": median(s["rss"] for s in v) / mb,
                  "uss_samples_mb": [s["uss"] / mb for s in v], "sampled": [s["samples"] for s in v]}
           for kind, v in samples.items()}
    out["kernel"] = {"rss_mb": median(s["kernel_rss"] for v in samples.values() for s in v) / mb,
                     "uss_mb": kernel_full.uss / mb, "held_bytes": size, "setup_s": setup_s}
    return out


# -- report -------------------------------------------------------------------------------------


def build_rows(res: dict) -> list[dict]:
    from common import make_row  # not at the top: see this file's docstring

    rows = []

    def row(*args, **kwargs):
        rows.append(make_row(*args, **kwargs))

    s = res["start"]

    def m(name):
        return s[name]["median_ms"]

    for name, base in (("bg.run fork", "os.fork"), ("bg.run fork", "mp.Process fork"),
                       ("bg.run fork", "ProcessPoolExecutor cold"), ("bg.run fork", "ProcessPoolExecutor warm"),
                       ("bg.run fork", "dask client.submit"), ("initiate fork", "os.fork"),
                       ("bg.run spawn", "mp.Process spawn"), ("bg.run spawn", "subprocess python -c")):
        row(f"1 start: {name} (base: {base}), median", m(name), m(base), "ms", "info")
    row("1 start: bg.run dask (base: dask client.submit), median", m("bg.run dask"), m("dask client.submit"), "ms",
        "ratio <= 1.5", m("bg.run dask") <= 1.5 * m("dask client.submit"))
    row("1 start: bg.run dask (base: client.submit), p95", s["bg.run dask"]["p95_ms"],
        s["dask client.submit"]["p95_ms"], "ms", "info")
    row("1 start: bg.run dask (base: subprocess python -c)", m("bg.run dask"), m("subprocess python -c"), "ms", "info")
    t = res["throughput"]
    n = t["tasks"]
    nb = t["bg.run + result()"]["median_s"]
    # A forked task is a fork of the caller per task, as a Process is, plus its durable record:
    # informational (docs/benchmarks.md says why no goal can ask it to beat the Process).  The
    # goal for a burst of small tasks is on the fork server's row below, the way the README gives.
    for base in ("mp.Process per task", "ProcessPoolExecutor", "dask client.submit"):
        row(f"2 {n} tasks end to end: bg.run+result (base: {base})", nb, t[base]["median_s"], "s", "info")
    row(f"2 {n} tasks: submitting alone, bg.run (base: mp start)", t["bg.run + result()"]["submit_median_s"],
        t["mp.Process per task"]["submit_median_s"], "s", "info")
    fs = t["bg.run forkserver + result()"]["median_s"]
    row(f"2 {n} tasks end to end: bg.run forkserver+result (base: mp.Process per task)", fs,
        t["mp.Process per task"]["median_s"], "s", "info")
    h = t["heavy"]
    nb, fs, mp_s = (h[k]["median_s"] for k in ("bg.run + result()", "bg.run forkserver + result()", "mp.Process per task"))
    row(f"2 {h['tasks']} tasks from a process holding {h['held_mb']} MB: bg.run+result (base: mp.Process per task)",
        nb, mp_s, "s", "info")
    row(f"2 {h['tasks']} tasks from a process holding {h['held_mb']} MB: bg.run forkserver+result "
        "(base: mp.Process per task)", fs, mp_s, "s", "ratio <= 1.0", fs <= mp_s)
    # The same design: a fork server started in the round, a Process per task forked by it.
    for label, tp in ((f"{n} tasks", t), (f"{h['tasks']} tasks from a process holding {h['held_mb']} MB", h)):
        peer = tp["mp forkserver Process per task"]["median_s"]
        mine = tp["bg.run forkserver + result()"]["median_s"]
        row(f"2 {label}: bg.run forkserver+result, server start counted (base: mp forkserver context)", mine, peer,
            "s", "ratio <= 1.5", mine <= 1.5 * peer)
    mem = res["memory"]
    rss = mem["kernel"]["rss_mb"]
    for kind, label in (("bg.run fork", "forked task (bg.run)"), ("os.fork", "bare os.fork child"),
                        ("bg.run spawn", "spawned task (bg.run)")):
        row(f"3 USS of a {label} (base: kernel RSS)", mem[kind]["uss_mb"], rss, "MB", "info")
    row("3 USS of a forked task (base: bare os.fork child)", mem["bg.run fork"]["uss_mb"], mem["os.fork"]["uss_mb"],
        "MB", "info")
    return rows


def close_fork_server() -> None:
    """Let the fork server the throughput case started go, as a kernel's exit does, and wait for
    it to end (it ends once its tasks have), so that it is not counted as left over."""
    import psutil

    from nbbgtask.local import forkserver as _forkserver
    pid = _forkserver._connection.pid
    _forkserver._connection.close()
    if pid is not None:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).wait(timeout=30)


def leftover_children() -> list[dict]:
    """Our own descendants still alive (there should be none): killed, and reported.  Not counted:
    multiprocessing's resource tracker, which ends by itself when this process exits."""
    import psutil

    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() == psutil.STATUS_ZOMBIE or "multiprocessing.resource_tracker" in " ".join(p.cmdline()):
                continue
            found.append({"pid": p.pid, "cmdline": " ".join(p.cmdline())[:200]})
            p.kill()
        except psutil.Error:
            pass
    return found


def main() -> None:
    import common  # not at the top: see this file's docstring

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds")
    ap.add_argument("--json", metavar="OUT.json", help="also write all figures and machine info here")
    ap.add_argument("--only", choices=["start", "throughput", "memory"], action="append",
                    help="run only these sections (for development; the report needs all three)")
    args = ap.parse_args()
    q = args.quick
    cfg = dict(start_rounds=10 if q else 40, tasks=1000, tp_rounds=1 if q else 3, mem_rounds=1 if q else 3,
               mem_hold_s=2.0)
    t_all, load0 = perf(), os.getloadavg()[0]
    res: dict = {}
    wanted = args.only or ["start", "throughput", "memory"]
    cluster = None
    try:
        if "start" in wanted or "throughput" in wanted:
            print("starting the Dask LocalCluster ...", flush=True)
            cluster = Cluster()
            res["cluster"] = {"start_s": cluster.start_s, "workers": 2, "threads_per_worker": 1}
        sections = {
            "start": lambda: bench_start(cfg["start_rounds"], cluster),
            "throughput": lambda: bench_throughput(cfg["tasks"], cfg["tp_rounds"], cluster),
            "memory": lambda: bench_memory(cfg["mem_rounds"], cfg["mem_hold_s"]),
        }
        sections = {k: v for k, v in sections.items() if k in wanted}
        for i, (key, fn) in enumerate(sections.items(), 1):
            print(f"{i}/{len(sections)} {key} ...", flush=True)
            t = perf()
            res[key] = fn()
            print(f"    {perf() - t:.0f} s", flush=True)
    finally:
        if cluster is not None:
            cluster.close()
        close_fork_server()
        res["leftover_processes"] = leftover_children()
        for path in _DIRS:
            shutil.rmtree(path, ignore_errors=True)
    if res["leftover_processes"]:
        print(f"warning: killed {len(res['leftover_processes'])} leftover processes: {res['leftover_processes']}")
    total = perf() - t_all
    rows = build_rows(res) if all(k in res for k in ("start", "throughput", "memory")) else []
    if "start" in res:
        print(f"\n{'start method':<26} {'median ms':>10} {'p95 ms':>9} {'x os.fork':>10}")
        fork = res["start"]["os.fork"]["median_ms"]
        for name, v in sorted(res["start"].items(), key=lambda kv: kv[1]["median_ms"]):
            print(f"{name:<26} {v['median_ms']:>10.2f} {v['p95_ms']:>9.2f} {v['median_ms'] / fork:>10.1f}")
    common.print_table(rows)
    print("\n" + common.run_line(q, total, load0))
    if args.json:
        import multiprocessing

        machine = common.machine(load0, ("distributed", "dask", "psutil"),
                                 process_pool_context=multiprocessing.get_start_method())
        common.write_json(args.json, machine, cfg, total, res, rows)


if __name__ == "__main__":
    main()
