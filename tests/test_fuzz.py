"""Property-based fuzzing (hypothesis) of the public API's inputs.

The property: whatever a caller passes, nbbgtask answers with a result or with one of the
documented exceptions - TypeError, ValueError, bg.TaskNotFound (a KeyError) or another
bg.NbbgtaskError - raised by nbbgtask itself (the traceback's last frame is in nbbgtask/), a
TypeError or ValueError with a message that names the argument; never with an exception from
deep inside a dependency (a bare TypeError from iterating, a ValueError from int -> str), even
of a documented type; and what it accepts behaves as documented.  Example counts are modest so that the file runs in well under a minute.

The bugs this fuzzing found each have a test of their own at the end of this file, so a return is
caught by name.  The figures are printed and appended to $NBBGTASK_FIGURES (JSON lines) when it
is set.
"""

from __future__ import annotations

import collections
import datetime as dt
import decimal
import inspect
import json
import math
import os
import re
import secrets as _secrets
import threading
import time
import traceback
from collections.abc import Mapping
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nbbgtask as bg
from nbbgtask.core import config as _config

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,  # nothing written to the working tree
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

DOCUMENTED = (TypeError, ValueError, bg.NbbgtaskError)  # TaskNotFound is both a KeyError and one of these
#: where nbbgtask's own code is: a documented exception must be raised here
NBBGTASK = Path(bg.__file__).resolve().parent


def raised_by_nbbgtask(exc: BaseException) -> bool:
    """The last frame of ``exc``'s traceback (where it was raised) is in nbbgtask's own code,
    not in a dependency or the standard library that nbbgtask called."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(NBBGTASK)


def refusal_problem(exc: BaseException, arguments) -> str | None:
    """Why ``exc`` is not one of nbbgtask's documented refusals of a call given ``arguments``
    (parameter names), or ``None`` if it is: a documented type, raised by nbbgtask itself, and
    (a TypeError or ValueError) with a message that names one of the arguments."""
    if not isinstance(exc, DOCUMENTED):
        return "not a documented exception"
    if not raised_by_nbbgtask(exc):
        return "raised inside a dependency, not by nbbgtask"
    if isinstance(exc, (TypeError, ValueError)) and not isinstance(exc, bg.NbbgtaskError):
        words = {spelling for name in arguments for spelling in (name, name.replace("_", " "))}
        if not any(re.search(rf"\b{re.escape(word)}\b", str(exc)) for word in words):
            return f"the message names none of the arguments ({', '.join(sorted(arguments))})"
    return None


def _arguments(fn, args, kwargs) -> set[str]:
    """The names of the parameters a call gives values to."""
    try:
        return set(inspect.signature(fn).bind_partial(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        return set(kwargs)


class Tally:
    """Counts outcomes; ``unexpected`` lists what breaks the property."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.unexpected: list[str] = []

    def call(self, fn, *args, **kwargs):
        """``(True, value)``, or ``(False, exception)`` for an exception; one that is not a
        documented refusal by nbbgtask itself (`refusal_problem`) is listed in ``unexpected``."""
        try:
            value = fn(*args, **kwargs)
        except Exception as exc:
            problem = refusal_problem(exc, _arguments(fn, args, kwargs))
            if problem is None:
                self.counts[type(exc).__name__] += 1
            else:
                last = traceback.extract_tb(exc.__traceback__)[-1]
                where = f"raised at {last.filename}:{last.lineno} in {last.name}"
                self.unexpected.append(
                    f"{getattr(fn, '__name__', fn)}(*{_short(args)}, **{_short(kwargs)}): "
                    f"{type(exc).__name__}: {exc} - {problem}, {where}"
                )
            return False, exc
        self.counts["accepted"] += 1
        return True, value

    def record(self, test: str, **extra) -> None:
        line = json.dumps(
            {"test": test, "examples": sum(self.counts.values()) + len(self.unexpected),
             "outcomes": dict(self.counts), "unexpected": len(self.unexpected),
             **extra},
            sort_keys=True,
        )
        print(line)
        if os.environ.get("NBBGTASK_FIGURES"):
            with open(os.environ["NBBGTASK_FIGURES"], "a") as f:
                f.write(line + "\n")


def _short(value) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int too long to write out
        text = f"<{type(value).__name__} of {value.bit_length()} bits>" if isinstance(value, int) else "<unwritable>"
    return text if len(text) < 120 else text[:117] + "..."


# -- strategies -----------------------------------------------------------------------------------

#: text that also holds lone surrogates, NULs, slashes and non-ASCII (hypothesis rarely picks them)
ODD = st.sampled_from(["\ud800", "\udfff", "\x00", "/", " ", "é", "\u202e", "\n", "0", "f", "."])
TEXT = st.text(st.one_of(st.characters(), ODD), max_size=12)
HUGE = st.one_of(
    st.sampled_from([10**400, -(10**400), 2**1024, 10**4299, 2**63, -(2**63)]),
    st.builds(pow, st.just(10), st.just(4301)),  # too long for int -> str (and so for JSON); repr fails too
)
NUMBERS = st.one_of(
    st.integers(), HUGE, st.floats(), st.fractions(), st.decimals(), st.complex_numbers(), st.booleans()
)
ANYTHING = st.one_of(st.none(), NUMBERS, TEXT, st.binary(max_size=4), st.lists(st.integers(), max_size=2), st.builds(object))

JSON_KEYS = st.one_of(TEXT, st.integers(), st.floats(), st.booleans(), st.none(), st.tuples(st.integers()), st.binary(max_size=2))
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), HUGE, st.floats(), TEXT, st.binary(max_size=3), st.datetimes(),
    st.complex_numbers(), st.decimals(), st.just(Ellipsis),
)
NESTED = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(JSON_KEYS, inner, max_size=3),
        st.tuples(inner, inner),
        st.frozensets(st.integers(), max_size=2),
    ),
    max_leaves=12,
)
SETTINGS = st.one_of(st.none(), st.dictionaries(JSON_KEYS, NESTED, max_size=4), NESTED)


def _noop():
    return None


class Echo(bg.BackgroundTask):
    def execute(self, status):
        return status.settings


def _scan_home(home: Path, needle: bytes) -> list[str]:
    return [str(p) for p in home.rglob("*") if p.is_file() and needle in p.read_bytes()]


# -- bg.run: name and secrets ---------------------------------------------------------------------


def _pick(draw, valid, wild):
    """None, a valid value or anything (hypothesis flattens nested one_of, which would make the
    wild values far more common than the valid ones)."""
    kind = draw(st.sampled_from(["none", "none", "valid", "valid", "wild"]))
    return None if kind == "none" else draw(valid if kind == "valid" else wild)


def test_fuzz_run_name_and_secrets(home):
    marker = _secrets.token_hex(16)
    tally, started = Tally(), []

    @FUZZ
    @given(data=st.data())
    def check(data):
        name = _pick(data.draw, TEXT.map(lambda t: "n" + t), st.one_of(TEXT, st.just(""), st.just("  \t"), ANYTHING))
        secrets = _pick(
            data.draw, st.dictionaries(st.one_of(TEXT, st.integers()), ANYTHING, max_size=3),
            st.one_of(ANYTHING, st.lists(TEXT, max_size=2), st.tuples(TEXT, TEXT)),
        )
        if isinstance(secrets, dict):
            secrets = {**secrets, "marker": marker}
        valid = (name is None or (isinstance(name, str) and bool(name.strip()))) and (
            secrets is None or isinstance(secrets, Mapping)
        )
        ok, got = tally.call(bg.run, _noop, name=name, secrets=secrets)
        assert ok == valid, (name, secrets, got)
        if ok:
            assert got.name == (name if name is not None else "_noop")
            started.append((got, got.name))

    check()
    assert tally.unexpected == []
    for status, name in started:
        assert status.wait(30) and status.state == "complete", status
        assert bg.get(status.id).name == name
    assert _scan_home(home, marker.encode()) == []  # secrets are never written anywhere
    tally.record("fuzz_run_name_secrets", tasks_started=len(started), secrets_found_on_disk=0)


# -- BackgroundTask.initiate: settings -------------------------------------------------------------


def _as_stored(value):
    """What the documentation says happens to settings: a JSON round trip, else TypeError."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError("not a mapping")
    return json.loads(json.dumps(dict(value), allow_nan=False))


def test_fuzz_initiate_settings(home):
    tally, started = Tally(), []

    @FUZZ
    @given(value=SETTINGS, secrets=st.one_of(st.none(), st.dictionaries(TEXT, ANYTHING, max_size=2)))
    def check(value, secrets):
        try:
            expected, storable = _as_stored(value), True
        except (TypeError, ValueError):
            expected, storable = None, False
        ok, got = tally.call(Echo.initiate, settings=value, secrets=secrets)
        if storable:
            assert ok, (value, got)
            assert got.settings == (expected or {})
            started.append((got, expected or {}))
        else:
            assert not ok and isinstance(got, TypeError), (value, got)

    check()
    assert tally.unexpected == []
    for status, expected in started:
        assert status.result(timeout=30) == expected  # what the task saw
        assert bg.get(status.id).settings == expected  # what a later lookup sees
    tally.record("fuzz_initiate_settings", tasks_started=len(started))


# -- status.update / bg.progress / bg.track, inside one task process -------------------------------


def _track_all(iterable, total, message):
    return list(bg.track(iterable, total=total, message=message))


def _fuzz_progress_inside(examples: int) -> dict:
    """Runs in the task's process: the fuzz loop, and what it found."""
    status = bg.current()
    tally = Tally()
    out_of_range: list[str] = []

    @settings(max_examples=examples, deadline=None, database=None)
    @given(
        which=st.sampled_from(["status.update", "bg.progress", "bg.track"]),
        percent=st.one_of(st.none(), NUMBERS, TEXT, st.just(math.nan), st.just(-math.inf), st.just(math.inf)),
        message=st.one_of(st.none(), TEXT, st.text(max_size=2000), ANYTHING),
        total=st.one_of(st.none(), st.integers(-2, 10), HUGE, st.floats(), st.booleans(), TEXT),
    )
    def probe(which, percent, message, total):
        if which == "status.update":
            tally.call(status.update, percent, message)
        elif which == "bg.progress":
            tally.call(bg.progress, percent, message)
        else:
            tally.call(_track_all, range(3), total=total, message=message)
        p = status.percent
        if not (type(p) is float and 0.0 <= p <= 100.0):
            out_of_range.append(repr(p))
        if type(status.message) is not str:
            out_of_range.append(f"message {status.message!r}")

    probe()
    status.update(42.0, "last words")
    time.sleep(0.3)  # let the writer thread record the last values
    return {
        "counts": dict(tally.counts), "unexpected": tally.unexpected,
        "out_of_range": out_of_range,
    }


def test_fuzz_progress_inside_one_task(home):
    """The fuzz loop runs inside one task process (one fork, not one per example) and returns what
    it found; the writer thread records every accepted value meanwhile."""
    _config.settings().progress_interval = 0.01
    status = bg.run(_fuzz_progress_inside, 400)
    found = status.result(timeout=120)
    assert found["unexpected"] == []
    assert found["out_of_range"] == []
    stored = bg.get(status.id)
    assert (stored.percent, stored.message) == (100.0, "last words")
    assert "could not record progress" not in status.log()  # the writer thread never failed
    line = json.dumps({"test": "fuzz_progress_in_task", "examples": 400, "outcomes": found["counts"],
                       "unexpected": len(found["unexpected"])}, sort_keys=True)
    print(line)
    if os.environ.get("NBBGTASK_FIGURES"):
        with open(os.environ["NBBGTASK_FIGURES"], "a") as f:
            f.write(line + "\n")


# -- finding tasks: bg.tasks, bg.get, bg.prune ------------------------------------------------------


@pytest.fixture
def some_tasks(home):
    done = [bg.run(lambda k=k: k, name=("a" if k % 2 else "b")) for k in range(4)]
    failed = bg.run(lambda: 1 / 0, name="a")
    for status in [*done, failed]:
        status.wait(30)
    running = bg.run(time.sleep, 30, name="b")
    return [*done, failed, running]


STATE_NAMES = [s.value for s in bg.State]


def test_fuzz_tasks_filters(some_tasks):
    tally = Tally()

    @FUZZ
    @given(
        state=st.one_of(
            st.none(), st.sampled_from(list(bg.State)), st.sampled_from(STATE_NAMES), TEXT,
            st.lists(st.one_of(st.sampled_from(STATE_NAMES), TEXT, st.integers()), max_size=3),
            st.frozensets(st.sampled_from(STATE_NAMES)), st.dictionaries(st.sampled_from(STATE_NAMES), st.integers(), max_size=2),
            ANYTHING,
        ),
        name=st.one_of(st.none(), st.sampled_from(["a", "b", "c"]), ANYTHING),
        limit=st.one_of(st.none(), st.integers(-3, 10), st.integers(min_value=10**18), HUGE, NUMBERS, TEXT),
    )
    def check(state, name, limit):
        ok, got = tally.call(bg.tasks, state, name, limit)
        if not ok:
            return
        assert isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0 or limit is None
        assert limit is None or len(got) <= limit
        wanted = None if state is None else ({bg.State(state).value} if isinstance(state, str) else {bg.State(s).value for s in state})
        for status in got:
            assert wanted is None or status.state.value in wanted
            assert name is None or status.name == name
        assert [s.created for s in got] == sorted((s.created for s in got), reverse=True)

    check()
    assert tally.unexpected == []
    tally.record("fuzz_tasks_filters")


def test_fuzz_get_ids(some_tasks):
    tally = Tally()
    ids = [s.id for s in some_tasks]

    @FUZZ
    @given(
        task_id=st.one_of(
            TEXT, st.text(ODD, min_size=1, max_size=4), st.from_regex(r"[0-9a-f]{32}", fullmatch=True), st.sampled_from(ids),
            st.sampled_from(ids).map(lambda i: i[:8]), st.sampled_from(ids).map(lambda i: i.upper()),
            st.sampled_from(ids).map(lambda i: i + "\ud800"), st.sampled_from(ids).map(lambda i: " " + i),
            st.binary(max_size=33), st.integers(), st.none(),
        )
    )
    def check(task_id):
        ok, got = tally.call(bg.get, task_id)
        if task_id in ids:
            assert ok and got.id == task_id
        elif not isinstance(task_id, str):
            assert isinstance(got, TypeError)
        else:  # a lone surrogate included
            assert isinstance(got, bg.TaskNotFound) and isinstance(got, KeyError), (task_id, got)

    check()
    assert tally.unexpected == []
    tally.record("fuzz_get_ids")


def test_fuzz_prune_arguments(some_tasks):
    tally = Tally()

    @FUZZ
    @given(
        keep=st.one_of(st.integers(-3, 10), st.integers(min_value=10**18), HUGE, NUMBERS, st.none(), TEXT),
        older_than=st.one_of(
            st.none(), st.floats(), st.integers(-10, 10**9), HUGE, st.timedeltas(), st.fractions(), st.decimals(),
            st.booleans(), TEXT, st.just(dt.timedelta.max), st.just(dt.timedelta.min),
        ),
    )
    def check(keep, older_than):
        before = len(bg.tasks(state=["complete", "failed", "cancelled"]))
        ok, got = tally.call(bg.prune, keep, older_than)
        if ok:
            assert type(got) is int and 0 <= got <= before
            assert len(bg.tasks(state=["complete", "failed", "cancelled"])) == before - got
        if ok and got:  # put some finished tasks back, so later examples have something to prune
            for status in [bg.run(lambda: 1, name="again") for _ in range(2)]:
                status.wait(30)

    check()
    assert tally.unexpected == []
    assert bg.get(some_tasks[-1].id).state == "running"  # prune never touches a live task
    tally.record("fuzz_prune_arguments")


# -- bg.configure ----------------------------------------------------------------------------------


def _safe_home(text: str) -> bool:
    """A relative path that stays inside the test's folder (no '~', no absolute path, no '..')."""
    return not text.startswith(("~", "/")) and ".." not in Path(text).parts


def test_fuzz_configure(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative homes land here
    _config.reset()
    tally = Tally()

    @FUZZ
    @given(data=st.data())
    def check(data):
        draw = data.draw
        kwargs = dict(
            home=_pick(
                draw, TEXT.filter(_safe_home).map(lambda t: "h" + t),
                st.one_of(TEXT.filter(_safe_home), TEXT.filter(_safe_home).map(Path), st.just("x" * 300),
                          ANYTHING.filter(lambda v: not isinstance(v, (str, bytes)))),
            ),
            start_method=_pick(draw, st.sampled_from(["auto", "fork", "forkserver", "spawn"]), st.one_of(
                st.sampled_from(["thread", "", "FORK", "Auto"]), ANYTHING)),
            max_running=_pick(draw, st.one_of(st.integers(1, 100), HUGE.filter(lambda n: n > 0), st.just(math.inf)),
                             st.one_of(st.integers(-2, 0), NUMBERS, TEXT)),
            refresh_interval=_pick(draw, st.floats(0.001, 1e6), st.one_of(NUMBERS, TEXT, st.just(math.nan), st.just(math.inf))),
            cancel_grace=_pick(draw, st.integers(1, 10**6), st.one_of(NUMBERS, TEXT, st.just(math.nan))),
        )
        # Never a real Dask connection: no "dask" backend, and an address only with a backend that
        # would be refused anyway ("local", or not a backend at all).  A falsy backend means Dask,
        # which without an address is refused before connecting.
        backend = _pick(draw, st.just("local"), st.one_of(st.just(""), TEXT.filter(lambda b: b != "dask"), st.integers(0, 1)))
        kwargs["backend"] = backend
        if backend and backend != "dask":
            kwargs["address"] = draw(st.one_of(st.none(), TEXT))
        before = _config.settings().__dict__.copy()
        ok, got = tally.call(bg.configure, **kwargs)
        if ok:
            now = _config.settings()
            assert now.start_method in ("auto", "fork", "forkserver", "spawn") and now.backend == "local"
            assert now.refresh_interval > 0 and now.cancel_grace > 0 and math.isfinite(now.refresh_interval)
            assert now.max_running == math.inf or (type(now.max_running) is int and now.max_running >= 1)
            assert now.home is None or now.home.is_dir()
        else:
            assert _config.settings().__dict__ == before, "a refused configure() changed something"
        _config.reset()

    try:
        check()
    finally:
        _config.reset()
    assert tally.unexpected == []
    tally.record("fuzz_configure")


def test_fuzz_wait_result_and_log_arguments(home):
    """The waiting calls' numbers: any finite or infinite timeout, tail, on a finished task."""
    done = bg.run(lambda: "x")
    done.wait(30)
    tally = Tally()

    @FUZZ
    @given(
        timeout=st.one_of(st.none(), st.floats(max_value=1e6), st.just(math.nan), st.integers(-5, 10**6), HUGE, TEXT),
        tail=st.one_of(st.none(), st.integers(-3, 10**6), HUGE, NUMBERS, TEXT),
    )
    def check(timeout, tail):
        tally.call(done.wait, timeout)
        ok, got = tally.call(done.result, timeout)
        assert not ok or got == "x"
        ok, got = tally.call(done.log, tail)
        assert not ok or isinstance(got, str)

    check()
    assert tally.unexpected == []
    tally.record("fuzz_wait_result_log")


# -- the bugs the fuzzing found, one test each ------------------------------------------------------


def _progress_in_a_task(percent):
    """``bg.progress`` where it does something, in a task: the percent it then reports; a refusal
    (checked in the task, where its traceback is) is raised again here."""

    def report():
        try:
            bg.progress(percent)
        except (TypeError, ValueError) as exc:
            return exc, refusal_problem(exc, {"percent"})
        return bg.current().percent, None

    got, problem = bg.run(report).result(timeout=30)
    if isinstance(got, Exception):
        assert problem is None, f"{type(got).__name__}: {got} - {problem}"
        got.checked_in_task = True
        raise got
    return got


HUGE_INT = 10**400  # beyond any float: float(HUGE_INT) raises OverflowError


@pytest.mark.parametrize(
    "call, parameter, accepted",
    [
        # Accepted: clamped to 100, as any percent above it is.
        pytest.param(lambda kept: _progress_in_a_task(HUGE_INT), "percent", lambda got, kept: got == 100.0,
                     id="bg.progress"),
        # Accepted: no task finished that long ago, so none is forgotten.
        pytest.param(lambda kept: bg.prune(older_than=HUGE_INT), "older_than",
                     lambda got, kept: got == 0 and bg.get(kept.id) == kept, id="bg.prune"),
        # Accepted: only as a finite positive interval (the widgets sleep it between refreshes).
        pytest.param(lambda kept: bg.configure(refresh_interval=HUGE_INT), "refresh_interval",
                     lambda got, kept: 0 < got.refresh_interval < math.inf, id="bg.configure"),
        # Accepted: waits until the task ends, which it does at once.
        pytest.param(lambda kept: bg.run(print).wait(HUGE_INT), "timeout", lambda got, kept: got is True,
                     id="status.wait"),
        pytest.param(lambda kept: kept.result(timeout=HUGE_INT), "timeout", lambda got, kept: got == "kept",
                     id="status.result"),
    ],
)
def test_a_huge_integer_is_accepted_or_refused_clearly(home, call, parameter, accepted):
    """Either the call does what it would do with a large ordinary number, or it raises TypeError
    or ValueError naming the parameter and changes nothing: never OverflowError, never a hang."""
    kept = bg.run(lambda: "kept")
    assert kept.wait(30)
    before = _config.settings().__dict__.copy()
    try:
        got = call(kept)
    except (TypeError, ValueError) as exc:
        assert parameter in str(exc), f"the refusal does not name {parameter}: {exc}"
        if not getattr(exc, "checked_in_task", False):
            assert refusal_problem(exc, {parameter}) is None, f"{type(exc).__name__}: {exc} - {refusal_problem(exc, {parameter})}"
        assert _config.settings().__dict__ == before, "a refused call changed the settings"
        assert [s.id for s in bg.tasks(state="complete")][-1] == kept.id
    else:
        assert accepted(got, kept), f"accepted, but gave {got!r}"


def test_configure_with_a_signalling_nan_max_running_is_refused_clearly(home):
    with pytest.raises(ValueError, match="max_running"):
        bg.configure(max_running=decimal.Decimal("sNaN"))


def test_get_with_a_lone_surrogate_raises_task_not_found(home):
    with pytest.raises(bg.TaskNotFound):
        bg.get("\ud800 not an id")


def test_settings_nested_too_deep_raise_type_error(home):
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(TypeError, match="JSON"):
        Echo.initiate(settings={"deep": deep})


def test_wait_with_a_nan_timeout_does_not_block_until_the_task_ends(home):
    status = bg.run(time.sleep, 3)
    answered = []
    waiter = threading.Thread(target=lambda: answered.append(_try(status.wait, math.nan)), daemon=True)
    waiter.start()
    waiter.join(1.5)
    assert answered, "status.wait(timeout=nan) still blocked after 1.5 s"


def _try(fn, *args):
    try:
        return fn(*args)
    except (TypeError, ValueError) as exc:
        return exc


def test_configure_with_a_dask_client_that_is_not_one_is_refused_clearly(home):
    with pytest.raises((TypeError, ValueError)) as info:
        bg.configure(dask_client=object())
    assert refusal_problem(info.value, {"dask_client"}) is None, info.value
    assert _config.settings().backend == "local"
