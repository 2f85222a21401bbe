"""Engine benchmarks for nbbgtask, each against a baseline measured in the same run.

Medians over many rounds; measured and baseline runs are interleaved (random order each round)
so the noise of a shared machine hits both.  Each section uses a fresh home folder.

1. Start latency: just before ``bg.run(fn)`` / ``MyTask.initiate()`` -> first line of task code
   in the child, which sends ``time.perf_counter()`` (CLOCK_MONOTONIC) through an inherited
   pipe.  Baseline: a bare ``os.fork()`` whose child does the same.  Goal: ratio <= 2.
   By start method, in the same rounds: ``"auto"`` where a fork is safe (it forks, after asking
   `_forksafety`) against ``"fork"`` forced (goal <= 1.1); a trivial task through the fork server
   against ``"spawn"`` (goal <= 0.2; the server is started by the warm-up, as a kernel's is by its
   first such task).
2. Inside a running task: per-item overhead of ``bg.track`` over a bare loop vs ``tqdm`` (goal:
   track <= tqdm), and of a ``status.update(percent=...)`` call per item (informational, vs tqdm); ``status.update(percent, message)`` per call in a tight loop, background
   writes included (goal <= 300 ns; baseline: a no-op call); the store writes made meanwhile.
   tqdm capture: per-item overhead of a tqdm loop in a task (drawing to the task's log, read by the
   writer thread) against the same loop in a plain process (drawing to a file), rounds taken in
   turn; goal: what the capture adds <= 1.0x tqdm's own per-item overhead.
3. Visibility: the task calls ``status.update(percent=p)`` about every 300 ms; the parent polls
   ``bg.get(id).percent`` every 1 ms until it sees p.  Baseline: the same loop noticing the
   update's timestamp arrive through a pipe.  Goal: p95 <= 250 ms (for a task that sleeps
   between updates; informational: the same for a CPU-bound task).
4. Store cost with 0 vs 3,000 (1,000, 10,000 and 100,000: informational) finished tasks in the
   history: a progress write (``Store.patch``) and ``bg.get`` of a live task (goal: ratio <= 1.5);
   a task's end (``Store.finalize``) at 100,000 against none, the median end and the mean over
   2,048 ends (which counts the recent files' moves into the growing main files): goal <= 1.5;
   informational: a cold read of a finished task (as by another process).
   Informational: a progress write with 100 and 1,000 tasks live at once (base: 1 live); each
   live task has a file of its own, which is all a progress write rewrites.

    .venv/bin/python benchmarks/bench_engine.py [--quick] [--json OUT.json]

A full run takes about a minute, --quick about 15 s.
"""

import argparse
import functools
import io
import os
import random
import secrets
import select
import shutil
import statistics
import struct
import tempfile
import time
import warnings

import common
import history

import nbbgtask as bg
from nbbgtask.core import procs as _procs
from nbbgtask.store.store import Store, store_for

warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*fork\(\) may lead to deadlocks")
perf = time.perf_counter
median = statistics.median
_HOMES: list[str] = []
_PIPE_W = -1  # the pipe ProbeTask writes to (inherited by the forked task)


def fresh_home():
    path = tempfile.mkdtemp(prefix="nbbg-bench-")
    _HOMES.append(path)
    return bg.configure(home=path).home


def send_time(fd: int, value: float | None = None) -> None:
    os.write(fd, struct.pack("d", perf() if value is None else value))


def send_time_to(path: str) -> None:
    """In a task that inherited no descriptor: the time, through the named pipe at ``path``."""
    fd = os.open(path, os.O_WRONLY)
    try:
        send_time(fd)
    finally:
        os.close(fd)


def recv_time(fd: int, timeout: float = 30.0) -> float:
    """One 8-byte message (pipe writes that small are atomic, so a read returns it whole)."""
    if not select.select([fd], [], [], timeout)[0]:
        raise TimeoutError("no message from the other process")
    return struct.unpack("d", os.read(fd, 8))[0]


def p95(xs):
    return sorted(xs)[round(0.95 * (len(xs) - 1))]


def timed_loop(make_iter):
    """A function that times one pass over ``make_iter()`` (doing nothing with the items)."""
    def run():
        t0 = perf()
        for _ in make_iter():
            pass
        return perf() - t0
    return run


def interleaved(fns: dict, rounds: int) -> dict:
    """Call each of ``fns`` once per round, in a new random order each round; their results."""
    out = {name: [] for name in fns}
    for _ in range(rounds):
        for name in random.sample(list(fns), len(fns)):
            out[name].append(fns[name]())
    return out


class ProbeTask(bg.BackgroundTask):
    def execute(self, status):
        send_time(_PIPE_W)


# -- 1. start latency --------------------------------------------------------------------------


def bench_start(rounds: int) -> dict:
    global _PIPE_W
    fresh_home()
    r, w = os.pipe()
    _PIPE_W = w

    def bare_fork():
        t0 = perf()
        pid = os.fork()
        if pid == 0:
            send_time(w)
            os._exit(0)
        t1 = recv_time(r)
        os.waitpid(pid, 0)
        return t1 - t0

    def task(start):
        bg.configure(start_method="fork")  # the pipe reaches only a forked task
        t0 = perf()
        status = start()
        t1 = recv_time(r)
        if not status.wait(timeout=30) or status.state != "complete":
            raise RuntimeError(f"probe task ended {status.state}: {status.error}")
        return t1 - t0

    # Spawned and fork-server tasks inherit no descriptor: by start method, every task sends its
    # time through a named pipe that it opens (the same channel for each pair compared).
    fifo = os.path.join(tempfile.mkdtemp(prefix="nbbg-bench-"), "times")
    os.mkfifo(fifo)
    fifo_r = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    keep_open = os.open(fifo, os.O_WRONLY)  # so the read end never sees an end of file

    def run_by(method):
        def run():
            bg.configure(start_method=method)
            t0 = perf()
            status = bg.run(send_time_to, fifo)
            t1 = recv_time(fifo_r)
            if not status.wait(timeout=60) or status.state != "complete":
                raise RuntimeError(f"probe task ended {status.state}: {status.error}")
            return t1 - t0
        return run

    fns = {"fork": bare_fork, "run": lambda: task(lambda: bg.run(send_time, w)),
           "initiate": lambda: task(ProbeTask.initiate), "fork by name": run_by("fork"), "auto": run_by("auto"),
           "forkserver": run_by("forkserver"), "spawn": run_by("spawn")}
    interleaved(fns, 2)  # warm-up: first store files, psutil, caches, the fork server
    samples = interleaved(fns, rounds)
    bg.configure(start_method="fork")
    for fd in (r, w, fifo_r, keep_open):
        os.close(fd)
    return {k: {"median_ms": 1e3 * median(v), "p95_ms": 1e3 * p95(v)} for k, v in samples.items()}


# -- 2. per-item overhead, measured inside a task -----------------------------------------------


def _in_task_overheads(n: int, reps: int, updates: int) -> dict:
    from tqdm import tqdm

    status = bg.current()
    reporter = status._reporter
    # count the reporter's writes (in the task process only); older runners held the store directly
    store = reporter._sink._store if hasattr(reporter, "_sink") else reporter._store
    durations: list[float] = []
    patch = store.patch

    def timed_patch(*a, **k):
        t0 = perf()
        record = patch(*a, **k)
        durations.append(perf() - t0)
        return record

    store.patch = timed_patch

    def updating(n):  # the loop a user writes with status.update(): one call per item
        update, scale = status.update, 100.0 / n
        for i in range(n):
            update(percent=i * scale)
            yield i

    def bare_gen(n):  # the same generator shape without the call, so only the call is counted
        for i in range(n):  # noqa: UP028 - "yield from" would not be the same shape
            yield i

    loops = {"bare": timed_loop(lambda: range(n)), "track": timed_loop(lambda: bg.track(range(n))),
             "tqdm": timed_loop(lambda: tqdm(range(n), file=io.StringIO(), mininterval=0.1)),
             "bare_gen": timed_loop(lambda: bare_gen(n)), "update": timed_loop(lambda: updating(n))}
    per: dict[str, list[float]] = {"track": [], "tqdm": [], "update": []}
    for _ in range(reps):  # one round at a time: each loop is compared with its own round's bare loop
        t = {k: v[0] for k, v in interleaved(loops, 1).items()}
        for name in per:
            base = t["bare_gen"] if name == "update" else t["bare"]
            per[name].append(1e9 * (t[name] - base) / n)

    def noop(percent=None, message=None):
        pass

    def update_loop(fn):
        scale = 100.0 / updates
        durations.clear()
        t0 = perf()
        for i in range(updates):
            fn(percent=i * scale, message="step")
        return perf() - t0, list(durations)

    res = interleaved({"update": lambda: update_loop(status.update), "noop": lambda: update_loop(noop)},
                      reps // 2 + 1)
    busy_writes = [d for _, ds in res["update"] for d in ds]
    durations.clear()
    for i in range(20):  # the same write with the task idle
        timed_patch(status.id, {"percent": 50.0, "message": f"idle {i}"})
        time.sleep(0.005)
    loop_s = median(t for t, _ in res["update"])
    return {
        "track_ns": median(per["track"]), "tqdm_ns": median(per["tqdm"]), "update_item_ns": median(per["update"]),
        "update_ns": 1e9 * loop_s / updates, "noop_call_ns": 1e9 * median(t for t, _ in res["noop"]) / updates,
        "update_loop_s": loop_s, "update_writes": median(len(ds) for _, ds in res["update"]),
        "write_busy_ms": 1e3 * median(busy_writes) if busy_writes else float("nan"),
        "write_idle_ms": 1e3 * median(durations), "progress_interval": reporter._job.progress_interval,
    }


def bench_overheads(n: int, reps: int, updates: int) -> dict:
    fresh_home()
    return bg.run(_in_task_overheads, n, reps, updates).result(timeout=600)


def _tqdm_round(n: int, **kwargs) -> float:
    """ns per item a tqdm loop spends over the same bare loop (the two in random order)."""
    from tqdm import tqdm

    t = {k: v[0] for k, v in interleaved({"bare": timed_loop(lambda: range(n)),
                                          "tqdm": timed_loop(lambda: tqdm(range(n), **kwargs))}, 1).items()}
    return 1e9 * (t["tqdm"] - t["bare"]) / n


def _captured_tqdm(n: int, reps: int, go: int, back: int) -> None:
    for _ in range(reps):  # a round when the caller says, so the two processes never run at once
        recv_time(go, timeout=600)
        send_time(back, _tqdm_round(n))  # tqdm's default: the task's stderr, its log


def bench_tqdm_capture(n: int, reps: int) -> dict:
    """tqdm in a task (captured: its bar read by the writer thread, its redraws made log lines) vs
    the same loop here, in a process that is no task (plain tqdm, drawing to a file)."""
    import tqdm  # noqa: F401 - imported before the fork, as a notebook that uses it has

    home = fresh_home()
    go_r, go_w = os.pipe()
    back_r, back_w = os.pipe()
    status = bg.run(_captured_tqdm, n, reps + 1, go_r, back_w)
    plain, captured = [], []
    with open(home / "plain-tqdm.log", "w") as log:
        for i in range(reps + 1):  # the first round of each: a warm-up
            ns = _tqdm_round(n, file=log)
            send_time(go_w)
            if i:
                plain.append(ns)
                captured.append(recv_time(back_r, timeout=600))
            else:
                recv_time(back_r, timeout=600)
    status.result(timeout=60)
    for fd in (go_r, go_w, back_r, back_w):
        os.close(fd)
    text, plain_text = status.log(), (home / "plain-tqdm.log").read_bytes().decode()
    # what the two left in their logs: lines, and \r redraws
    return {"captured_ns": median(captured), "plain_ns": median(plain), "log_lines": text.count("\n"),
            "log_redraws": text.count("\r"), "plain_lines": plain_text.count("\n"),
            "plain_redraws": plain_text.count("\r")}


# -- 3. status visibility latency ---------------------------------------------------------------


def _updating_task(samples: int, w: int, busy: bool) -> None:
    status = bg.current()
    rng = random.Random(1)
    for k in range(samples + 1):
        gap = rng.uniform(0.25, 0.35)  # jitter: no fixed phase against the writer's timer
        if busy:  # a CPU-bound task: pure Python, no system calls, holding the GIL
            end = perf() + gap
            while perf() < end:
                sum(range(100))
        else:
            time.sleep(gap)
        if k < samples:
            t = perf()
            status.update(percent=k + 1)
            send_time(w, t)


def bench_visibility(samples: int, busy: bool = False) -> dict:
    fresh_home()
    r, w = os.pipe()
    status = bg.run(_updating_task, samples, w, busy)
    lat: dict[str, list[float]] = {"store": [], "pipe": []}
    for k in range(samples):
        t_update = seen_store = seen_pipe = None
        deadline = perf() + 10
        while seen_store is None or seen_pipe is None:
            if perf() > deadline:
                raise TimeoutError(f"update {k + 1} not seen within 10 s")
            if seen_pipe is None and select.select([r], [], [], 0)[0]:
                seen_pipe, t_update = perf(), recv_time(r)
            if seen_store is None and bg.get(status.id).percent >= k + 1:  # >=: if superseded
                seen_store = perf()
            time.sleep(0.001)
        lat["store"].append(seen_store - t_update)
        lat["pipe"].append(seen_pipe - t_update)
    status.result(timeout=30)
    for fd in (r, w):
        os.close(fd)
    return {k: {"p50_ms": 1e3 * median(v), "p95_ms": 1e3 * p95(v), "max_ms": 1e3 * max(v)} for k, v in lat.items()}


# -- 4. store cost vs history size --------------------------------------------------------------


def make_record(state: str = "running", **extra) -> dict:
    """A record with the fields `_api._launch` writes."""
    now = time.time()
    return {
        "id": secrets.token_hex(16), "name": "bench", "settings": None, "state": state, "percent": 0.0,
        "message": "", "created": now, "started": now, "finished": None, "pid": None, "pid_started": None,
        "host": _procs.HOST, "owner_pid": os.getpid(),
        "owner_started": _procs.process_start_time(os.getpid()), "backend": "local",
        "start_method": "fork", "cancel_requested": False, "error": None, "traceback": None,
        "has_result": False, **extra,
    }


_TEMPLATES: list[dict] = []


def fill_history(store: Store, count: int) -> None:
    """``count`` finished tasks cloned from real ones (`history.py`), one write per history shard."""
    if not count:
        return
    if not _TEMPLATES:
        _TEMPLATES.extend(history.real_records())
    store.add_finished(history.clones(_TEMPLATES, count))


def _blocked_task(fd: int) -> None:
    recv_time(fd, timeout=600)


def bench_store(sizes: list[int], calls: int, ends: int) -> dict:
    homes = {}
    for size in sizes:
        home = fresh_home()
        store = store_for(home)
        fill_history(store, size)
        fake = make_record()  # the record a task's reporter patches
        store.admit(fake, float("inf"))
        r, w = os.pipe()
        homes[size] = dict(home=home, store=store, fake=fake["id"], task=bg.run(_blocked_task, r), pipe=(r, w))

    def task_end(h):  # finalize one task; then a first read of it by a reader with no cache
        rec = make_record()
        h["store"].admit(rec, float("inf"))
        t0 = perf()
        h["store"].finalize(rec["id"], {"state": "complete", "finished": time.time()})
        t1 = perf()
        reader = Store(h["home"])  # as in another process
        t2 = perf()
        reader.get(rec["id"])
        return t1 - t0, perf() - t2

    def progress_and_get(h):
        bg.configure(home=h["home"])
        t0 = perf()
        h["store"].patch(h["fake"], {"percent": random.random() * 100, "message": "m"})
        t1 = perf()
        status = bg.get(h["task"].id)
        t2 = perf()
        assert status.state == "running"
        return t1 - t0, t2 - t1

    ended = interleaved({s: functools.partial(task_end, homes[s]) for s in sizes}, ends)
    timed = interleaved({s: functools.partial(progress_and_get, homes[s]) for s in sizes}, calls)
    out = {}
    for size, h in homes.items():
        bg.configure(home=h["home"])
        send_time(h["pipe"][1])
        h["task"].result(timeout=60)
        for fd in h["pipe"]:
            os.close(fd)
        out[size] = {
            "patch_ms": 1e3 * median(a for a, _ in timed[size]), "get_ms": 1e3 * median(b for _, b in timed[size]),
            "finalize_ms": 1e3 * median(a for a, _ in ended[size]),
            "cold_get_finished_ms": 1e3 * median(b for _, b in ended[size]),
            "history_bytes": sum(p.stat().st_size for p in (h["home"] / "history").glob("*.json")),
        }
    # The median above is of ends that each rewrite a shard's recent file; one end in RECENT_MAX
    # also moves them into the shard's main file, which grows with the history.  The mean over
    # RECENT_MAX ends per shard counts those moves at their share.
    from nbbgtask.store.store import HISTORY_SHARDS, RECENT_MAX

    for size, h in homes.items():
        spent = []
        for _ in range(RECENT_MAX * HISTORY_SHARDS):
            rec = make_record()
            h["store"].admit(rec, float("inf"))
            t0 = perf()
            h["store"].finalize(rec["id"], {"state": "complete", "finished": time.time()})
            spent.append(perf() - t0)
        out[size]["finalize_mean_ms"] = 1e3 * sum(spent) / len(spent)
        out[size]["finalize_max_ms"] = 1e3 * max(spent)
        out[size]["finalize_ends"] = len(spent)
    return out


def live_dir_bytes(home) -> int:
    """The bytes of every live file (``live/*.json``); a file that vanishes meanwhile counts 0."""
    total = 0
    for path in (home / "live").glob("*.json"):
        try:
            total += path.stat().st_size
        except FileNotFoundError:
            pass
    return total


def bench_live(sizes: list[int], calls: int) -> dict:
    """A progress write (``Store.patch``) with 1, 100, 1,000 tasks live at once.  Each live task has
    its own file, ``live/<id>.json``, and a write rewrites only that file (under its id's stripe
    lock), so its cost should not grow with the number of live tasks.  Wall time and this
    process's CPU time per write; the bytes of the file the last write rewrote, and of all of them."""
    stores, last = {}, {}
    for size in sizes:
        store = store_for(fresh_home())
        records = [make_record() for _ in range(size)]
        for r in records:  # one small file each
            store.insert(r)
        stores[size] = (store, [r["id"] for r in records])

    def write(size):
        store, ids = stores[size]
        task_id = last[size] = random.choice(ids)
        t0, c0 = perf(), time.process_time()
        store.patch(task_id, {"percent": random.random() * 100, "message": f"tick t={time.time():.3f}"})
        return perf() - t0, time.process_time() - c0

    timed = interleaved({s: functools.partial(write, s) for s in sizes}, calls)
    out = {}
    for size in sizes:
        store = stores[size][0]
        out[size] = {"patch_ms": 1e3 * median(w for w, _ in timed[size]),
                     "patch_cpu_ms": 1e3 * statistics.mean(c for _, c in timed[size]),
                     "live_file_bytes": os.path.getsize(store._live_path(last[size])),
                     "live_dir_bytes": live_dir_bytes(store.home), "live_files": store.live_count()}
    return out


# -- report -------------------------------------------------------------------------------------


def build_rows(res: dict, sizes: list[int]) -> list[dict]:
    s, o, v, st = res["start"], res["overheads"], res["visibility"], res["store"]
    rows = []

    def row(*args, **kwargs):
        rows.append(common.make_row(*args, **kwargs))

    fork = s["fork"]["median_ms"]
    for kind in ("run", "initiate"):
        row(f"1 start: {'bg.run' if kind == 'run' else 'initiate'} -> task code (median)", s[kind]["median_ms"],
            fork, "ms", "ratio <= 2.0", s[kind]["median_ms"] <= 2 * fork)
    row("1 start: bg.run -> task code (p95)", s["run"]["p95_ms"], s["fork"]["p95_ms"], "ms", "info")
    run = s["fork by name"]["median_ms"]
    row("1 start: auto, fork safe (base: fork forced), median", s["auto"]["median_ms"], run, "ms", "ratio <= 1.1",
        s["auto"]["median_ms"] <= 1.1 * run)
    row("1 start: forkserver, trivial task (base: spawn), median", s["forkserver"]["median_ms"], s["spawn"]["median_ms"],
        "ms", "ratio <= 0.2", s["forkserver"]["median_ms"] <= 0.2 * s["spawn"]["median_ms"])
    row("2 bg.track per-item overhead (base tqdm)", o["track_ns"], o["tqdm_ns"], "ns/item", "track <= tqdm",
        o["track_ns"] <= o["tqdm_ns"])
    row("2 status.update() per-item overhead (base tqdm)", o["update_item_ns"], o["tqdm_ns"], "ns/item", "info")
    tc = res.get("tqdm_capture")
    if tc:
        added = tc["captured_ns"] - tc["plain_ns"]
        row("2 tqdm capture: added per-item overhead (base tqdm's own)", added, tc["plain_ns"], "ns/item",
            "added <= 1.0x tqdm", added <= tc["plain_ns"])
        row("2 tqdm in a task per-item overhead (base plain tqdm)", tc["captured_ns"], tc["plain_ns"], "ns/item", "info")
        row("2 tqdm in a task: log lines (base plain tqdm's \\r redraws)", tc["log_lines"], tc["plain_redraws"],
            "lines", "info")
    row("2 status.update per call (base no-op call)", o["update_ns"], o["noop_call_ns"], "ns/call", "<= 300 ns",
        o["update_ns"] <= 300)
    row("2 store writes/s in update loop", o["update_writes"] / o["update_loop_s"], 1 / o["progress_interval"],
        "writes/s", "info (base 1/interval)")
    row("2 one progress write, task busy (base idle)", o["write_busy_ms"], o["write_idle_ms"], "ms", "info")
    row("3 visibility bg.get, p50 (base pipe)", v["store"]["p50_ms"], v["pipe"]["p50_ms"], "ms", "info")
    row("3 visibility bg.get, p95 (base pipe)", v["store"]["p95_ms"], v["pipe"]["p95_ms"], "ms", "p95 <= 250 ms",
        v["store"]["p95_ms"] <= 250)
    vb = res["visibility_busy"]
    for q in ("p50", "p95"):
        row(f"3 visibility, CPU-bound task, {q}", vb["store"][f"{q}_ms"], vb["pipe"][f"{q}_ms"], "ms", "info")
    for size in sizes[1:]:
        gate = size == 3000
        for key, label in (("patch_ms", "Store.patch (progress write)"), ("get_ms", "bg.get(live task)")):
            row(f"4 {label} @{size} vs 0", st[size][key], st[0][key], "ms", "ratio <= 1.5" if gate else "info",
                st[size][key] <= 1.5 * st[0][key] if gate else None)
        # A task's end must not grow with the history (issue 24): gated at the largest size.
        end_gate = size == max(sizes)
        row(f"4 Store.finalize (task end) @{size} vs 0", st[size]["finalize_ms"], st[0]["finalize_ms"], "ms",
            "ratio <= 1.5" if end_gate else "info",
            st[size]["finalize_ms"] <= 1.5 * st[0]["finalize_ms"] if end_gate else None)
        row(f"4 Store.finalize, mean of {st[size]['finalize_ends']} ends @{size} vs 0", st[size]["finalize_mean_ms"],
            st[0]["finalize_mean_ms"], "ms", "ratio <= 1.5" if end_gate else "info",
            st[size]["finalize_mean_ms"] <= 1.5 * st[0]["finalize_mean_ms"] if end_gate else None)
        row(f"4 cold get(finished task) @{size} vs 0", st[size]["cold_get_finished_ms"],
            st[0]["cold_get_finished_ms"], "ms", "info")
    lv = res.get("live")
    if lv:
        one = lv[min(lv)]
        for size in sorted(lv)[1:]:
            row(f"4 Store.patch with {size} tasks live (base: {min(lv)} live)", lv[size]["patch_ms"], one["patch_ms"],
                "ms", "info")
            row(f"4 ... its CPU time, {size} live (base: {min(lv)} live)", lv[size]["patch_cpu_ms"], one["patch_cpu_ms"],
                "ms", "info")
            row(f"4 ... one task's live file, {size} live (base: {min(lv)} live)", lv[size]["live_file_bytes"],
                one["live_file_bytes"], "bytes", "info")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and smaller loops")
    ap.add_argument("--json", metavar="OUT.json", help="also write all figures and machine info here")
    args = ap.parse_args()
    q = args.quick
    cfg = dict(start_rounds=12 if q else 40, n=200_000 if q else 2_000_000, reps=5 if q else 9,
               updates=500_000 if q else 1_000_000, vis_samples=15 if q else 50,
               store_calls=100 if q else 300, store_ends=7 if q else 15, sizes=[0, 1000, 3000, 10000, 100000],
               live_sizes=[1, 100, 1000], live_calls=30 if q else 60)
    t_all, load0 = perf(), os.getloadavg()[0]
    res = {}
    sections = {
        "start": lambda: bench_start(cfg["start_rounds"]),
        "overheads": lambda: bench_overheads(cfg["n"], cfg["reps"], cfg["updates"]),
        # loops of about a second: each spans several of the writer thread's reads
        "tqdm_capture": lambda: bench_tqdm_capture(5 * cfg["n"], cfg["reps"]),
        "visibility": lambda: bench_visibility(cfg["vis_samples"]),
        "visibility_busy": lambda: bench_visibility(cfg["vis_samples"], busy=True),
        "store": lambda: bench_store(cfg["sizes"], cfg["store_calls"], cfg["store_ends"]),
        "live": lambda: bench_live(cfg["live_sizes"], cfg["live_calls"]),
    }
    try:
        for i, (key, fn) in enumerate(sections.items(), 1):
            print(f"{i}/{len(sections)} {key} ...", flush=True)
            res[key] = fn()
    finally:
        for path in _HOMES:
            shutil.rmtree(path, ignore_errors=True)
    rows = build_rows(res, cfg["sizes"])
    common.print_table(rows)
    total = perf() - t_all
    print("\n" + common.run_line(q, total, load0))
    if args.json:
        common.write_json(args.json, common.machine(load0, ("tinydb", "tqdm", "psutil")), cfg, total, res, rows)


if __name__ == "__main__":
    main()
