"""Reading the end of a big log (issue 25): what ``status.log(tail=100)`` (`store.tail.last_lines`)
costs on a log of 1 GiB, and on a log of 32 MiB that is one line (a ``\\r`` progress meter), each
against the same read of a 1 MiB log of the same shape, measured in one run.

For each log: the median wall time of ``last_lines(path, 100)`` over ``--calls`` calls (the file is
in the page cache after the first), and the peak of the memory Python allocated for one call
(tracemalloc).  Goal: each ratio to its 1 MiB baseline <= 1.5 (time) and flat peak memory (<= 1.5).
Also, informational: `follow` from the end of the 1 GiB log (``nbbgtask logs -n 5 -f``'s start).

    .venv/bin/python benchmarks/bench_logs.py [--quick] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import common  # this folder (benchmarks/) is on sys.path when run from it

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nbbgtask.store.tail import follow, last_lines  # noqa: E402

MiB = 1024 * 1024
LINE = b"%09d a line of a task's log, as print() writes it, about eighty bytes long ....\n"


def make_log(path: Path, size: int, one_line: bool) -> None:
    """``size`` bytes of lines of about 80 bytes, or one line of ``\\r`` redraws and no newline."""
    block = b"".join(LINE % i for i in range(MiB // 80))[: MiB - 1] + b"\n"
    if one_line:
        block = (b"\r" + b"y" * 99) * (MiB // 100)
        block += b"y" * (MiB - len(block))
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(block)
    os.chmod(path, 0o600)


def measure(path: Path, calls: int) -> dict:
    last_lines(path, 100)  # the page cache warm, as for a log a task has just written
    times = []
    for _ in range(calls):
        began = time.perf_counter()
        last_lines(path, 100)
        times.append((time.perf_counter() - began) * 1000)
    tracemalloc.start()
    text = last_lines(path, 100)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"ms": statistics.median(times), "peak_mb": peak / MiB, "returned_kb": len(text.encode()) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a 256 MiB log instead of 1 GiB, fewer calls")
    ap.add_argument("--json", metavar="OUT.json", help="also write all figures and machine info here")
    args = ap.parse_args()
    big = (256 if args.quick else 1024) * MiB
    cfg = {"big_log_mb": big // MiB, "one_line_mb": 32, "base_mb": 1, "calls": 20 if args.quick else 50, "tail_lines": 100}
    t_all, load0 = time.perf_counter(), os.getloadavg()[0]
    root = Path(tempfile.mkdtemp(prefix="nbbg-logs-"))
    res: dict = {}
    try:
        logs = {
            "lines_base": (MiB, False), "lines_big": (big, False),
            "one_line_base": (MiB, True), "one_line_big": (32 * MiB, True),
        }
        for name, (size, one_line) in logs.items():
            print(f"{name}: writing {size // MiB} MiB ...", flush=True)
            make_log(root / f"{name}.log", size, one_line)
            res[name] = measure(root / f"{name}.log", cfg["calls"])
        began = time.perf_counter()
        end = os.path.getsize(root / "lines_big.log")
        chunk, _ = follow(root / "lines_big.log", end)
        res["follow_from_end_ms"] = (time.perf_counter() - began) * 1000
    finally:
        shutil.rmtree(root, ignore_errors=True)
    size = f"{big // MiB:,} MiB" if big < 1024 * MiB else "1 GiB"
    rows = []
    for shape, label in (("lines", f"big log ({size})"), ("one_line", "32 MiB one-line log")):
        value, base = res[f"{shape}_big"], res[f"{shape}_base"]
        rows.append(common.make_row(f"1 last 100 lines of a {label} vs 1 MiB", value["ms"], base["ms"], "ms",
                                    "ratio <= 1.5", value["ms"] <= 1.5 * base["ms"]))
        rows.append(common.make_row(f"2 peak memory, last 100 lines of a {label} vs 1 MiB", value["peak_mb"],
                                    base["peak_mb"], "MB", "ratio <= 1.5", value["peak_mb"] <= 1.5 * base["peak_mb"]))
    rows.append(common.make_row(f"3 follow from the end of a {size} log (logs -n 5 -f)", res["follow_from_end_ms"],
                                float("nan"), "ms", "info"))
    common.print_table(rows)
    total = time.perf_counter() - t_all
    print(common.run_line(args.quick, total, load0))
    if args.json:
        common.write_json(args.json, common.machine(load0, ("psutil",)), cfg, total, res, rows)


if __name__ == "__main__":
    main()
