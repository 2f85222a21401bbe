"""Histories for the scale benchmarks, made the way real ones are.

A few real tasks are run with ``bg.run`` (one that returns a small result, one that fails with a
traceback, one that is cancelled), and their final records, as the runner wrote them, are cloned
with new ids, names and times.  The bulk goes in through ``Store.add_finished`` (one write per
shard); the newest ``tail`` tasks end one by one through ``Store.finalize``, as tasks do, so each
shard has its recent file and its main file as a used home has.

Standard library and nbbgtask only.
"""

from __future__ import annotations

import secrets
import time

import nbbgtask as bg
from nbbgtask.store.store import store_for

#: how many names the cloned tasks share (a user's history has a few functions, run many times)
NAMES = 50


def _work(n: int) -> int:
    print("working on", n)
    return 2 * n


def _fail() -> None:
    print("about to fail")
    raise ValueError("bad spline")


def real_records() -> list[dict]:
    """The final records of three real tasks run in the home configured now: complete, failed, cancelled."""
    done = bg.run(_work, 21)
    failed = bg.run(_fail)
    slow = bg.run(time.sleep, 60)
    done.wait(60)
    failed.wait(60)
    time.sleep(0.3)
    slow.cancel()
    store = store_for(bg.configure().home)
    records = [store.get(s.id) for s in (done, failed, slow)]
    assert [r["state"] for r in records] == ["complete", "failed", "cancelled"], records
    store.remove([r["id"] for r in records])
    return records


def clones(templates: list[dict], count: int, now: float | None = None) -> list[dict]:
    """``count`` records cloned from ``templates`` (three complete for each failed and cancelled
    one), created one second apart up to ``now``, oldest first."""
    now = time.time() if now is None else now
    mix = [templates[0]] * 3 + templates[1:]
    out = []
    for i in range(count):
        t = mix[i % len(mix)]
        created = now - count + i
        ran = (t["finished"] or t["created"]) - (t["started"] or t["created"])
        out.append({**t, "id": secrets.token_hex(16), "name": f"job-{i % NAMES}", "created": created,
                    "started": created + 0.001, "finished": created + 0.001 + ran,
                    **({"reported": created + 0.002} if "reported" in t else {})})
    return out


def build(count: int, tail: int = 500) -> float:
    """Fill the home configured now with ``count`` finished tasks; the seconds it took."""
    t0 = time.perf_counter()
    store = store_for(bg.configure().home)
    records = clones(real_records(), count) if count else []
    tail = min(tail, count)
    store.add_finished(records[: count - tail])
    for record in records[count - tail:]:
        final = {k: record[k] for k in ("state", "finished", "error", "traceback", "percent", "cancel_requested")}
        store.insert({**record, "state": "running", "finished": None, "error": None, "traceback": None})
        store.finalize(record["id"], final)
    return time.perf_counter() - t0
