"""Scale benchmarks for nbbgtask: a store with 10,000 and 100,000 finished tasks against none.

Each figure is a ratio against the same measurement, in the same run, on a home folder with no
finished task (one live task in each, as a notebook following it would have).  The histories are
made the way real ones are (`history.py`): the final records of real ``bg.run`` tasks, cloned
with new ids and times; the newest end one by one through ``Store.finalize``.

1. Cold: a fresh process that imports nbbgtask and makes its first ``bg.tasks(limit=20)``, or
   its first ``bg.find_last(name=...)``; and the command ``nbbgtask list``: the whole process,
   timed from here around ``subprocess.run`` (best of several, the homes in turn).  Goal: <= 1.5x.
   The child's own timers (import, first call) and its bytes read (``rchar``) are informational.
   Also ``import nbbgtask`` in a fresh interpreter against ``import ipywidgets`` (best of
   several); goal: <= 0.5x.
2. Warm reads: ``bg.find_last(name=...)`` and ``bg.tasks(limit=20)`` (goal <= 1.5x), and reads
   that never touch the history by construction (``bg.get`` of the live task, the running
   lookups, a progress write: informational), each the median of many calls after a first.
3. The monitor: a ``bg.monitor()`` widget (no kernel: its comm messages go nowhere) with 20
   running tasks, and 100,000 or no finished ones; the refresher thread's CPU time per second and
   its rounds per second over a few seconds.  Goal: <= 1.2x.
4. ``bg.prune(keep=10%)`` of the history, each task with its log file, in a process of its own,
   against today's way on a copy of the same home (``Store.history()``, sorted, then
   ``Store.remove``): its time (goal <= 1.0x) and its peak memory above its start (VmHWM - VmRSS
   before; goal: <= 100 MB at 100,000).

    .venv/bin/python benchmarks/bench_scale.py [--quick] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import common
import history

import nbbgtask as bg
from nbbgtask.notebook import refresher as _refresher
from nbbgtask.store.store import store_for

perf = time.perf_counter
median = statistics.median
NAMES = 50


def make_home(finished: int, running: int, root: str) -> tuple[str, list[bg.TaskStatus], float]:
    """A home with ``finished`` tasks in its history (`history.build`) and ``running`` tasks
    asleep; the seconds the history took to build."""
    home = os.path.join(root, f"home-{finished}-{running}")
    bg.configure(home=home)
    built = history.build(finished)
    live = [bg.run(time.sleep, 3600, name=f"job-{i % NAMES}") for i in range(running)]
    return home, live, built


COLD = """
import json, sys, time
t0 = time.perf_counter()
import nbbgtask as bg
t1 = time.perf_counter()
found = bg.tasks(limit=20) if sys.argv[1] == "tasks" else bg.find_last(name="job-3")
t2 = time.perf_counter()
with open("/proc/self/io") as f:
    rchar = next(int(line.split()[1]) for line in f if line.startswith("rchar:"))
print(json.dumps({"import_s": t1 - t0, "call_s": t2 - t1, "rchar": rchar}))
"""
CLI = os.path.join(os.path.dirname(sys.executable), "nbbgtask")


def bench_cold(homes: dict, rounds: int) -> dict:
    """Each fresh-process figure: the best of ``rounds`` (the homes in turn each round)."""
    runs = {"tasks": [sys.executable, "-c", COLD, "tasks"], "find_last": [sys.executable, "-c", COLD, "find_last"],
            "nbbgtask list": [CLI, "list"]}
    out: dict = {what: {size: [] for size in homes} for what in runs}
    for _ in range(rounds):
        for what, cmd in runs.items():
            for size in random.sample(list(homes), len(homes)):
                env = {**os.environ, "NBBGTASK_HOME": homes[size][0]}
                t0 = perf()
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                whole = perf() - t0
                got = json.loads(done.stdout) if what != "nbbgtask list" else {"lines": done.stdout.count("\n")}
                out[what][size].append({"whole_s": whole, **got})
    return {what: {size: min(v, key=lambda r: r["whole_s"]) for size, v in per.items()} for what, per in out.items()}


IMPORT = "import time; t = time.perf_counter(); import {}; print(time.perf_counter() - t)"


def bench_import(rounds: int) -> dict:
    """``import nbbgtask`` and ``import ipywidgets``, each in a fresh interpreter, taken in turn."""
    got: dict[str, list[float]] = {"nbbgtask": [], "ipywidgets": []}
    for _ in range(rounds):
        for name in random.sample(list(got), 2):
            done = subprocess.run([sys.executable, "-c", IMPORT.format(name)], capture_output=True, text=True, check=True)
            got[name].append(float(done.stdout))
    return {name: {"best_s": min(v), "median_s": median(v)} for name, v in got.items()}


def timed(fn, calls: int) -> float:
    fn()
    samples = []
    for _ in range(calls):
        t0 = perf()
        fn()
        samples.append(perf() - t0)
    return 1e3 * median(samples)


def bench_reads(sizes: list[int], calls: int, root: str, homes: dict) -> dict:
    """Warm reads; ``homes`` gets the homes made (their live tasks still asleep, for the cold reads)."""
    homes.update({size: make_home(size, 1, root) for size in sizes})
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
keep = int(sys.argv[2])
before = kb("VmRSS")
t0 = time.perf_counter()
if sys.argv[3] == "today":  # the way prune worked before it streamed: the whole history in memory
    from nbbgtask.store.files import remove_task_files
    from nbbgtask.store.store import store_for
    store = store_for(bg.configure().home)
    finished = sorted(store.history(), key=lambda r: r.get("finished") or r["created"], reverse=True)
    gone = store.remove([r["id"] for r in finished[keep:]])
    store.sweep()
    remove_task_files(bg.configure().home, gone)
    gone = len(gone)
else:
    gone = bg.prune(keep=keep)
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
    copy = home + "-today"
    shutil.copytree(home, copy, symlinks=True)
    out = {}
    for way, where in random.sample([("today", copy), ("streaming", home)], 2):
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(PRUNE), where, str(keep), way],
                              capture_output=True, text=True, check=True)
        gone, took, before, peak = done.stdout.split()
        bg.configure(home=where)
        out[way] = {"pruned": int(gone), "seconds": float(took), "rss_before_mb": int(before) / 1024,
                    "peak_rss_mb": int(peak) / 1024, "above_start_mb": (int(peak) - int(before)) / 1024,
                    "left": len(bg.tasks())}
    return out


#: the warm reads that read the history; the others read only live files, whatever its size
GATED_WARM = ("bg.find_last(name=...)", "bg.tasks(limit=20)")


def build_rows(res: dict, sizes: list[int]) -> list[dict]:
    rows = []
    reads = res["reads"]
    for label, per_size in reads.items():
        if label == "built_s":
            continue
        gated = label in GATED_WARM
        for size in sizes[1:]:
            value, base = per_size[size], per_size[0]
            rows.append(common.make_row(f"1 {label} @{size} vs 0", value, base, "ms",
                                        "ratio <= 1.5" if gated else "info (reads no history, by construction)",
                                        value <= 1.5 * base if gated else None))
    mon = res["monitor"]
    big = max(mon)
    for key, unit in (("cpu_percent", "% core"), ("interval_s", "s")):
        value, base = mon[big][key], mon[0][key]
        rows.append(common.make_row(f"2 monitor refresher {key} @{big} finished + 20 running vs 0", value, base, unit,
                                    "ratio <= 1.2", value <= 1.2 * base))
    p, t = res["prune"]["streaming"], res["prune"]["today"]
    total = p["pruned"] + p["left"]
    rows.append(common.make_row(f"3 prune {p['pruned']} of {total} finished: seconds (base: today's way)", p["seconds"],
                                t["seconds"], "s", "ratio <= 1.0", p["seconds"] <= t["seconds"]))
    rows.append(common.make_row("3 prune: peak memory above the process's start (base: today's way)",
                                p["above_start_mb"], t["above_start_mb"], "MB", "<= 100 MB",
                                p["above_start_mb"] <= 100))
    rows.append(common.make_row("3 prune: peak RSS of the pruning process (base: today's way)", p["peak_rss_mb"],
                                t["peak_rss_mb"], "MB", "info"))
    for what, label in (("tasks", "bg.tasks(limit=20)"), ("find_last", "bg.find_last(name=...)"),
                        ("nbbgtask list", "nbbgtask list")):
        cold = res["cold"][what]
        for size in sizes[1:]:
            value, base = cold[size]["whole_s"], cold[0]["whole_s"]
            rows.append(common.make_row(f"0 cold: a new process's {label}, whole process @{size} vs 0", 1e3 * value,
                                        1e3 * base, "ms", "ratio <= 1.5", value <= 1.5 * base))
            if "call_s" in cold[size]:
                rows.append(common.make_row(f"0 cold: ... its first call alone @{size} vs 0", 1e3 * cold[size]["call_s"],
                                            1e3 * cold[0]["call_s"], "ms", "info"))
                rows.append(common.make_row(f"0 cold: ... bytes it read @{size} vs 0", cold[size]["rchar"] / 1e6,
                                            cold[0]["rchar"] / 1e6, "MB", "info"))
    imp = res["import"]
    rows.append(common.make_row("0 import nbbgtask, fresh interpreter (base: import ipywidgets), best",
                                1e3 * imp["nbbgtask"]["best_s"], 1e3 * imp["ipywidgets"]["best_s"], "ms", "ratio <= 0.5",
                                imp["nbbgtask"]["best_s"] <= 0.5 * imp["ipywidgets"]["best_s"]))
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
    cfg["cold_rounds"], cfg["import_rounds"] = (3, 5) if q else (5, 9)
    t_all, load0 = perf(), os.getloadavg()[0]
    root = tempfile.mkdtemp(prefix="nbbg-scale-")
    res: dict = {}
    try:
        print("1/5 import ...", flush=True)
        res["import"] = bench_import(cfg["import_rounds"])
        print("2/5 reads, warm ...", flush=True)
        homes: dict = {}
        res["reads"] = bench_reads(cfg["sizes"], cfg["calls"], root, homes)
        print("3/5 reads, cold ...", flush=True)
        res["cold"] = bench_cold(homes, cfg["cold_rounds"])
        for _, live, _ in homes.values():
            for status in live:
                status.cancel()
        print("4/5 monitor ...", flush=True)
        res["monitor"] = bench_monitor(cfg["monitor_finished"], 20, cfg["monitor_seconds"], root)
        print("5/5 prune ...", flush=True)
        res["prune"] = bench_prune(cfg["prune_total"], cfg["prune_keep"], root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = build_rows(res, cfg["sizes"])
    common.print_table(rows)
    total = perf() - t_all
    print(f"\nhistories built (history.py): {res['reads']['built_s']} s")
    print(common.run_line(q, total, load0))
    if args.json:
        common.write_json(args.json, common.machine(load0, ("tinydb", "psutil")), cfg, total, res, rows)


if __name__ == "__main__":
    main()
