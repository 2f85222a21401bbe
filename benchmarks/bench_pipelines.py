"""Pipelines: how soon a waiting task starts once its prerequisite ended, and what a retry costs,
each beside ``bg.run``'s own start latency measured in the same run (issue 26).

1. ``bg.run`` → task code: the time from the call to the first line of the task (the task returns
   ``time.time()``), the median of many.  The baseline of both figures below.
2. A task waiting (``after=``) for one that sleeps 0.2 s: from the moment the prerequisite's end is
   recorded (its store write done: a listener of `nbbgtask.store.ends` in the prerequisite's process
   notes the time) to the first line of the waiting task.  Goal: <= 1.5x the baseline.
3. A retry: a task whose first attempt raises at once and whose second returns ``time.time()``
   (``retry_delay=0``): from the first attempt's end (as its record keeps it) to the second
   attempt's first line.  Goal: <= 1.5x the baseline.

Each round runs the three in turn, so load on the machine falls on all three alike.

    .venv/bin/python benchmarks/bench_pipelines.py [--quick] [--json OUT.json] [--start-method fork]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import common

import nbbgtask as bg

perf = time.perf_counter
median = statistics.median


def _now():
    return time.time()


def _after_nap(path):
    from nbbgtask.store import ends

    def recorded(home, record):  # called in this process once its end is written to the store
        with open(path, "w") as f:
            f.write(repr(time.time()))

    ends.listen(recorded)
    time.sleep(0.2)


def _fails_once(path):
    if not os.path.exists(path):
        open(path, "w").close()
        raise ConnectionError("the first attempt fails")
    return time.time()


def one_round(root: str, i: int) -> tuple[float, float, float]:
    called = time.time()
    start = bg.run(_now).result(timeout=60) - called
    stamp = os.path.join(root, f"recorded-{i}")
    first = bg.run(_after_nap, stamp)
    waiting = bg.run(_now, after=[first])
    began = waiting.result(timeout=60)
    with open(stamp) as f:
        follow = began - float(f.read())
    retried = bg.run(_fails_once, os.path.join(root, f"flag-{i}"), retries=1, retry_delay=0)
    second = retried.result(timeout=60)
    retry = second - retried.refresh().attempts[0]["finished"]
    return start, follow, retry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds")
    ap.add_argument("--json", metavar="OUT.json", help="also write all figures and machine info here")
    ap.add_argument("--start-method", default="fork", choices=("fork", "forkserver", "spawn"))
    args = ap.parse_args()
    cfg = dict(rounds=10 if args.quick else 40, start_method=args.start_method)
    t_all, load0 = perf(), os.getloadavg()[0]
    root = tempfile.mkdtemp(prefix="nbbg-pipes-")
    bg.configure(home=os.path.join(root, "home"), start_method=args.start_method)
    try:
        one_round(root, -1)  # warm-up: imports, the first fork server
        samples = [one_round(root, i) for i in range(cfg["rounds"])]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    start, follow, retry = (median(s[k] for s in samples) * 1000 for k in range(3))
    res = {"start_ms": start, "follow_ms": follow, "retry_ms": retry,
           "samples_ms": [[round(x * 1000, 3) for x in s] for s in samples]}
    rows = [
        common.make_row("1 start: bg.run -> task code (median)", start, float("nan"), "ms", "baseline"),
        common.make_row("2 after: prerequisite's end -> waiting task's code vs 1", follow, start, "ms",
                        "ratio <= 1.5", follow <= 1.5 * start),
        common.make_row("3 retry: attempt 1's end -> attempt 2's code vs 1", retry, start, "ms",
                        "ratio <= 1.5", retry <= 1.5 * start),
    ]
    common.print_table(rows)
    total = perf() - t_all
    print(common.run_line(args.quick, total, load0))
    if args.json:
        common.write_json(args.json, common.machine(load0, ("cloudpickle", "psutil")), cfg, total, res, rows)


if __name__ == "__main__":
    main()
