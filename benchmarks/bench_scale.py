"""Scale benchmarks for nbbgtask: a store with 10,000 and 100,000 finished tasks against none.

Each figure is a ratio against the same measurement, in the same run, on a home folder with no
finished task (one live task in each, as a notebook following it would have).

1. Reads: ``bg.get`` of the live task, ``bg.find_last(name=...)``, ``bg.find_last(state="running")``,
   ``bg.tasks(state="running")``, ``bg.tasks(limit=20)``, and a progress write (``Store.patch``
   of the live task), each the median of many calls, the homes taken in turn.  Goal: <= 1.5x.
2. The monitor: a ``bg.monitor()`` widget (no kernel: its comm messages go nowhere) with 20
   running tasks, and 100,000 or no finished ones; the refresher thread's CPU time per second and
   its rounds per second over a few seconds.  Goal: <= 1.2x.
3. ``bg.prune(keep=10_000)`` of a 100,000-task history, each task with its log file as a real one
   has, in a process of its own: its time, and the process's RSS before and its peak (VmRSS and
   VmHWM: ``ru_maxrss`` would report this benchmark's own RSS, which a process started from it
   inherits as its maximum), informational.

The histories are built through the store's own API, ``Store.add_finished``, which writes each
history shard once (100,000 records in a few seconds), not by running 100,000 processes.

    .venv/bin/python benchmarks/bench_scale.py [--quick] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import common

import nbbgtask as bg
from nbbgtask.notebook import refresher as _refresher
from nbbgtask.store.store import store_for

perf = time.perf_counter
median = statistics.median
NAMES = 50


def finished_records(count: int) -> list[dict]:
    now = time.time()
    out = []
    for i in range(count):
        created = now - count + i
        out.append({
            "id": secrets.token_hex(16), "name": f"job-{i % NAMES}", "settings": None,
            "state": random.choice(("complete", "complete", "complete", "failed", "cancelled")),
            "created": created, "started": created, "finished": created + 0.5, "percent": 100.0, "message": "",
            "backend": "local", "start_method": "fork", "host": None, "pid": None, "error": None,
            "traceback": None, "has_result": False,
        })
    return out


def make_home(finished: int, running: int, root: str) -> tuple[str, list[bg.TaskStatus], float]:
    """A home with ``finished`` tasks in its history and ``running`` tasks asleep; the seconds the
    history took to build."""
    home = os.path.join(root, f"home-{finished}-{running}")
    bg.configure(home=home)
    t0 = perf()
    store_for(bg.configure().home).add_finished(finished_records(finished))
    built = perf() - t0
    live = [bg.run(time.sleep, 3600, name=f"job-{i % NAMES}") for i in range(running)]
    return home, live, built


def timed(fn, calls: int) -> float:
    fn()
    samples = []
    for _ in range(calls):
        t0 = perf()
        fn()
        samples.append(perf() - t0)
    return 1e3 * median(samples)


def bench_reads(sizes: list[int], calls: int, root: str) -> dict:
    homes = {size: make_home(size, 1, root) for size in sizes}
    reads = {
        "bg.get(live task)": lambda live: bg.get(live.id),
        "bg.find_last(name=...)": lambda live: bg.find_last(name="job-3"),
        "bg.find_last(state='running')": lambda live: bg.find_last(state="running"),
        "bg.tasks(state='running')": lambda live: bg.tasks(state="running"),
        "bg.tasks(limit=20)": lambda live: bg.tasks(limit=20),
        "progress write (Store.patch)": lambda live: store_for(bg.configure().home).patch(
            live.id, {"percent": random.random() * 100, "message": "x"}),
    }
    out: dict = {"built_s": {size: homes[size][2] for size in sizes}}
    for label, read in reads.items():
        per_size: dict[int, list[float]] = {size: [] for size in sizes}
        for _ in range(3):  # the homes in turn, three times: the machine's noise hits each
            for size in random.sample(sizes, len(sizes)):
                home, live, _ = homes[size]
                bg.configure(home=home)
                per_size[size].append(timed(functools.partial(read, live[0]), calls))
        out[label] = {size: median(v) for size, v in per_size.items()}
    for home, live, _ in homes.values():
        bg.configure(home=home)
        for status in live:
            status.cancel()
    return out


def _refresher_thread_cpu() -> float:
    import psutil

    for thread in threading.enumerate():
        if thread.name == "nbbgtask-refresher":
            for t in psutil.Process().threads():
                if t.id == thread.native_id:
                    return t.user_time + t.system_time
    return 0.0


def bench_monitor(finished: int, running: int, seconds: float, root: str) -> dict:
    out = {}
    rounds = [0]
    original = _refresher._Refresher._round

    def counted(self):
        rounds[0] += 1
        original(self)

    _refresher._Refresher._round = counted
    try:
        for size in (0, finished):
            home, live, _ = make_home(size, running, root)
            monitor = bg.monitor()
            time.sleep(1.0)  # the first rounds make the rows
            cpu0, rounds0, t0 = _refresher_thread_cpu(), rounds[0], perf()
            time.sleep(seconds)
            cpu, n, wall = _refresher_thread_cpu() - cpu0, rounds[0] - rounds0, perf() - t0
            out[size] = {"cpu_percent": 100 * cpu / wall, "rounds_per_s": n / wall, "interval_s": wall / max(n, 1)}
            monitor.close()
            for status in live:
                status.cancel()
    finally:
        _refresher._Refresher._round = original
    return out


PRUNE = """
import sys, time
import nbbgtask as bg

def kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

bg.configure(home=sys.argv[1])
before = kb("VmRSS")
t0 = time.perf_counter()
gone = bg.prune(keep=int(sys.argv[2]))
took = time.perf_counter() - t0
print(gone, took, before, kb("VmHWM"))
"""


def bench_prune(total: int, keep: int, root: str) -> dict:
    home, _, built = make_home(total, 0, root)
    logs = os.path.join(home, "logs")
    for record in store_for(bg.configure().home).history():  # every finished task has its log
        fd = os.open(os.path.join(logs, f"{record['id']}.log"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"done\n")
        os.close(fd)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(PRUNE), home, str(keep)],
                          capture_output=True, text=True, check=True)
    gone, took, before, peak = done.stdout.split()
    return {"pruned": int(gone), "seconds": float(took), "rss_before_mb": int(before) / 1024,
            "peak_rss_mb": int(peak) / 1024, "left": len(bg.tasks())}


def build_rows(res: dict, sizes: list[int]) -> list[dict]:
    rows = []
    reads = res["reads"]
    for label, per_size in reads.items():
        if label == "built_s":
            continue
        for size in sizes[1:]:
            value, base = per_size[size], per_size[0]
            rows.append(common.make_row(f"1 {label} @{size} vs 0", value, base, "ms", "ratio <= 1.5", value <= 1.5 * base))
    mon = res["monitor"]
    big = max(mon)
    for key, unit in (("cpu_percent", "% core"), ("interval_s", "s")):
        value, base = mon[big][key], mon[0][key]
        rows.append(common.make_row(f"2 monitor refresher {key} @{big} finished + 20 running vs 0", value, base, unit,
                                    "ratio <= 1.2", value <= 1.2 * base))
    p = res["prune"]
    rows.append(common.make_row(f"3 prune {p['pruned']} of {p['pruned'] + p['left']} finished: seconds", p["seconds"],
                                float("nan"), "s", "info"))
    rows.append(common.make_row("3 prune: peak RSS of the pruning process", p["peak_rss_mb"], p["rss_before_mb"], "MB",
                                "info"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller histories, fewer calls")
    ap.add_argument("--json", metavar="OUT.json", help="also write all figures and machine info here")
    args = ap.parse_args()
    q = args.quick
    cfg = dict(sizes=[0, 1000, 10000] if q else [0, 10000, 100000], calls=30 if q else 100,
               monitor_finished=10000 if q else 100000, monitor_seconds=3.0 if q else 8.0,
               prune_total=10000 if q else 100000)
    cfg["prune_keep"] = cfg["prune_total"] // 10
    t_all, load0 = perf(), os.getloadavg()[0]
    root = tempfile.mkdtemp(prefix="nbbg-scale-")
    res: dict = {}
    try:
        print("1/3 reads ...", flush=True)
        res["reads"] = bench_reads(cfg["sizes"], cfg["calls"], root)
        print("2/3 monitor ...", flush=True)
        res["monitor"] = bench_monitor(cfg["monitor_finished"], 20, cfg["monitor_seconds"], root)
        print("3/3 prune ...", flush=True)
        res["prune"] = bench_prune(cfg["prune_total"], cfg["prune_keep"], root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = build_rows(res, cfg["sizes"])
    common.print_table(rows)
    total = perf() - t_all
    print(f"\nhistory built through Store.add_finished: {res['reads']['built_s']} s")
    print(common.run_line(q, total, load0))
    if args.json:
        common.write_json(args.json, common.machine(load0, ("tinydb", "psutil")), cfg, total, res, rows)


if __name__ == "__main__":
    main()
