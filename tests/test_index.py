"""The history's index files (`nbbgtask.store.index`): what a new process reads to answer the
newest tasks, never trusted over the shards they were made from; paging; a prune that streams."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import nbbgtask as bg
from nbbgtask.core import config as _config
from nbbgtask.store import store as _store
from nbbgtask.store.index import index_path
from nbbgtask.store.storage import AtomicJSONStorage
from nbbgtask.store.summaries import DEPTH


def _real_record() -> dict:
    """A finished task's record as bg.run wrote it (then forgotten: only its copies are kept)."""
    status = bg.run(lambda: 42, name="template")
    assert status.wait(30)
    store = _store.store_for(_config.home())
    record = store.get(status.id)
    store.remove([status.id])
    return record


def _history(count: int, names: int = 7) -> list[dict]:
    """``count`` finished tasks cloned from a real one, one second apart, put in the history."""
    template, now = _real_record(), time.time()
    records = [{**template, "id": secrets.token_hex(16), "name": f"job-{i % names}",
                "state": ("complete", "failed", "cancelled")[i % 3], "created": now - count + i,
                "started": now - count + i, "finished": now - count + i + 0.5} for i in range(count)]
    _store.store_for(_config.home()).add_finished(records)
    time.sleep(0.1)  # past SETTLE_NS: the files' times now tell them apart from a later write
    return records


def _truth(records: list[dict], limit: int = 20, name: str | None = None, before: dict | None = None) -> list[str]:
    chosen = [r for r in records if (name is None or r["name"] == name)
              and (before is None or (r["created"], r["id"]) < (before["created"], before["id"]))]
    return [r["id"] for r in sorted(chosen, key=lambda r: (r["created"], r["id"]), reverse=True)[:limit]]


def _fresh_answers() -> tuple[list[str], str | None, str | None]:
    """tasks(limit=20), find_last(name=...) and find_last(state=, name=) as a new process sees them."""
    _store.forget_instances()
    last = bg.find_last(name="job-3")
    failed = bg.find_last(state="failed", name="job-4")
    return [s.id for s in bg.tasks(limit=20)], last and last.id, failed and failed.id


def _expected(records: list[dict]) -> tuple[list[str], str, str]:
    return (_truth(records), _truth(records, 1, "job-3")[0],
            _truth([r for r in records if r["state"] == "failed"], 1, "job-4")[0])


def test_a_shard_write_keeps_its_index_and_a_new_process_answers_from_it(home):
    records = _history(3000)
    indexes = sorted((home / "history").glob("*.index.json"))
    assert len(indexes) == 64
    assert _fresh_answers() == _expected(records)
    store = _store.store_for(_config.home())
    mains = {name for name, _ in store._existing_history() if not name.endswith(".recent.json")}
    assert mains == {p.name.replace(".index", "") for p in indexes}


def test_a_missing_stale_or_damaged_index_is_made_again_from_its_shard(home):
    records = _history(3000)
    history = home / "history"
    (history / "03.index.json").unlink()  # missing
    (history / "07.index.json").write_bytes(b"{not json")  # damaged
    # stale: shard 11's main file rewritten by a writer that knows nothing of indexes, with a
    # task newer than all the rest
    shard = history / "11.json"
    data = json.loads(shard.read_bytes())
    newest = {**records[0], "id": "0b" + secrets.token_hex(15), "name": "job-3", "created": time.time() + 10}
    data["tasks"][newest["id"]] = newest
    AtomicJSONStorage(str(shard)).write(data)
    time.sleep(0.1)
    stale = (history / "11.index.json").read_bytes()
    records.append(newest)
    assert _fresh_answers() == _expected(records)
    assert _fresh_answers()[0][0] == newest["id"]
    for index in ("03", "07", "11"):  # made again by the reader that found them wanting
        raw = (history / f"{index}.index.json").read_bytes()
        assert raw.split(b"\n", 1)[0].isalnum() and raw != stale


@pytest.mark.parametrize("lie", ["a task that is not in the shard", "another state", "a newer time"])
def test_a_lie_in_an_index_never_changes_an_answer(home, lie):
    records = _history(3000)
    path = Path(index_path(str(home / "history" / "21.json")))
    digest, header, rest = path.read_bytes().split(b"\n", 2)
    head = json.loads(header)
    victim = head["by_created"][0]
    if lie == "a task that is not in the shard":
        fake = "15" + secrets.token_hex(15)  # shard 21
        head["tasks"][fake] = [*head["tasks"][victim][:2], time.time() + 100, None, *head["tasks"][victim][4:]]
        head["by_created"].insert(0, fake)
    elif lie == "another state":
        head["tasks"][victim][1] = "failed"
    else:
        head["tasks"][victim][2] = time.time() + 100
    path.write_bytes(digest + b"\n" + json.dumps(head).encode() + b"\n" + rest)  # its digest kept
    assert _fresh_answers() == _expected(records)


def test_a_new_process_reads_the_small_files_not_the_history(home):
    """Bytes read (``rchar`` of /proc/self/io) by a new process's first tasks(limit=20) and
    find_last(name=...), beyond its imports: the index, recent and live files, not the shards."""
    _history(20_000)
    probe = textwrap.dedent("""
        import sys
        import nbbgtask as bg

        def rchar():
            with open("/proc/self/io") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))

        bg.tasks, bg.find_last  # their modules are imported on first use: not part of the reads
        before = rchar()
        assert len(bg.tasks(limit=20)) == 20 and bg.find_last(name="job-3") is not None
        print(rchar() - before)
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True,
                         env={**os.environ, "NBBGTASK_HOME": str(home)})
    read = int(out.stdout)
    files = list((home / "history").iterdir())
    small = sum(p.stat().st_size for p in files if p.name.endswith((".index.json", ".recent.json")))
    shards = sum(p.stat().st_size for p in files if p.name[2:] == ".json")
    assert shards > 2 * small  # the history is worth not reading
    assert read <= small + 256 * 1024, (read, small, shards)


def test_pages_go_back_newest_first_without_overlap(home):
    records = _history(2 * 64 * DEPTH // 10)  # deeper than some shards' indexes reach
    seen: list[str] = []
    page = bg.tasks(limit=50)
    while page:
        seen += [s.id for s in page]
        page = bg.tasks(limit=50, before=page[-1].id)
    assert seen == _truth(records, len(records))
    middle = records[len(records) // 2]
    assert [s.id for s in bg.tasks(limit=7, name="job-2", before=middle["id"])] == \
        _truth(records, 7, "job-2", middle)
    with pytest.raises(bg.TaskNotFound):
        bg.tasks(limit=5, before="0" * 32)


PRUNE = """
import sys, time
import nbbgtask as bg

def kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

bg.configure(home=sys.argv[1])
start = kb("VmRSS")
gone = bg.prune(keep=int(sys.argv[2]))
print(gone, kb("VmHWM") - start)
"""


def test_prune_streams_the_history(home):
    """90 % of 30,000 tasks pruned in a process of its own: its peak memory (VmHWM) above its start
    stays under 30 MB, the issue's 100 MB at 100,000 scaled down (holding the history, as prune
    did, peaked at about 100 MB above the start here)."""
    _history(30_000)
    out = subprocess.run([sys.executable, "-c", PRUNE, str(home), "3000"], capture_output=True, text=True,
                         timeout=300, check=True)
    gone, peak_kb = map(int, out.stdout.split())
    assert gone == 27_000 and len(bg.tasks()) == 3000
    assert peak_kb < 30 * 1024, f"{peak_kb / 1024:.1f} MB above the start"
