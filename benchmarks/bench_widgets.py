"""Widget benchmarks for nbbgtask, in a real ipykernel driven over jupyter_client.

The client drains iopub continuously in a thread (as a front end does) and timestamps every
message on arrival; cells are sent on the shell channel from the main thread.  Each section
starts a fresh kernel with its own ``NBBGTASK_HOME``.

1. Kernel cost of 100 live bars: 100 running tasks call ``bg.progress`` every 50 ms (a changing
   percent, and a message carrying ``time.time()``).  Phases alternate, baseline first: no bars
   (tasks still running) / 100 ``bg.ProgressBar`` displayed / no bars (closed) / bars again.  In
   each phase: the kernel process's CPU (user+sys, kernel only, not the tasks) over a window in
   which the client only drains iopub, then the round trip of the trivial cell ``1`` (sent,
   until both the reply and the idle status arrived).  Goals: the bars add < 2 % of one core;
   round trip with bars / without bars <= 1.2.  Informational: the round trip before any task
   started, ``bg.run()`` with the 100 tasks reporting, widget messages per second, the
   refresher's rounds (timed by a wrapper the benchmark installs in the kernel: start, wall,
   thread CPU), how old the message a bar shows is when it arrives, the tasks' CPU.
   The tasks wait for a GO file before they report, so that launching them is not slowed.
2. Change-to-bar latency: one task sets percent = k at random 250-350 ms gaps and logs
   ``time.time()`` of each change to a file; the client timestamps the first comm_msg of the
   bar's FloatProgress model that shows >= k.  Goal: p95 <= 300 ms.
3. Monitor with 200 tasks (informational): 200 sleepers report every 0.5 s; round trip before
   ``display(bg.monitor())``, while its rows are being built and after; when the front end has
   1, 50, 100, ... rows (one "Cancel" ButtonModel per row), waiting at most 60 s (25 s quick);
   the refresher's rounds meanwhile; kernel CPU share.

    .venv/bin/python benchmarks/bench_widgets.py [--quick] [--json OUT.json]

A full run takes about 4 minutes, --quick about 2 (one pair of phases instead of two, shorter
windows, 20 latency samples instead of 40, a shorter wait for the monitor; the same 100 and 200
tasks).
"""

import argparse
import json
import os
import queue
import random
import re
import shutil
import statistics
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import common  # this folder (benchmarks/) is on sys.path when a script in it is run
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from kernel_driver import Kernel  # noqa: E402

perf = time.perf_counter
median = statistics.median
_DIRS: list[str] = []
PYTHON = Path(sys.executable)  # the venv's interpreter (not resolved: that would leave the venv)
STAMP = re.compile(r"t=(\d+\.\d+)")

SETUP = r"""
import json, os, random, time
import nbbgtask as bg
from IPython.display import display
from nbbgtask.notebook import refresher as _nbbg_r
# Time every refresher round (wall and the refresher thread's own CPU), without changing it.
_ROUNDS = []
_orig_round = _nbbg_r._Refresher._round
def _timed_round(self):
    w, c = time.perf_counter(), time.thread_time()
    try:
        _orig_round(self)
    finally:
        _ROUNDS.append((w, time.perf_counter() - w, time.thread_time() - c))
_nbbg_r._Refresher._round = _timed_round

def _rounds_since(t0):
    got = [r for r in _ROUNDS if r[0] >= t0]
    print(json.dumps({"now": time.perf_counter(), "rounds": got}))

def ticker(stop_file, period, stop_at):
    go = os.path.join(os.path.dirname(stop_file), "GO")
    while not os.path.exists(go) and time.time() < stop_at:  # launching is not slowed by the others
        time.sleep(0.05)
    k = 0
    while time.time() < stop_at and not os.path.exists(stop_file):
        k += 1
        bg.progress(percent=float(k % 101), message=f"tick {k} t={time.time():.3f}")
        time.sleep(period)

def stepper(n, stamps, seed):
    rng = random.Random(seed)
    with open(stamps, "w") as f:
        for k in range(1, n + 1):
            time.sleep(rng.uniform(0.25, 0.35))
            t = time.time()
            bg.progress(percent=float(k), message=f"step {k}")
            f.write(f"{k} {t!r}\n")
            f.flush()
    time.sleep(1.0)
"""

CLEANUP = r"""
live = bg.tasks(state=["queued", "running"])
for s in live:
    s.cancel()
print(len(live))
"""


def tmpdir(prefix: str) -> str:
    path = tempfile.mkdtemp(prefix=prefix)
    _DIRS.append(path)
    return path


def p95(xs):
    return sorted(xs)[round(0.95 * (len(xs) - 1))]


def pct(xs, q):
    return sorted(xs)[round(q * (len(xs) - 1))]


class Cell:
    def __init__(self) -> None:
        self.stdout: list[str] = []
        self.error = None
        self.idle = threading.Event()
        self.t_idle = 0.0


class Session:
    """One kernel, its home folder, and an iopub pump that a front end would be."""

    def __init__(self, label: str) -> None:
        self.home = tmpdir(f"nbbg-benchw-{label}-")
        self.k = Kernel(env={**os.environ, "NBBGTASK_HOME": self.home}, python=PYTHON)
        self.kc = self.k.kc
        self._lock = threading.Lock()
        self._cells: dict[str, Cell] = {}
        self.model_of: dict[str, str] = {}
        self.counts = {"iopub": 0, "comm_open": 0, "comm_msg": 0, "comm_close": 0}
        self.cancel_buttons: list[float] = []  # arrival times (time.time()) of "Cancel" ButtonModels
        self.float_updates: list[tuple[float, str, float]] = []  # (arrival, comm_id, value)
        self.stamps: list[tuple[float, float]] = []  # (arrival, time.time() in the message shown)
        self.keep_stamps = False
        self._stop = threading.Event()
        self._pump = threading.Thread(target=self._drain, name="iopub-pump", daemon=True)
        self._pump.start()
        self.ok(SETUP)
        self.pid = int(self.ok("print(os.getpid())"))
        self.proc = psutil.Process(self.pid)

    # -- the front end ---------------------------------------------------------------------------

    def _cell(self, msg_id: str) -> Cell:
        with self._lock:
            return self._cells.setdefault(msg_id, Cell())

    def _drain(self) -> None:
        get = self.kc.iopub_channel.get_msg
        while not self._stop.is_set():
            try:
                msg = get(timeout=0.05)
            except queue.Empty:
                continue
            except Exception:  # the channel closed under us at shutdown
                if self._stop.is_set():
                    return
                raise
            now = time.time()
            self.counts["iopub"] += 1
            kind, content = msg["msg_type"], msg["content"]
            if kind == "comm_msg":
                self.counts["comm_msg"] += 1
                data = content.get("data", {})
                state = data.get("state")
                if state and data.get("method") in ("update", "echo_update"):
                    model = self.model_of.get(content["comm_id"])
                    if model == "FloatProgressModel" and "value" in state:
                        self.float_updates.append((now, content["comm_id"], state["value"]))
                    elif self.keep_stamps and model == "HTMLModel" and "value" in state:
                        m = STAMP.search(state["value"])
                        if m:
                            self.stamps.append((now, float(m.group(1))))
                continue
            if kind == "comm_open":
                self.counts["comm_open"] += 1
                state = content.get("data", {}).get("state", {})
                model = state.get("_model_name", "")
                self.model_of[content["comm_id"]] = model
                if model == "ButtonModel" and state.get("description") == "Cancel":
                    self.cancel_buttons.append(now)
                continue
            if kind == "comm_close":
                self.counts["comm_close"] += 1
                continue
            parent = msg["parent_header"].get("msg_id")
            if not parent:
                continue
            if kind == "stream" and content.get("name") == "stdout":
                self._cell(parent).stdout.append(content["text"])
            elif kind == "error":
                self._cell(parent).error = content
            elif kind == "status" and content["execution_state"] == "idle":
                cell = self._cell(parent)
                cell.t_idle = perf()
                cell.idle.set()

    def run(self, code: str, timeout: float = 120) -> tuple[Cell, float, dict]:
        """Send a cell; wait for its reply and its idle status.  (cell, round trip s, reply)"""
        t0 = perf()
        msg_id = self.kc.execute(code, allow_stdin=False)
        deadline = time.monotonic() + timeout
        while True:
            reply = self.kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        t_reply = perf()
        cell = self._cell(msg_id)
        if not cell.idle.wait(max(0.1, deadline - time.monotonic())):
            raise TimeoutError(f"no idle status for cell {code[:40]!r}")
        with self._lock:
            self._cells.pop(msg_id, None)
        return cell, max(t_reply, cell.t_idle) - t0, reply["content"]

    def ok(self, code: str, timeout: float = 120) -> str:
        cell, _, reply = self.run(code, timeout)
        if reply["status"] != "ok":
            err = cell.error or reply
            raise RuntimeError(f"cell failed: {err.get('ename')}: {err.get('evalue')}\n"
                               + "\n".join(err.get("traceback", []))[-3000:])
        return "".join(cell.stdout)

    def rtts(self, n: int) -> list[float]:
        """Round trips of the trivial cell, with a small random gap (no phase lock with the refresher)."""
        out = []
        for _ in range(n):
            _, rtt, reply = self.run("1")
            assert reply["status"] == "ok"
            out.append(rtt)
            time.sleep(random.uniform(0.005, 0.03))
        return out

    def rounds(self, since: float, until: float = float("inf")) -> list:
        """Refresher rounds that started between two kernel perf_counter() times."""
        got = json.loads(self.ok(f"_rounds_since({since!r})"))["rounds"]
        return [r for r in got if r[0] <= until]

    def clock(self) -> float:
        """The kernel's perf_counter() (CLOCK_MONOTONIC, as the rounds are stamped)."""
        return float(self.ok("print(repr(time.perf_counter()))"))

    def cpu(self) -> float:
        t = self.proc.cpu_times()
        return t.user + t.system

    def tasks_cpu(self, procs) -> float:
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def window(self, seconds: float) -> dict:
        """Only drain iopub for ``seconds``; the kernel's and the tasks' CPU shares meanwhile."""
        kids = self.proc.children(recursive=True)
        r0 = self.clock()
        c0, k0, m0, n0 = self.cpu(), self.tasks_cpu(kids), dict(self.counts), len(self.float_updates)
        psutil.cpu_percent(None)
        w0 = perf()
        time.sleep(seconds)
        wall = perf() - w0
        c1, k1, machine = self.cpu(), self.tasks_cpu(kids), psutil.cpu_percent(None)
        rounds = self.rounds(r0, r0 + wall)
        return {
            "seconds": wall,
            "kernel_cpu_pct": 100 * (c1 - c0) / wall,
            "tasks_cpu_pct": 100 * (k1 - k0) / wall,
            "machine_cpu_pct": machine,
            "tasks": len(kids),
            "comm_msg_per_s": (self.counts["comm_msg"] - m0["comm_msg"]) / wall,
            "iopub_per_s": (self.counts["iopub"] - m0["iopub"]) / wall,
            "bar_value_updates_per_s": (len(self.float_updates) - n0) / wall,
            "live_files_bytes": live_bytes(self.home),
            **{k: v for k, v in round_stats(rounds, wall).items() if k not in ("intervals_s", "walls_ms", "cpus_ms")},
        }

    def close(self) -> dict:
        """Stop every task (stop file, then cancel, then kill what is left) and the kernel."""
        out = {"cancelled": None, "killed": 0}
        try:
            kids = self.proc.children(recursive=True)
        except psutil.Error:
            kids = []
        try:
            Path(self.home, "STOP").touch()
            wait_gone(kids, 15)
            out["cancelled"] = int(self.ok(CLEANUP, timeout=120))
        except Exception as exc:  # the kill below still runs
            out["cleanup_error"] = repr(exc)
        for p in kids:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    p.kill()
                    out["killed"] += 1
            except psutil.Error:
                pass
        self._stop.set()
        self._pump.join(timeout=5)
        self.k.shutdown()
        for folder in self.k.km.kernel_spec_manager.kernel_dirs:  # the kernelspec kernel_driver wrote
            if Path(folder).name.startswith("nbbgtask-kernels-"):
                shutil.rmtree(folder, ignore_errors=True)
        return out


def live_bytes(home: str) -> int:
    """The bytes of every live task's file, ``live/*.json`` (a file that ends meanwhile counts 0)."""
    total = 0
    try:
        with os.scandir(os.path.join(home, "live")) as entries:
            for entry in entries:
                if entry.name.endswith(".json") and not entry.name.startswith("."):
                    try:
                        total += entry.stat().st_size
                    except FileNotFoundError:
                        pass
    except FileNotFoundError:
        return 0
    return total


def round_stats(rounds: list, wall: float) -> dict:
    """Refresher rounds (start, wall s, thread CPU s) seen over ``wall`` seconds."""
    starts = [r[0] for r in rounds]
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    nan = float("nan")
    return {
        "rounds": len(rounds),
        "rounds_per_s": len(rounds) / wall,
        "round_interval_s_median": median(gaps) if gaps else nan,
        "round_interval_s_max": max(gaps) if gaps else nan,
        "round_wall_ms_median": 1e3 * median(r[1] for r in rounds) if rounds else nan,
        "round_cpu_ms_median": 1e3 * median(r[2] for r in rounds) if rounds else nan,
        "refresher_thread_cpu_pct": 100 * sum(r[2] for r in rounds) / wall,
        "wall_s": wall,
        "cpu_s": sum(r[2] for r in rounds),
        "intervals_s": gaps,
        "walls_ms": [1e3 * r[1] for r in rounds],
        "cpus_ms": [1e3 * r[2] for r in rounds],
    }


def wait_gone(procs, timeout: float) -> None:
    """Until every process has exited (a zombie counts: the kernel reaps its children lazily)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = 0
        for p in procs:
            try:
                alive += p.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                pass
        if not alive:
            return
        time.sleep(0.1)


def start_tasks(s: Session, n: int, period: float, name: str) -> float:
    t0 = perf()
    s.ok(textwrap.dedent(f"""
        stop_file = os.path.join(os.environ["NBBGTASK_HOME"], "STOP")
        tasks = [bg.run(ticker, stop_file, {period}, time.time() + 900, name=f"{name}{{i}}") for i in range({n})]
        running = sum(1 for t in bg.tasks(state="running") if t.name.startswith("{name}"))
        assert running == {n}, f"{{running}} of {n} tasks running"
    """), timeout=300)
    elapsed = perf() - t0
    Path(s.home, "GO").touch()
    return elapsed


def wait_refresher(s: Session, running: bool, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if s.ok("print(_nbbg_r.refresher_running())").strip() == str(running):
            return
        time.sleep(0.2)
    raise RuntimeError(f"the refresher did not {'start' if running else 'stop'} within {timeout} s")


# -- 1. kernel cost of 100 live bars --------------------------------------------------------------


def time_runs(s: Session, n: int) -> list[float]:
    """Seconds one ``bg.run`` call (of a function that returns at once) takes in the kernel."""
    out = []
    for _ in range(n):
        out.append(float(s.ok("t0 = time.perf_counter(); bg.run(int)\nprint(repr(time.perf_counter() - t0))")))
        time.sleep(0.1)
    return out


def bench_bars(n_tasks: int, pairs: int, window_s: float, rtt_n: int, settle_s: float, runs_n: int) -> dict:
    s = Session("bars")
    try:
        s.rtts(5)
        idle = s.rtts(rtt_n)  # nothing running at all
        run_idle = time_runs(s, runs_n)
        start_s = start_tasks(s, n_tasks, 0.05, "bar")
        time.sleep(settle_s)
        run_loaded = time_runs(s, runs_n)
        phases: dict[str, list] = {"no_bars": [], "bars": []}
        stale: list[float] = []
        for _ in range(pairs):
            for phase in ("no_bars", "bars"):
                if phase == "bars":
                    s.ok("bars = [bg.ProgressBar(t) for t in tasks]\nfor b in bars: display(b)")
                    wait_refresher(s, True)
                else:
                    s.ok("for b in globals().get('bars', []): b.close()\nbars = []")
                    wait_refresher(s, False)
                time.sleep(settle_s)  # past the burst of rounds that registering 100 bars causes
                s.keep_stamps = phase == "bars"
                mark, k0, w0 = len(s.stamps), s.clock(), perf()
                w = s.window(window_s)
                w["rtt"] = s.rtts(rtt_n)
                s.keep_stamps = False
                # the refresher's rounds over the whole phase (window and round trips)
                w["phase"] = round_stats(s.rounds(k0), perf() - w0)
                stale += [arrival - t for arrival, t in s.stamps[mark:]]
                phases[phase].append(w)
        out = {"tasks": n_tasks, "start_tasks_s": start_s, "idle_rtt": idle, "run_idle": run_idle,
               "run_loaded": run_loaded, "phases": phases, "staleness": stale}
    finally:
        out_close = s.close()
    out["close"] = out_close
    return out


# -- 2. change-to-bar latency ---------------------------------------------------------------------


def bench_latency(samples: int) -> dict:
    s = Session("latency")
    try:
        stamps = os.path.join(s.home, "stamps.txt")
        k0 = s.clock()
        s.ok(f"status = bg.run(stepper, {samples}, {stamps!r}, 7)\ndisplay(bg.ProgressBar(status))")
        bars = [cid for cid, m in s.model_of.items() if m == "FloatProgressModel"]
        assert len(bars) == 1, bars
        s.ok("status.wait(timeout=120)", timeout=150)
        deadline = time.monotonic() + 20  # the bar may lag behind the task's end
        while time.monotonic() < deadline and not any(v >= samples for _, c, v in s.float_updates if c == bars[0]):
            time.sleep(0.1)
        wall = s.clock() - k0
        changes = {}
        for line in Path(stamps).read_text().split("\n"):
            if line.strip():
                k, t = line.split()
                changes[int(k)] = float(t)
        seen = [(t, v) for t, cid, v in s.float_updates if cid == bars[0]]
        lat, missed = [], []
        for k, t_change in sorted(changes.items()):
            arrival = next((t for t, v in seen if v >= k and t >= t_change - 0.05), None)
            (missed.append(k) if arrival is None else lat.append(arrival - t_change))
        exact = sum(1 for k in changes if any(v == k for _, v in seen))
        out = {"samples": samples, "latency": lat, "missed": missed, "values_shown_exactly": exact,
               "bar_updates": len(seen), "refresher": round_stats(s.rounds(k0), wall)}
    finally:
        out_close = s.close()
    out["close"] = out_close
    return out


# -- 3. monitor with 200 tasks --------------------------------------------------------------------


def bench_monitor(n_tasks: int, rtt_n: int, build_timeout: float, window_s: float, settle_s: float) -> dict:
    s = Session("monitor")
    try:
        start_s = start_tasks(s, n_tasks, 0.5, "sleeper")
        time.sleep(settle_s)
        before_w = s.window(window_s)
        before = s.rtts(rtt_n)
        k0, t0, w0 = s.clock(), perf(), time.time()
        s.ok("mon = bg.monitor()\ndisplay(mon)")
        shown_s = perf() - t0
        during = []
        while len(s.cancel_buttons) < n_tasks and perf() - t0 < build_timeout:
            during += s.rtts(1)
            time.sleep(0.1)
        build_wall = perf() - t0
        rows = len(s.cancel_buttons)
        milestones = {n: s.cancel_buttons[n - 1] - w0 for n in (1, 50, 100, 150, 200, n_tasks) if rows >= n}
        build_rounds = s.rounds(k0)
        time.sleep(settle_s)
        w = s.window(window_s)
        after = s.rtts(rtt_n)
        out = {"tasks": n_tasks, "start_tasks_s": start_s, "rtt_before": before, "rtt_building": during,
               "rtt_live": after, "display_cell_s": shown_s, "rows_at_s": milestones,
               "all_rows_s": milestones.get(n_tasks), "rows_seen": rows, "build_timeout_s": build_timeout,
               "build_rounds": [[r[0] - k0, r[1], r[2]] for r in build_rounds], "build_wall_s": build_wall,
               "build_refresher": round_stats(build_rounds, build_wall),
               "window_before": before_w, "window_live": w, "comm_opens": s.counts["comm_open"]}
    finally:
        out_close = s.close()
    out["close"] = out_close
    return out


# -- report ---------------------------------------------------------------------------------------


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def build_rows(res: dict) -> list[dict]:
    rows = []
    nan = common.nan

    def row(*args, **kwargs):
        rows.append(common.make_row(*args, **kwargs))

    b = res["bars"]
    ph = b["phases"]
    n = b["tasks"]

    def avg(phase, key, sub=None):
        return mean([(w[sub] if sub else w)[key] for w in ph[phase]])

    cpu_bars, cpu_none = avg("bars", "kernel_cpu_pct"), avg("no_bars", "kernel_cpu_pct")
    row(f"1 kernel CPU, {n} live bars (base: no bars)", cpu_bars, cpu_none, "% core", "info")
    row(f"1 kernel CPU added by {n} bars", cpu_bars - cpu_none, nan, "% core", "< 2 % of a core",
        cpu_bars - cpu_none < 2)
    phase_rounds = [w["phase"] for w in ph["bars"]]
    bars_wall = sum(p["wall_s"] for p in phase_rounds)
    row(f"1 refresher thread CPU over {bars_wall:.0f} s of bars", 100 * sum(p["cpu_s"] for p in phase_rounds) / bars_wall,
        nan, "% core", "info")
    rtt_bars = median(r for w in ph["bars"] for r in w["rtt"])
    rtt_none = median(r for w in ph["no_bars"] for r in w["rtt"])
    rtt_idle = median(b["idle_rtt"])
    row(f"1 cell '1' round trip, {n} bars (base: no bars)", 1e3 * rtt_bars, 1e3 * rtt_none, "ms", "ratio <= 1.2",
        rtt_bars <= 1.2 * rtt_none)
    row(f"1 cell '1' round trip, {n} bars (base: no tasks)", 1e3 * rtt_bars, 1e3 * rtt_idle, "ms", "info")
    row(f"1 cell '1' round trip p95, {n} bars (no bars)", 1e3 * p95([r for w in ph["bars"] for r in w["rtt"]]),
        1e3 * p95([r for w in ph["no_bars"] for r in w["rtt"]]), "ms", "info")
    rounds_n = sum(p["rounds"] for p in phase_rounds)
    row(f"1 refresher rounds in {bars_wall:.0f} s of bars (base: 1/0.1 s)", rounds_n, bars_wall / 0.1, "rounds",
        "info")
    gaps = [g for p in phase_rounds for g in p["intervals_s"]]
    walls = [x for p in phase_rounds for x in p["walls_ms"]]
    cpus = [x for p in phase_rounds for x in p["cpus_ms"]]
    if gaps:
        row("1 refresher: s between rounds, median (max)", median(gaps), max(gaps), "s", "info")
    if walls:
        row("1 refresher: one round, wall median (its CPU)", median(walls), median(cpus), "ms", "info")
    bar_updates = mean([w["bar_value_updates_per_s"] for w in ph["bars"]])
    row("1 FloatProgress updates/s, all bars together", bar_updates, nan, "1/s", "info")
    row("1 widget comm_msgs/s received (base: no bars)", avg("bars", "comm_msg_per_s"),
        avg("no_bars", "comm_msg_per_s"), "msg/s", "info")
    if b["staleness"]:
        row("1 message a bar shows: age on arrival, p50", 1e3 * median(b["staleness"]), nan, "ms", "info")
        row("1 message a bar shows: age on arrival, p95", 1e3 * p95(b["staleness"]), nan, "ms", "info")
    row(f"1 bg.run() call, {n} tasks reporting (base: none)", 1e3 * median(b["run_loaded"]),
        1e3 * median(b["run_idle"]), "ms", "info")
    row(f"1 CPU of the {n} task processes (no bars)", avg("no_bars", "tasks_cpu_pct"), nan, "% core", "info")
    row("1 machine CPU, no bars (base: bars)", avg("no_bars", "machine_cpu_pct"), avg("bars", "machine_cpu_pct"),
        "% all", "info")
    lat = res["latency"]
    if lat["latency"]:
        x = lat["latency"]
        row("2 change -> bar value on client, p50", 1e3 * median(x), nan, "ms", "info")
        row("2 change -> bar value on client, p95", 1e3 * p95(x), nan, "ms", "p95 <= 300 ms",
            p95(x) <= 0.3 and not lat["missed"])
        row("2 change -> bar value on client, max", 1e3 * max(x), nan, "ms", "info")
    row("2 values shown (base: changes made)", lat["values_shown_exactly"], lat["samples"], "values", "info")
    row("2 refresher: s between rounds (base: interval)", lat["refresher"]["round_interval_s_median"], 0.1, "s",
        "info")
    m = res["monitor"]
    k = m["tasks"]
    row(f"3 cell round trip, monitor of {k} live (base: before)", 1e3 * median(m["rtt_live"]),
        1e3 * median(m["rtt_before"]), "ms", "info")
    if m["rtt_building"]:
        row("3 cell round trip while rows are built (before)", 1e3 * median(m["rtt_building"]),
            1e3 * median(m["rtt_before"]), "ms", "info")
        row("3 ... p95 while rows are built (base: max)", 1e3 * p95(m["rtt_building"]), 1e3 * max(m["rtt_building"]),
            "ms", "info")
    row("3 display(bg.monitor()) cell", 1e3 * m["display_cell_s"], nan, "ms", "info")
    for rows_n, t in sorted(m["rows_at_s"].items(), key=lambda kv: int(kv[0])):
        row(f"3 monitor rows on the client: {rows_n} after", t, nan, "s", "info")
    if m["all_rows_s"] is None:
        row(f"3 rows on the client after {m['build_timeout_s']:.0f} s (of {k})", m["rows_seen"], k, "rows", "info")
    br = m["build_rounds"]
    if br:
        costliest = max(br, key=lambda r: r[1])
        row("3 refresher: costliest building round (its CPU)", 1e3 * costliest[1], 1e3 * costliest[2], "ms", "info")
        starts = [r[0] for r in br] + [m["build_wall_s"]]  # till the end of the wait: a round may be overdue
        row("3 refresher: longest gap between rounds, building", max(b - a for a, b in zip(starts, starts[1:],
            strict=False)), nan, "s", "info")
    row("3 kernel CPU, monitor live (base: before)", m["window_live"]["kernel_cpu_pct"],
        m["window_before"]["kernel_cpu_pct"], "% core", "info")
    row("3 widget comm_msgs/s, monitor live", m["window_live"]["comm_msg_per_s"], nan, "msg/s", "info")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer phases and samples (same task counts)")
    ap.add_argument("--json", metavar="OUT.json", help="also write all figures and machine info here")
    args = ap.parse_args()
    q = args.quick
    cfg = dict(bar_tasks=100, pairs=1 if q else 2, window_s=10.0 if q else 15.0, rtt_n=25, settle_s=2.0,
               runs_n=5, latency_samples=20 if q else 40, monitor_tasks=200, monitor_rtt_n=20 if q else 40,
               build_timeout=25.0 if q else 60.0, monitor_window_s=5.0 if q else 8.0)
    t_all, load0 = perf(), os.getloadavg()[0]
    res = {}
    sections = {
        "bars": lambda: bench_bars(cfg["bar_tasks"], cfg["pairs"], cfg["window_s"], cfg["rtt_n"], cfg["settle_s"],
                                   cfg["runs_n"]),
        "latency": lambda: bench_latency(cfg["latency_samples"]),
        "monitor": lambda: bench_monitor(cfg["monitor_tasks"], cfg["monitor_rtt_n"], cfg["build_timeout"],
                                         cfg["monitor_window_s"], cfg["settle_s"]),
    }
    try:
        for i, (key, fn) in enumerate(sections.items(), 1):
            print(f"{i}/{len(sections)} {key} ...", flush=True)
            t = perf()
            res[key] = fn()
            print(f"    {perf() - t:.0f} s; cleanup: {res[key]['close']}", flush=True)
    finally:
        for path in _DIRS:
            shutil.rmtree(path, ignore_errors=True)
    rows = build_rows(res)
    common.print_table(rows)
    total = perf() - t_all
    print("\n" + common.run_line(q, total, load0))
    if args.json:
        machine = common.machine(load0, ("ipykernel", "ipywidgets", "jupyter_client", "psutil"))
        common.write_json(args.json, machine, cfg, total, res, rows)


if __name__ == "__main__":
    main()
