"""Every nbbgtask benchmark in one run, each figure beside the baseline measured in the same run.

Runs ``bench_engine.py``, ``bench_widgets.py``, ``bench_peers.py``, ``bench_scale.py``,
``bench_output.py``, ``bench_logs.py``, ``bench_pipelines.py`` and ``bench_server.py`` one after the other (each
as its own process with ``--json``; ``--quick`` is passed on), then writes

* ``docs/benchmarks.json``: every figure, the configuration, and the machine (CPU model, cores,
  RAM, Python, OS, date, git commit);
* ``docs/benchmarks.md``: the page people read: a summary table (value, baseline, ratio, goal,
  pass or fail), the side-by-side tables, what each figure means, notes where a goal is missed
  or a figure is noisy, the machine, the date and the exact command.

    .venv/bin/python benchmarks/run.py [--quick]

A full run takes about 9 minutes, --quick about 3.  This process makes itself the "child
subreaper" (Linux), so a process any benchmark leaves behind is found here, killed and reported.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # this folder (benchmarks/) is on sys.path when run.py is run

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PYTHON = Path(sys.executable)  # the venv's interpreter (not resolved: that would leave the venv)
BENCHES = {"engine": "bench_engine.py", "widgets": "bench_widgets.py", "peers": "bench_peers.py",
           "scale": "bench_scale.py", "output": "bench_output.py", "logs": "bench_logs.py",
           "pipelines": "bench_pipelines.py", "server": "bench_server.py"}
nan = common.nan


# -- the machine -------------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _git(*args: str) -> str | None:
    return common.git(ROOT, *args)


def machine_info() -> dict:
    import psutil

    cpu_model = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                      if line.startswith("model name")), platform.processor() or "unknown")
    os_name = next((line.split("=", 1)[1].strip().strip('"') for line in _read("/etc/os-release").splitlines()
                    if line.startswith("PRETTY_NAME=")), platform.system())
    versions = common.versions(("nbbgtask", "tinydb", "cloudpickle", "psutil", "tqdm", "ipykernel",
                                "ipywidgets", "jupyter_client", "distributed", "dask"))
    changed = _git("status", "--porcelain")
    source = common.source_fingerprint(ROOT / "nbbgtask")
    lib_changed = source["changed_files"]
    return {
        "cpu_model": cpu_model,
        "logical_cpus": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "python_executable": str(PYTHON),
        "os": os_name,
        "kernel": platform.release(),
        "platform": platform.platform(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_branch": _git("rev-parse", "--abbrev-ref", "HEAD"),
        "git_changed_files": changed.splitlines() if changed else [],
        "nbbgtask_changed_files": lib_changed.splitlines() if lib_changed else [],
        "nbbgtask_source_sha256_16": source["sha256_16"],
        "versions": versions,
    }


# -- running the benchmarks --------------------------------------------------------------------


def become_subreaper() -> bool:
    """Orphans of our descendants (tasks are started in their own session) become our children."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def leftovers(grace: float = 5.0) -> list[dict]:
    """Our descendants still alive after a benchmark ended, given ``grace`` seconds to go; killed."""
    import psutil

    me = psutil.Process()
    deadline = time.monotonic() + grace
    while True:
        alive = []
        for p in me.children(recursive=True):
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
                else:
                    os.waitpid(p.pid, os.WNOHANG)  # an adopted orphan: ours to reap
            except (psutil.Error, ChildProcessError):
                pass
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    found = []
    for p in alive:
        try:
            found.append({"pid": p.pid, "cmdline": " ".join(p.cmdline())[:200]})
            p.kill()
            p.wait(5)
        except psutil.Error:
            pass
    return found


def run_bench(key: str, quick: bool, tmp: str) -> dict:
    out = os.path.join(tmp, f"{key}.json")
    cmd = [str(PYTHON), str(HERE / BENCHES[key]), "--json", out] + (["--quick"] if quick else [])
    print(f"\n=== {BENCHES[key]} {'--quick' if quick else ''}".rstrip() + " ===", flush=True)
    t0 = time.perf_counter()
    code = subprocess.run(cmd, cwd=ROOT).returncode
    shown = [f"benchmarks/{BENCHES[key]}"] + (["--quick"] if quick else [])
    entry = {"command": " ".join(shlex.quote(c) for c in shown), "exit_code": code,
             "wall_s": time.perf_counter() - t0, "leftover_processes": leftovers()}
    if entry["leftover_processes"]:
        print(f"!!! {BENCHES[key]} left {len(entry['leftover_processes'])} processes behind; killed: "
              f"{entry['leftover_processes']}", flush=True)
    try:
        with open(out) as f:
            entry.update(json.load(f))
    except (OSError, ValueError) as exc:
        entry["error"] = f"no results ({exc})"
    return entry


# -- the page ----------------------------------------------------------------------------------


def num(x, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "–"
    if isinstance(x, str):
        return x
    a = abs(x)
    text = f"{x:.0f}" if a >= 100 else f"{x:.1f}" if a >= 10 else f"{x:.2f}" if a >= 1 else f"{x:.3f}" if a else "0"
    return f"{text} {unit}".rstrip()


def ratio(x) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "–"
    return f"{x:.1f}×" if abs(x) >= 10 else f"{x:.2f}×" if abs(x) >= 0.1 else f"{x:.2g}×"


def result_cell(r: str) -> str:
    return {"PASS": "**pass**", "FAIL": "**FAIL**"}.get(r, "")


def md_table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else ":---:" if a == "c" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def find_row(bench: dict, prefix: str) -> dict | None:
    for r in bench.get("table", []):
        if r["figure"].startswith(prefix):
            return r
    return None


def summary(res: dict) -> list[dict]:
    """The figures the issue asks for, in its order; each with its baseline, goal and verdict."""
    eng, wid, peers, scale, output = (res.get(k, {}) for k in ("engine", "widgets", "peers", "scale", "output"))
    rows: list[dict] = []

    def add(area: str, label: str, bench: dict, prefix: str) -> None:
        r = find_row(bench, prefix)
        found = r or {"value": nan, "baseline": nan, "ratio": nan, "unit": "", "goal": "not measured", "result": "-"}
        source = next((k for k, b in res.items() if b is bench), "?")
        rows.append({**found, "area": area, "figure": label, "bench": source, "source": found.get("figure", prefix)})

    add("start", "bg.run → task code vs bare os.fork (median)", eng, "1 start: bg.run -> task code (median)")
    add("start", "initiate → task code vs bare os.fork (median)", eng, "1 start: initiate -> task code (median)")
    add("start", "bg.run vs multiprocessing.Process, fork", peers, "1 start: bg.run fork (base: mp.Process fork)")
    add("start", "bg.run vs ProcessPoolExecutor, cold", peers, "1 start: bg.run fork (base: ProcessPoolExecutor cold)")
    add("start", "bg.run vs ProcessPoolExecutor, warm", peers, "1 start: bg.run fork (base: ProcessPoolExecutor warm)")
    add("start", "bg.run vs Dask client.submit (warm)", peers, "1 start: bg.run fork (base: dask client.submit)")
    add("start", "start_method='auto' where a fork is safe vs 'fork' forced (median)", eng,
        "1 start: auto, fork safe (base: fork forced), median")
    add("start", "a trivial task through the fork server vs 'spawn' (median)", eng,
        "1 start: forkserver, trivial task (base: spawn), median")
    add("start", "bg.run spawn mode vs multiprocessing.Process, spawn", peers,
        "1 start: bg.run spawn (base: mp.Process spawn)")
    add("start", "nbbgtask on Dask vs plain client.submit (median)", peers,
        "1 start: bg.run dask (base: dask client.submit), median")
    add("progress", "bg.track per item vs tqdm per item", eng, "2 bg.track per-item overhead")
    add("progress", "status.update() per item vs tqdm per item", eng, "2 status.update() per-item overhead")
    add("progress", "tqdm capture in a task: added per item vs tqdm's own", eng, "2 tqdm capture: added per-item")
    add("progress", "status.update() per call (base: a no-op call)", eng, "2 status.update per call")
    add("throughput", "1,000 tasks end to end: bg.run + result() vs a Process per task", peers,
        "2 1000 tasks end to end: bg.run+result (base: mp.Process per task)")
    add("throughput", "300 tasks from a process holding 200 MB: bg.run + result() vs a Process per task", peers,
        "2 300 tasks from a process holding 200 MB: bg.run+result (base: mp.Process per task)")
    add("throughput", "300 tasks from a process holding 200 MB: the same through the fork server", peers,
        "2 300 tasks from a process holding 200 MB: bg.run forkserver+result (base: mp.Process per task)")
    add("throughput", "1,000 tasks through the fork server, its start counted, vs multiprocessing's forkserver context",
        peers, "2 1000 tasks: bg.run forkserver+result, server start counted")
    add("throughput", "300 tasks from a process holding 200 MB, the same vs multiprocessing's forkserver context",
        peers, "2 300 tasks from a process holding 200 MB: bg.run forkserver+result, server start counted")
    add("throughput", "1,000 tasks end to end through the fork server vs a Process per task", peers,
        "2 1000 tasks end to end: bg.run forkserver+result (base: mp.Process per task)")
    add("throughput", "… vs ProcessPoolExecutor", peers,
        "2 1000 tasks end to end: bg.run+result (base: ProcessPoolExecutor)")
    add("throughput", "… vs Dask client.submit + gather", peers,
        "2 1000 tasks end to end: bg.run+result (base: dask client.submit)")
    add("visibility", "update → visible to bg.get, p50 (base: a pipe)", eng, "3 visibility bg.get, p50")
    add("visibility", "update → visible to bg.get, p95 (base: a pipe)", eng, "3 visibility bg.get, p95")
    add("visibility", "update → bar value on the client, p95", wid, "2 change -> bar value on client, p95")
    for size in (1000, 3000, 10000):
        add("store", f"progress write with {size:,} finished tasks (base: 0)", eng,
            f"4 Store.patch (progress write) @{size} vs 0")
        add("store", f"bg.get of a live task with {size:,} finished (base: 0)", eng,
            f"4 bg.get(live task) @{size} vs 0")
    add("store", "a task's end (finalize) with 10,000 finished (base: 0)", eng, "4 Store.finalize (task end) @10000")
    add("store", "a task's end (finalize) with 100,000 finished (base: 0), median", eng,
        "4 Store.finalize (task end) @100000")
    add("store", "a task's end (finalize) with 100,000 finished (base: 0), mean of 2,048", eng,
        "4 Store.finalize, mean of 2048 ends @100000")
    for size in (10000, 100000):
        for read, label in (("bg.tasks(limit=20)", "bg.tasks(limit=20)"), ("bg.find_last(name=...)", "bg.find_last(name=...)"),
                            ("nbbgtask list", "`nbbgtask list`")):
            add("scale", f"a new process's first {label} with {size:,} finished, whole process (base: 0)", scale,
                f"0 cold: a new process's {read}, whole process @{size}")
    add("scale", "import nbbgtask in a fresh interpreter (base: import ipywidgets)", scale, "0 import nbbgtask")
    for size in (10000, 100000):
        for read in ("bg.get(live task)", "bg.find_last(name=...)", "bg.find_last(state='running')",
                     "bg.tasks(state='running')", "bg.tasks(limit=20)", "progress write (Store.patch)"):
            add("scale", f"{read} with {size:,} finished (base: 0)", scale, f"1 {read} @{size} vs 0")
    add("scale", "monitor refresher CPU, 100,000 finished + 20 running (base: 0 + 20)", scale,
        "2 monitor refresher cpu_percent")
    add("scale", "monitor refresh interval, 100,000 finished + 20 running (base: 0 + 20)", scale,
        "2 monitor refresher interval_s")
    add("scale", "prune 90,000 of 100,000 finished: seconds (base: today's way, same run)", scale, "3 prune ")
    add("scale", "prune: peak memory above the process's start (base: today's way)", scale, "3 prune: peak memory")
    add("scale", "prune: peak RSS of the pruning process (base: today's way)", scale, "3 prune: peak RSS")
    pipes = res.get("pipelines", {})
    add("pipelines", "prerequisite's end recorded → waiting task's code vs bg.run → task code", pipes, "2 after")
    add("pipelines", "retry: attempt 1's end → attempt 2's code vs bg.run → task code", pipes, "3 retry")
    add("store", "progress write with 100 tasks live (base: 1 live)", eng, "4 Store.patch with 100 tasks live")
    add("store", "progress write with 1,000 tasks live (base: 1 live)", eng, "4 Store.patch with 1000 tasks live")
    add("100 bars", "kernel CPU added by 100 live bars", wid, "1 kernel CPU added by")
    add("100 bars", "kernel CPU with 100 live bars (base: no bars)", wid, "1 kernel CPU, ")
    add("100 bars", "cell round trip with 100 bars (base: no bars)", wid, "1 cell '1' round trip, 100 bars (base: no bars)")
    add("memory", "USS of a forked task (base: the kernel's RSS, holding 1 GiB)", peers,
        "3 USS of a forked task (bg.run)")
    add("memory", "USS of a forked task (base: a bare os.fork child)", peers,
        "3 USS of a forked task (base: bare os.fork child)")
    add("memory", "USS of a spawned task (base: the kernel's RSS)", peers, "3 USS of a spawned task")
    logs = res.get("logs", {})
    for shape in ("big log", "32 MiB one-line log"):
        add("logs", f"last 100 lines of a {shape} (base: a 1 MiB one)", logs, f"1 last 100 lines of a {shape}")
        add("logs", "… peak memory of that read (base: a 1 MiB one)", logs, f"2 peak memory, last 100 lines of a {shape}")
    add("output", "kernel CPU added by the bar of a task printing 10,000 lines/s", output, "1 kernel CPU added by the bar")
    for method in ("fork", "forkserver", "spawn"):
        add("output", f"a task's print, {method} (base: print to a file)", output,
            f"2 a task's print, {method} (base: print to a file)")
    server = res.get("server", {})
    add("server", "progress change → the Tasks panel's row, p95", server, "1 progress change -> panel row, p95")
    add("server", "server CPU, one panel open, 20 running + 100,000 finished (base: no task)", server,
        "2 server CPU, panel open, 20 running + 100000 finished")
    add("server", "GET tasks?limit=50, warm, 100,000 finished (base: none)", server,
        "3 GET tasks?limit=50 warm @100000 vs 0")
    add("server", "… the same page of 50 (base: a history of 50)", server, "3 GET tasks?limit=50 warm @100000 vs 50")
    add("server", "GET tasks?limit=50, cold: the first after the server starts, 100,000 finished (base: none)",
        server, "3 GET tasks?limit=50 cold @100000")
    add("server", "… that first request, which reads and indexes the history once: seconds", server,
        "3 first GET tasks @100000")
    # Every goal a benchmark computed is in the summary, even one not named above.
    named = {r["source"] for r in rows}
    for key, bench in res.items():
        for r in bench.get("table", []):
            if r.get("result") in ("PASS", "FAIL") and r["figure"] not in named:
                rows.append({**r, "area": key, "bench": key, "source": r["figure"]})
    return rows


def throughput_note(tp: dict, start: dict, eng: dict, machine: dict) -> str:
    """Throughput against its goal, with what a task costs per step where another benchmark measured it."""
    nb, mp_ = tp["bg.run + result()"], tp["mp.Process per task"]
    n = tp.get("tasks", 1000)
    r = nb["median_s"] / mp_["median_s"]
    text = ""
    h = tp.get("heavy")
    fs = h.get("bg.run forkserver + result()") if h else None
    if h and fs:
        fr = fs["median_s"] / h["mp.Process per task"]["median_s"]
        text += (f"**Throughput {'meets' if fr <= 1.0 else 'misses'} its goal**: from a process holding "
                 f"{h['held_mb']} MB, {h['tasks']} trivial tasks started at once through the fork server "
                 f"(`bg.configure(start_method=\"forkserver\")`, as the README advises for such a burst) took "
                 f"{num(fs['median_s'])} s against {num(h['mp.Process per task']['median_s'])} s with one "
                 f"`multiprocessing.Process` per task ({ratio(fr)}; goal ≤ 1.0×): each task is a fork of the "
                 f"small fork server, not of the caller, and keeps the same record, log and result. ")
    text += (f"Forked, {n:,} trivial tasks took {num(nb['median_s'])} s with `bg.run` + `result()` against "
             f"{num(mp_['median_s'])} s with one `multiprocessing.Process` per task ({ratio(r)}). The {n:,} "
             f"`bg.run` calls took {num(nb['submit_median_s'])} s of it "
             f"({100 * nb['submit_median_s'] / nb['median_s']:.0f} %, {num(1e3 * nb['submit_median_s'] / n)} ms a "
             f"call); starting the {n:,} Processes took {num(mp_['submit_median_s'])} s "
             f"({num(1e3 * mp_['submit_median_s'] / n)} ms each). ")
    if h:
        hr = h["bg.run + result()"]["median_s"] / h["mp.Process per task"]["median_s"]
        text += (f"From the process holding {h['held_mb']} MB, {h['tasks']} forked tasks took {ratio(hr)} the "
                 f"Process's time. No goal asks a forked task to beat the Process: both fork the caller once per "
                 f"task, which copies its page tables (the most of either's time there), and the forked task "
                 f"also writes its record and log before it returns and its end after it, so it costs what a "
                 f"Process costs plus that, however small that is made. The forked rows are informational. ")
    text += ("What nbbgtask does per task: `bg.run` writes one small file, the task's `live/<id>.json` (taking no "
             "store lock: no `max_running` limit is set here), and forks the task, whose output goes to a log file; "
             "at its end the task takes the stripe lock of its id, rewrites its history shard's small recent file "
             "(`history/NN.recent.json`, with an fsync) with its final record, its small result kept in that record, "
             "and removes its live file (`Store.finalize`). ")
    measured = []
    if start.get("bg.run fork") and start.get("os.fork"):
        measured.append(f"one `bg.run` started alone reached the task's code in {num(start['bg.run fork']['median_ms'])} ms "
                        f"against {num(start['os.fork']['median_ms'])} ms for a bare `os.fork` of the same process "
                        f"(`bench_peers.py`)")
    fin = find_row(eng, "4 Store.finalize (task end) @")
    if fin:
        measured.append(f"one `Store.finalize` took {num(fin['baseline'])} ms with an empty history "
                        f"(`bench_engine.py`)")
    if measured:
        text += "Measured one at a time: " + "; ".join(measured) + ". "
    if h:
        text += cpu_split(h, machine["logical_cpus"])
    text += ("A pool (`ProcessPoolExecutor`, Dask) reuses its workers and keeps no per-task record; on trivial "
             f"tasks nbbgtask took {ratio(nb['median_s'] / tp['dask client.submit']['median_s'])} Dask's time and "
             f"{ratio(nb['median_s'] / tp['ProcessPoolExecutor']['median_s'])} the pool's. nbbgtask is made for "
             "long tasks, where a start that costs milliseconds is small against the work.")
    if tp.get("rounds", 0) < 2:
        text += f" Only {tp.get('rounds', 0)} round was measured (--quick)."
    return text


def cpu_split(h: dict, cpus: int) -> str:
    """Where the CPU time of the 200 MB case went, per task, for each way (``bench_peers.py``), and
    how busy that kept the machine's CPUs."""
    parts = []
    for key, label in (("mp.Process per task", "a Process per task"), ("bg.run + result()", "forked"),
                       ("bg.run forkserver + result()", "through the fork server")):
        c = h.get(key, {}).get("cpu_ms_per_task")
        if not c:
            return ""
        total = sum(c.values())
        busy = 100 * total * h["tasks"] / 1e3 / (h[key]["median_s"] * cpus)
        server = f", the fork server {num(c['server'])} ms" if "server" in c else ""
        parts.append(f"{label}, {num(total)} ms (the caller {num(c['caller'])} ms{server}, the task processes "
                     f"{num(c['tasks'])} ms; {busy:.0f} % of the {cpus} CPUs over the run)")
    return "CPU time per task in the 200 MB case (user and system, medians of the rounds): " + "; ".join(parts) + ". "


def live_write_text(eng: dict) -> str:
    """A progress write's CPU time with 1, 100 and 1,000 tasks live (``bench_engine.py``), or nothing."""
    p100 = find_row(eng, "4 ... its CPU time, 100 live")
    p1000 = find_row(eng, "4 ... its CPU time, 1000 live")
    if not p100:
        return ""
    ratios = [r["ratio"] for r in (p100, p1000) if r and r["ratio"] == r["ratio"]]
    grew = ""
    if ratios:
        worst = max(ratios)
        grew = (f" (at most {ratio(worst)})" if worst <= 1.5 else
                f" (up to {ratio(worst)}: it still grows with the number of live tasks)")
    return (f"Each of those tasks' progress writes rewrites only its own live file (`live/<id>.json`); in "
            f"`bench_engine.py` a write's CPU time was {num(p100['value'])} ms with 100 tasks live"
            + (f" and {num(p1000['value'])} ms with 1,000" if p1000 else "")
            + f", against {num(p100['baseline'])} ms with one{grew}. ")


def notes(res: dict, machine: dict) -> list[str]:
    """Honest notes, written from the figures: what missed its goal and why, what is noisy."""
    out: list[str] = []
    eng, wid, peers = (res.get(k, {}) for k in ("engine", "widgets", "peers"))
    pr = peers.get("results", {})
    start, tp, mem = pr.get("start", {}), pr.get("throughput", {}), pr.get("memory", {})
    if start:
        dask, plain, fresh = (start[k]["median_ms"] for k in ("bg.run dask", "dask client.submit",
                                                               "subprocess python -c"))
        verdict = "meets" if dask <= 1.5 * plain else "misses"
        out.append(
            f"**nbbgtask on Dask {verdict} its start goal** ({num(dask)} ms vs {num(plain)} ms for a plain "
            f"`client.submit`, {ratio(dask / plain)}; goal ≤ 1.5×). A plain `client.submit` runs the function "
            f"in a worker thread that is already up. nbbgtask runs each task in a child process of its own, so "
            f"that a cancel can stop it for real and its output can be captured: each worker keeps one idle "
            f"spare child, forked ahead of time by a small forker process (so the worker itself forks once), "
            f"and `run_on_worker` (`nbbgtask/dask/worker.py`), a coroutine on the worker's event loop, hands "
            f"the ready spare its job over a pipe; the kernel sends the task before it records it in its "
            f"store. What remains beyond a plain submit is that store write in the kernel, the hand-over, "
            f"and the child's unpickling of the job."
            + ("" if verdict == "meets" else " Where this run's time went among those steps was not measured.")
        )
        fork_ratio = start["bg.run fork"]["median_ms"] / start["os.fork"]["median_ms"]
        eng_start = eng.get("results", {}).get("start", {})
        small = (f" (a bare fork: {num(eng_start['fork']['median_ms'])} ms in `bench_engine.py`, "
                 f"{num(start['os.fork']['median_ms'])} ms in `bench_peers.py`)") if "fork" in eng_start else ""
        out.append(
            f"Start latency is measured twice: by `bench_engine.py`, in a small process (its goal: `bg.run` "
            f"≤ 2× a bare `os.fork`), and by `bench_peers.py`, in a process that also hosts the Dask scheduler "
            f"and two clients, which is bigger to copy{small}. In `bench_peers.py`, `bg.run` took "
            f"{ratio(fork_ratio)} a bare fork. Compare medians: the p95 of every method is well above its median on this shared machine.")
    if tp:
        out.append(throughput_note(tp, start, eng, machine))
    if mem:
        out.append(
            f"Memory: a forked task shares the kernel's pages copy-on-write; its unique memory (USS) was "
            f"{num(mem['bg.run fork']['uss_mb'])} MB next to a kernel RSS of {num(mem['kernel']['rss_mb'])} MB "
            f"(a bare `os.fork` child: {num(mem['os.fork']['uss_mb'])} MB). Its RSS "
            f"({num(mem['bg.run fork']['rss_mb'])} MB) counts the shared pages too: summing RSS over tasks "
            f"overstates what they use. A spawned task does not hold the kernel's data at all "
            f"(USS {num(mem['bg.run spawn']['uss_mb'])} MB) but must be sent what it needs.")
    def w(prefix: str) -> dict | None:
        return find_row(wid, prefix)

    covered = ["1 start: bg.run dask", "2 1000 tasks"]
    rtt, lat, tasks_cpu = w("1 cell '1' round trip, 100 bars (base: no bars)"), w("2 change -> bar value on client, p95"), \
        w("1 CPU of the ")
    if rtt and lat and tasks_cpu:
        covered += ["1 cell '1' round trip", "2 change -> bar value"]
        added = w("1 kernel CPU added by")
        machine_cpu = w("1 machine CPU, no bars")
        text = (f"**100 live bars**: the CPU they add to the kernel was {num(added['value'])} % of a core "
                f"(goal < 2 %, {'met' if added['result'] == 'PASS' else 'missed'}); the round trip of a cell was "
                f"{num(rtt['value'])} ms with the bars against {num(rtt['baseline'])} ms without "
                f"({ratio(rtt['ratio'])}, goal ≤ 1.2×: {'met' if rtt['result'] == 'PASS' else 'missed'}). ")
        both = rtt["result"] == "PASS"
        rnd = w("1 refresher: one round, wall median")
        text += ("Both phases run the same 100 reporting tasks, and those used "
                 f"{num(tasks_cpu['value'])} % of a core between them" +
                 (f" (the whole machine: {num(machine_cpu['value'])} % busy without bars)" if machine_cpu else "") +
                 f" on this {machine['logical_cpus']}-CPU machine, so the kernel's threads wait for CPU"
                 + (f": a refresher round took {num(rnd['value'])} ms of wall time for {num(rnd['baseline'])} ms "
                    f"of CPU" if rnd else "")
                 + (". The round-trip figure swings widely from run to run under such load"
                    if not both else "")
                 + (f". A round-trip ratio below 1 ({ratio(rtt['ratio'])} here) means the no-bar phases happened "
                    f"to be the slower ones: noise, not a speed-up" if rtt["ratio"] < 0.8 else "") + ". ")
        text += live_write_text(eng)
        age50, age95 = w("1 message a bar shows: age on arrival, p50"), w("1 message a bar shows: age on arrival, p95")
        gap = w("1 refresher: s between rounds")
        if age50 and age95 and gap and rnd:
            text += (f"The bars also lag: the refresher holds itself to half a percent of a core (`BUDGET = 0.005`, "
                     f"at most `MAX_PAUSE = 5` s between rounds, `nbbgtask/notebook/refresher.py`); with 100 bars a round "
                     f"took {num(rnd['baseline'])} ms of its CPU, so rounds came every {num(gap['value'])} s, and "
                     f"the message a bar showed was {num(age50['value'] / 1e3)} s old on arrival at p50 "
                     f"({num(age95['value'] / 1e3)} s at p95). Averages over a few 10–15 s windows: a difference "
                     f"of a fraction of a percent of a core is within the noise.")
        out.append(text)
        ref = wid.get("results", {}).get("latency", {}).get("refresher", {})
        lat_text = (f"**Bar latency** (one task that changes its percent every 250–350 ms, one bar, a kernel of its "
                    f"own): a change reached the bar on the client within {num(lat['value'])} ms at p95 (goal ≤ "
                    f"300 ms: {'met' if lat['result'] == 'PASS' else 'missed'}).")
        if ref.get("round_interval_s_median") is not None:
            lat_text += (f" The refresher's rounds came every {num(ref['round_interval_s_median'])} s at the median "
                         f"and at most {num(ref['round_interval_s_max'])} s apart, a round costing "
                         f"{num(ref['round_wall_ms_median'])} ms")
            lat_text += (": a gap that long after so cheap a round (the next is due 0.1 s later) means the "
                         "refresher thread did not get to run on time; the machine was busy (see the load below)."
                         if ref["round_interval_s_max"] > 0.5 else ".")
        out.append(lat_text)
    es = eng.get("results", {}).get("start", {})
    erow = find_row(eng, "1 start: bg.run -> task code (median)")
    if es and erow and erow["result"] == "FAIL":
        covered.append("1 start: ")
        own = es["run"]["median_ms"] - es["fork"]["median_ms"]
        peer_ratio = (f"; in `bench_peers.py`, in the same run, `bg.run` took "
                      f"{ratio(start['bg.run fork']['median_ms'] / start['os.fork']['median_ms'])} a bare fork"
                      if start else "")
        out.append(
            f"**`bg.run` start missed its goal in `bench_engine.py`**: {num(es['run']['median_ms'])} ms against "
            f"{num(es['fork']['median_ms'])} ms for a bare `os.fork` ({ratio(erow['ratio'])}, goal ≤ 2×; "
            f"`initiate`: {num(es['initiate']['median_ms'])} ms){peer_ratio}. nbbgtask's own part of a start was "
            f"{num(own)} ms, not broken down further by this benchmark. It covers: before the fork, writing the "
            f"task's own live file (`live/<id>.json`, no lock without a `max_running` limit) and opening its log; "
            f"in the child, before the task's code, a process group of its own, output to the log file, the "
            f"inherited sockets released and the progress thread started. The ratio moves with the machine's "
            f"load from run to run.")
    for bench, key in ((eng, "engine"), (wid, "widgets"), (peers, "peers")):
        for r in bench.get("table", []):
            if r.get("result") == "FAIL" and not r["figure"].startswith(tuple(covered)):
                out.append(f"**Missed** ({BENCHES[key]}): {r['figure']}: {num(r['value'])} {r['unit']} "
                           f"against {num(r['baseline'])} (goal {r['goal']}).")
    if start:
        noisy = [k for k, v in start.items() if v["p95_ms"] > 3 * v["median_ms"]]
        if len(noisy) > len(start) / 2:
            out.append(f"In this run the p95 of {len(noisy)} of the {len(start)} start methods was more than 3× "
                       f"their median: the machine was busy throughout (see the load below). Their medians are "
                       f"still comparable, the measurements being interleaved.")
        elif noisy:
            out.append(f"Noisy start figures (p95 more than 3× the median): {', '.join(noisy)}.")
    run_row, cpu_row = find_row(wid, "1 bg.run() call, "), find_row(wid, "1 CPU of the ")
    if run_row and run_row["ratio"] == run_row["ratio"] and run_row["ratio"] > 5:
        out.append(
            f"`bench_widgets.py` also saw one `bg.run()` call in the kernel take {num(run_row['value'])} ms while "
            f"100 tasks call `bg.progress` every 50 ms, against {num(run_row['baseline'])} ms with none "
            f"({ratio(run_row['ratio'])}; informational there)"
            + (f", while those 100 tasks used {num(cpu_row['value'])} % of a core between them" if cpu_row else "")
            + f" on this {machine['logical_cpus']}-CPU machine. Starting a task takes no lock that their progress "
              "writes take (without a `max_running` limit it writes a new live file of its own, then forks); "
              "where the extra time went was not measured.")
    # the engine's start figure next to the other start notes
    miss = [n for n in out if n.startswith("**`bg.run` start missed")]
    if miss and len(out) > 2:
        out.remove(miss[0])
        out.insert(2, miss[0])
    out += res.get("server", {}).get("results", {}).get("notes", [])  # bench_server.py writes its own
    load = machine.get("loadavg_start")
    if load:
        out.append(f"The machine is a shared {machine['logical_cpus']}-CPU virtual machine; its load average "
                   f"before the run was {num(load[0])} (1 min), {num(load[1])} (5 min), {num(load[2])} (15 min). "
                   f"`bench_widgets.py` itself runs 100–200 task processes, which raises the load average "
                   f"the next benchmark starts with. Every figure is a median over interleaved rounds, so a "
                   f"measurement and its baseline saw the same load, but absolute times vary from run to run.")
    return out


EXPLAIN = """\
- **Start latency**: from just before the call that starts the work (`bg.run(fn)`, `Task.initiate()`,
  `Process.start()`, `pool.submit`, `client.submit`, `os.fork()`) until the first line of the task's code,
  which stamps `time.perf_counter()` (CLOCK_MONOTONIC, one clock for every process on the machine) and
  sends it back through a pipe. *Cold* `ProcessPoolExecutor`: the pool is made for the call; *warm*: its
  workers already run. The Dask cluster is a warm `LocalCluster` (2 worker processes, 1 thread each).
- **Progress overhead**: inside a running task, the time a loop spends per item on `bg.track` (or on a
  `status.update(percent=…)` call per item) over the bare loop, against `tqdm` over the same loop
  (writing to a string buffer). `status.update` per call is measured in a tight loop against a no-op call.
- **Throughput**: 1,000 tasks that return their argument, from the first submit until every result is in
  the caller. nbbgtask: `bg.run` then `status.result()` for each, so every task has a persistent status,
  log and result (a result this small is kept in the task's record, not a file of its own); a `Process`
  per task: fork, result through a `SimpleQueue`.
- **Visibility**: a task calls `status.update(percent=p)`; the caller polls `bg.get(id).percent` every
  millisecond until it sees `p` (baseline: the update's time arriving through a pipe). The widget
  figure is the time until the bar's new value reaches a client of a real kernel.
- **Store cost**: a progress write and a `bg.get` of a live task with 0 and with 1,000, 3,000 or 10,000
  finished tasks kept in the history (spread over 64 shards by id), and a task's end (`Store.finalize`,
  which rewrites one shard); a progress write with 1, 100 and 1,000 tasks live at once (each live task
  has a file of its own, `live/<id>.json`, which is all a progress write rewrites).
- **100 live bars**: a real ipykernel shows 100 `bg.ProgressBar`s of tasks that report every 50 ms; the
  kernel process's CPU (the tasks not counted) and the round trip of the cell `1`, against the same
  kernel with the tasks running and no bars shown.
- **Memory**: a real ipykernel holds a 1 GiB `bytearray` with every page written; a task it starts
  sleeps while its unique set size (USS: the pages only it maps; `psutil.Process.memory_full_info()`)
  is sampled every 0.1 s (peak kept), set against the kernel's RSS.
"""


def render(doc: dict) -> str:
    m, res = doc["machine"], doc["benchmarks"]
    lines = [
        "# Benchmarks",
        "",
        "nbbgtask against the baselines and peers it replaces, every ratio taken against a baseline "
        "measured in the same run (interleaved rounds, medians). This page and "
        "[`benchmarks.json`](benchmarks.json) are written by `benchmarks/run.py`; do not edit them by hand.",
        "",
        f"- **Command**: `{doc['command']}` ({'quick' if doc['quick'] else 'full'} run, "
        f"{doc['seconds'] / 60:.1f} minutes)",
        f"- **Date**: {doc['date']}",
        f"- **Machine**: {m['cpu_model']}, {m['logical_cpus']} logical CPUs ({m['physical_cores']} cores "
        f"reported), {m['ram_gb']} GB RAM; {m['os']}, Linux {m['kernel']}; {m['python']}",
        f"- **Code**: commit `{(m['git_commit'] or 'unknown')[:12]}`"
        + (f"; nbbgtask's own files differ from it in the working tree: "
           f"{', '.join('`' + f.split()[-1] + '`' for f in m['nbbgtask_changed_files'])}"
           if m.get("nbbgtask_changed_files") else "; nbbgtask's files as committed")
        + f" (source hash `{m.get('nbbgtask_source_sha256_16', '?')}`)",
        "",
    ]
    failed = [k for k, b in res.items() if b.get("exit_code") or b.get("error")]
    if failed:
        lines += [f"> **Incomplete**: {', '.join(BENCHES[k] for k in failed)} failed (see the exit codes in "
                  f"the JSON); their figures are missing below.", ""]
    short = doc.get("in_short")
    if short:
        lines += ["## In short", "", short, ""]
    lines += ["## Summary", "",
              "Ratio = value / baseline; lower is better throughout. A goal applies to the ratio unless it "
              "names a unit. *From*: the benchmark that measured it (`engine`: `bench_engine.py`, `widgets`: "
              "`bench_widgets.py`, `peers`: `bench_peers.py`).", ""]
    rows = []
    for r in doc["summary"]:
        rows.append([r["area"], r["figure"], num(r["value"], r["unit"]), num(r["baseline"], r["unit"]),
                     ratio(r["ratio"]), r["goal"] if r["goal"] != "info" else "", result_cell(r["result"]),
                     r.get("bench", "")])
    lines += [md_table(["area", "figure", "value", "baseline", "ratio", "goal", "result", "from"], rows,
                       "llrrrlll"), ""]

    pr = res.get("peers", {}).get("results", {})
    if pr.get("start"):
        s = pr["start"]
        fork, nb = s["os.fork"]["median_ms"], s["bg.run fork"]["median_ms"]
        lines += ["## Start latency, side by side", "",
                  f"Call → first line of task code, {len(s['os.fork']['samples_ms'])} interleaved rounds "
                  "(`bench_peers.py`).", ""]
        order = sorted(s, key=lambda k: s[k]["median_ms"])
        trows = [[("**" + k + "**") if k.startswith(("bg.", "initiate")) else k, num(s[k]["median_ms"]),
                  num(s[k]["p95_ms"]), ratio(s[k]["median_ms"] / fork), ratio(s[k]["median_ms"] / nb)]
                 for k in order]
        lines += [md_table(["method", "median ms", "p95 ms", "× os.fork", "× bg.run"], trows), ""]
    if pr.get("throughput"):
        t = pr["throughput"]
        nb = t["bg.run + result()"]["median_s"]
        keys = [k for k in t if isinstance(t[k], dict) and k != "heavy"]
        lines += ["## Throughput, side by side", "",
                  f"{t['tasks']:,} trivial tasks end to end, median of {t['rounds']} interleaved "
                  f"round{'s' if t['rounds'] != 1 else ''}.", ""]
        trows = [[("**" + k + "**") if k.startswith("bg.") else k, num(t[k]["median_s"]),
                  num(t[k]["submit_median_s"]), num(t[k]["tasks_per_s"]), ratio(nb / t[k]["median_s"])]
                 for k in sorted(keys, key=lambda k: t[k]["median_s"])]
        lines += [md_table(["method", "end to end s", "submitting s", "tasks/s", "bg.run ÷ this"], trows), ""]
        h = t.get("heavy")
        if h:
            hk = [k for k in h if isinstance(h[k], dict)]
            lines += [f"{h['tasks']:,} trivial tasks from the same process while it holds {h['held_mb']} MB (every page "
                      f"written), median of {len(h[hk[0]]['samples_s'])} interleaved rounds.", ""]
            hnb = h["bg.run + result()"]["median_s"]
            trows = [[("**" + k + "**") if k.startswith("bg.") else k, num(h[k]["median_s"]),
                      num(h["tasks"] / h[k]["median_s"]), ratio(hnb / h[k]["median_s"])]
                     for k in sorted(hk, key=lambda k: h[k]["median_s"])]
            lines += [md_table(["method", "end to end s", "tasks/s", "bg.run ÷ this"], trows), ""]
    if pr.get("memory"):
        mm = pr["memory"]
        k = mm["kernel"]
        lines += ["## Memory of a task, kernel holding 1 GiB", "",
                  f"Kernel: RSS {num(k['rss_mb'])} MB, USS {num(k['uss_mb'])} MB.", ""]
        trows = [[kind, num(mm[kind]["uss_mb"]), num(mm[kind]["rss_mb"]), f"{100 * mm[kind]['uss_mb'] / k['rss_mb']:.2f} %"]
                 for kind in ("bg.run fork", "os.fork", "bg.run spawn") if kind in mm]
        lines += [md_table(["task", "USS MB", "RSS MB", "USS / kernel RSS"], trows), ""]
    lines += ["## What the figures mean", "", EXPLAIN]
    lines += ["## Notes", ""] + [f"- {n}" for n in doc["notes"]] + [""]
    lines += ["## Every figure", "",
              "Every row each benchmark printed; rows without a goal are informational. Sections: "
              + ", ".join(f"`{v}`" for v in BENCHES.values()) + ".", ""]
    for key, bench in res.items():
        lines += [f"### {BENCHES[key]}", ""]
        if bench.get("error"):
            lines += [f"No figures: {bench['error']} (exit code {bench.get('exit_code')}).", ""]
            continue
        doc_line = f"`{bench['command']}`, {bench['wall_s']:.0f} s"
        ma = bench.get("machine", {})
        when = str(ma.get("date", ""))
        commit = (ma.get("nbbgtask_source") or {}).get("commit") or "?"
        page_commit = str((doc.get("machine") or {}).get("git_commit") or "")
        # run with --only, merged in later: another day, or another commit than the page's
        if (when[:10] and when[:10] != str(doc.get("date_iso", ""))[:10]) or (
            commit != "?" and page_commit and not page_commit.startswith(commit[:12])
        ):
            doc_line += f", measured on its own on {when[:16].replace('T', ' ')} UTC at commit `{commit[:12]}`"
        if "loadavg_start" in ma:
            end = ma.get("loadavg_end")
            end = end[0] if isinstance(end, list) else end
            doc_line += f"; load average {num(ma['loadavg_start'])} at its start, {num(end)} at its end"
        lines += [doc_line + ".", ""]
        trows = [[r["figure"], num(r["value"]), num(r["baseline"]), ratio(r["ratio"]), r["unit"],
                  r["goal"] if r["goal"] != "info" else "", result_cell(r["result"])] for r in bench.get("table", [])]
        lines += [md_table(["figure", "value", "baseline", "ratio", "unit", "goal", "result"], trows, "lrrrlll"), ""]
        if bench.get("leftover_processes"):
            lines += [f"It left {len(bench['leftover_processes'])} processes behind (killed by run.py): "
                      f"`{bench['leftover_processes']}`", ""]
    lines += ["## Machine", "", "```", json.dumps(m, indent=2), "```", ""]
    return "\n".join(lines)


def in_short(res: dict) -> str | None:
    """One paragraph with the ratios, for quoting (the README)."""
    pr = res.get("peers", {}).get("results", {})
    er = res.get("engine", {}).get("results", {})
    if not pr.get("start") or not pr.get("throughput") or not pr.get("memory"):
        return None
    s, t, m = pr["start"], pr["throughput"], pr["memory"]
    med = {k: v["median_ms"] for k, v in s.items()}
    parts = [
        f"`bg.run` starts a task in {num(med['bg.run fork'])} ms, {ratio(med['bg.run fork'] / med['os.fork'])} a "
        f"bare `os.fork` and {ratio(med['bg.run fork'] / med['mp.Process fork'])} a `multiprocessing.Process`; "
        f"spawn mode {num(med['bg.run spawn'])} ms ({ratio(med['bg.run spawn'] / med['mp.Process spawn'])} "
        f"`multiprocessing` spawn); on Dask {num(med['bg.run dask'])} ms, "
        f"{ratio(med['bg.run dask'] / med['dask client.submit'])} a plain `client.submit`.",
    ]
    o = er.get("overheads")
    if o:
        parts.append(f"`bg.track` costs {num(o['track_ns'])} ns per item ({ratio(o['track_ns'] / o['tqdm_ns'])} "
                     f"tqdm's overhead); a `status.update()` call per item {num(o['update_item_ns'])} ns "
                     f"({ratio(o['update_item_ns'] / o['tqdm_ns'])} tqdm's).")
    nb = t["bg.run + result()"]["median_s"]
    parts.append(f"1,000 trivial tasks, each with a persistent status, take {num(nb)} s end to end: "
                 f"{ratio(nb / t['mp.Process per task']['median_s'])} one `multiprocessing.Process` per task.")
    h = t.get("heavy", {})
    if "bg.run forkserver + result()" in h:
        base = h["mp.Process per task"]["median_s"]
        parts.append(f"From a process holding {h['held_mb']} MB, {h['tasks']} tasks through the fork server take "
                     f"{ratio(h['bg.run forkserver + result()']['median_s'] / base)} the time of a Process per task "
                     f"(forked: {ratio(h['bg.run + result()']['median_s'] / base)}).")
    parts.append(f"A forked task of a kernel holding 1 GiB has {num(m['bg.run fork']['uss_mb'])} MB of memory "
                 f"of its own ({100 * m['bg.run fork']['uss_mb'] / m['kernel']['rss_mb']:.1f} % of the kernel's RSS).")
    return " ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="every benchmark with --quick (about 3 minutes)")
    ap.add_argument("--out", default=str(ROOT / "docs"), help="folder for benchmarks.md and benchmarks.json")
    ap.add_argument("--only", action="append", choices=list(BENCHES), help="run only these (development)")
    ap.add_argument("--rerender", action="store_true",
                    help="measure nothing: rewrite benchmarks.md (and the summary) from the benchmarks.json there")
    args = ap.parse_args()
    if args.rerender:
        path = Path(args.out) / "benchmarks.json"
        doc = json.loads(path.read_text())
        doc["summary"] = summary(doc["benchmarks"])
        doc["notes"] = notes(doc["benchmarks"], doc["machine"])
        doc["in_short"] = in_short(doc["benchmarks"])
        path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        (Path(args.out) / "benchmarks.md").write_text(render(doc))
        print(f"rewrote {Path(args.out) / 'benchmarks.md'} from {path}")
        return
    command = ".venv/bin/python benchmarks/run.py" + (" --quick" if args.quick else "")
    if args.only:
        command += "".join(f" --only {k}" for k in args.only)
    reaper = become_subreaper()
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    machine = machine_info()
    machine["loadavg_start"] = os.getloadavg()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="nbbg-bench-run-") as tmp:
        for i, key in enumerate(args.only or list(BENCHES)):
            if i:
                time.sleep(5)  # let the previous benchmark's processes and files go
            results[key] = run_bench(key, args.quick, tmp)
    machine["loadavg_end"] = os.getloadavg()
    machine["subreaper"] = reaper
    doc = {
        "command": command,
        "quick": args.quick,
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "date_iso": started.isoformat(),
        "seconds": time.perf_counter() - t0,
        "machine": machine,
        "summary": [],
        "notes": [],
        "benchmarks": results,
    }
    doc["summary"] = summary(results)
    doc["notes"] = notes(results, machine)
    doc["in_short"] = in_short(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    (out / "benchmarks.md").write_text(render(doc))
    print(f"\nwrote {out / 'benchmarks.md'} and {out / 'benchmarks.json'} "
          f"({doc['seconds'] / 60:.1f} minutes)")
    print("\nsummary:")
    for r in doc["summary"]:
        print(f"  {r['bench']:<7} {r['area']:<10} {r['figure']:<66} {num(r['value'], r['unit']):>12} {num(r['baseline'], r['unit']):>12} "
              f"{ratio(r['ratio']):>8}  {r['goal'] if r['goal'] != 'info' else '':<16} {r['result'] if r['result'] != '-' else ''}")
    if any(b.get("exit_code") for b in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
