"""Output under the bar (issue 17): what a flood of printed lines costs the kernel and the task.

1. Kernel CPU for the bar of a flooding task, in a real ipykernel driven over jupyter_client (the
   client drains iopub in a thread, as a front end does).  A task prints 10,000 lines a second
   (100 lines every 10 ms) for ``--seconds`` seconds (10).  Twice: once started with
   ``bg.run(flood); None`` (no bar: the baseline), once with its bar and output area shown
   (``bg.run(flood)`` ending the cell).  Measured over the task's run: the kernel process's CPU
   (user+sys; not the task's), and the refresher thread's own CPU (psutil, by its native id).
   Goal: the bar adds at most the refresher's budget: `_refresher.CHEAP_ROUND` rounds every
   0.1 s (1 % of a core) plus as much again for the iopub thread that sends them, so 2 % of a core.
   Informational: how many output updates the front end received, and the bytes they carried.
2. The task's own cost per print: a task prints 200,000 lines and times them (process CPU),
   by fork, the fork server and spawn; against the same loop printing to a file, block-buffered
   (Python's default, as a script's stdout redirected to a file) and line-buffered (as a task's
   stdout is: its prints keep their place among what C code and subprocesses write to the log).
   Goal: <= 1.5x the block-buffered file.

    .venv/bin/python benchmarks/bench_output.py [--seconds 10] [--quick] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from kernel_driver import Kernel  # noqa: E402

PYTHON = Path(sys.executable)

FLOOD = """
import time, sys, nbbgtask as bg
from nbbgtask.notebook import refresher as _refresher
def flood(seconds, per_tick=100, tick=0.01):
    start = time.monotonic()
    n = 0
    while time.monotonic() - start < seconds:
        for _ in range(per_tick):
            print("line", n, "of a flood of printed output")
            n += 1
        time.sleep(max(0.0, start + n / per_tick * tick - time.monotonic()))
    return n
"""


class Drain(threading.Thread):
    """Drains iopub continuously, as a front end does, counting Output widget updates."""

    def __init__(self, kernel: Kernel) -> None:
        super().__init__(daemon=True)
        self.kernel = kernel
        self.stop = threading.Event()
        self.updates = 0
        self.update_bytes = 0
        self.messages: queue.Queue = queue.Queue()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                msg = self.kernel.kc.get_iopub_msg(timeout=0.1)
            except queue.Empty:
                continue
            content = msg["content"]
            if msg["msg_type"] == "comm_msg" and "outputs" in content.get("data", {}).get("state", {}):
                self.updates += 1
                self.update_bytes += len(json.dumps(content["data"]["state"]["outputs"]))
            self.messages.put(msg)


def _shell(kernel: Kernel, code: str) -> dict:
    msg_id = kernel.kc.execute(code, allow_stdin=False)
    while True:
        reply = kernel.kc.get_shell_msg(timeout=60)
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply["content"]


def _value(kernel: Kernel, expr: str) -> str:
    msg_id = kernel.kc.execute(f"__bench = {expr}", user_expressions={"v": "__bench"}, allow_stdin=False)
    while True:
        reply = kernel.kc.get_shell_msg(timeout=60)
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply["content"]["user_expressions"]["v"]["data"]["text/plain"]


def kernel_cost(seconds: float) -> dict:
    home = tempfile.mkdtemp(prefix="nbbgtask-bench-output-")
    kernel = Kernel(env={**os.environ, "NBBGTASK_HOME": home}, python=PYTHON)
    drain = Drain(kernel)
    drain.start()
    try:
        _shell(kernel, FLOOD)
        pid = int(_value(kernel, "__import__('os').getpid()"))
        proc = psutil.Process(pid)
        results = {}
        for phase, cell in (("no bar", f"status = bg.run(flood, {seconds}); None"), ("bar", f"status = bg.run(flood, {seconds}); status")):
            before_updates, before_bytes = drain.updates, drain.update_bytes
            _shell(kernel, "import gc; gc.collect()")
            time.sleep(0.5)
            cpu0 = proc.cpu_times()
            t0 = time.monotonic()
            _shell(kernel, cell)
            refresher = int(_value(kernel, "(_refresher._refresher._thread.native_id if _refresher.refresher_running() else 0)"))
            thread0 = _thread_cpu(proc, refresher)
            _shell(kernel, f"status.wait({seconds + 30})")
            time.sleep(0.3)  # the last round
            wall = time.monotonic() - t0
            cpu1 = proc.cpu_times()
            thread1 = _thread_cpu(proc, refresher)
            lines = int(_value(kernel, "status.result()"))
            results[phase] = {
                "wall_s": round(wall, 2),
                "kernel_cpu_share": round((cpu1.user + cpu1.system - cpu0.user - cpu0.system) / wall, 4),
                "refresher_cpu_share": round((thread1 - thread0) / wall, 4) if refresher else None,
                "lines_printed": lines,
                "output_updates": drain.updates - before_updates,
                "output_update_kib": round((drain.update_bytes - before_bytes) / 1024, 1),
            }
        results["added_by_bar"] = round(results["bar"]["kernel_cpu_share"] - results["no bar"]["kernel_cpu_share"], 4)
        return results
    finally:
        drain.stop.set()
        drain.join(2)  # before the sockets close under it
        kernel.shutdown()


def _thread_cpu(proc: psutil.Process, native_id: int) -> float:
    for thread in proc.threads():
        if thread.id == native_id:
            return thread.user_time + thread.system_time
    return 0.0


PRINTS = 200_000


def _print_loop(n: int = PRINTS) -> float:
    started = time.process_time()
    for i in range(n):
        print("line", i, "of a flood of printed output")
    sys.stdout.flush()
    return (time.process_time() - started) / n


def task_cost(repeats: int = 3) -> dict:
    import nbbgtask as bg

    home = tempfile.mkdtemp(prefix="nbbgtask-bench-output-")
    bg.configure(home=home)
    out: dict = {}
    for _ in range(repeats):
        path = os.path.join(home, "plain.txt")
        for label, buffering in (("file", -1), ("file, line-buffered", 1)):
            with open(path, "w", buffering=buffering) as f:
                saved, sys.stdout = sys.stdout, f
                try:
                    out.setdefault(label, []).append(_print_loop())
                finally:
                    sys.stdout = saved
        for method in ("fork", "forkserver", "spawn"):
            bg.configure(start_method=method)
            out.setdefault(method, []).append(bg.run(_print_loop).result(timeout=300))
    med = {k: statistics.median(v) * 1e6 for k, v in out.items()}
    return {
        "us_per_print": {k: round(v, 3) for k, v in med.items()},
        "ratio_to_file": {k: round(v / med["file"], 2) for k, v in med.items() if k != "file"},
        "ratio_to_line_buffered_file": {k: round(v / med["file, line-buffered"], 2) for k, v in med.items() if not k.startswith("file")},
    }


def build_rows(res: dict) -> list[dict]:
    """The figures as rows of the results table (``common.make_row``), each goal a row run.py reads."""
    import common

    k, t = res["kernel"], res["task"]
    rows = [common.make_row("1 kernel CPU added by the bar of a flooding task (base: no bar)",
                            100 * k["bar"]["kernel_cpu_share"], 100 * k["no bar"]["kernel_cpu_share"], "% core",
                            "added <= 2 % of a core", k["added_by_bar"] <= 0.02)]
    per = t["us_per_print"]
    for method in ("fork", "forkserver", "spawn"):
        rows.append(common.make_row(f"2 a task's print, {method} (base: print to a file)", per[method], per["file"],
                                    "us", "ratio <= 1.5", t["ratio_to_file"][method] <= 1.5))
        rows.append(common.make_row(f"2 a task's print, {method} (base: line-buffered file)", per[method],
                                    per["file, line-buffered"], "us", "info"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="a shorter flood (4 s)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.quick:
        args.seconds = min(args.seconds, 4.0)
    started = time.time()
    res = {"load_at_start": os.getloadavg(), "cpus": os.cpu_count()}
    res["kernel"] = kernel_cost(args.seconds)
    res["task"] = task_cost()
    rows = build_rows(res)
    res["goals"] = {r["figure"]: r["result"] == "PASS" for r in rows if r["result"] != "-"}
    res["seconds"] = round(time.time() - started, 1)
    print(json.dumps(res, indent=2))
    if args.json:
        # the shape run.py reads from every benchmark: results, and the table with each goal
        Path(args.json).write_text(json.dumps({"results": res, "table": rows, "seconds": res["seconds"]}, indent=2))


if __name__ == "__main__":
    main()
