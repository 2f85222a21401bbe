"""What nbbgtask trusts, and how it checks: the home folder, ids that become file names, files it
opens in the home, secrets in the text it writes, and text it prints on a terminal.

The home folder is trusted only when it is the user's own, as ssh's StrictModes asks of ``~/.ssh``:
owned by the effective user, writable by nobody else, not a symlink, every folder above it owned
by root or the user and not writable by others unless sticky (else another user could swap it),
and its sub-folders plain folders of the user's, writable by nobody else.  Anything else is a
`HomeError` naming the path and what is wrong; nothing is chmodded.  With those folders nobody
else can put anything in the home after the check; files in it are still opened with
``O_NOFOLLOW`` and checked for their owner (`open_owned`), and temp files made with ``O_EXCL``,
so a link left from before is never followed.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Iterable, Mapping
from typing import Any

from nbbgtask.core.errors import HomeError

__all__ = [
    "SUBFOLDERS", "STORE_FOLDERS", "TASK_ID", "valid_id", "check_id", "check_home", "check_folder", "verify_home",
    "open_owned", "read_owned", "redactor", "visible", "visible_lines",
]

#: the folders ``ensure_home`` makes; the store makes `STORE_FOLDERS` on its first write
SUBFOLDERS = ("logs", "outputs", "results", "stacks")
STORE_FOLDERS = ("live", "history", "locks")
#: what a task id is: 32 hex digits (`nbbgtask.core.record.new_task_id`)
TASK_ID = re.compile(r"[0-9a-f]{32}\Z")
#: O_NOFOLLOW and O_CLOEXEC for every file opened in the home
NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def valid_id(task_id: Any) -> bool:
    return isinstance(task_id, str) and TASK_ID.match(task_id) is not None


def check_id(task_id: Any) -> str:
    """``task_id`` if it is a task id (and so safe in a file name), else `ValueError`."""
    if not valid_id(task_id):
        raise ValueError(f"{visible(repr(task_id))[:80]} is not a task id (32 hex digits)")
    return task_id  # type: ignore[no-any-return]


# -- the home folder ------------------------------------------------------------------------------


def _refuse(path: str, what: str) -> HomeError:
    return HomeError(
        f"refusing {path} as the nbbgtask home: {what}. nbbgtask trusts only a folder of your own "
        f"that nobody else can write; point NBBGTASK_HOME, bg.configure(home=...) or --home at one "
        f"(a new path is created for you)"
    )


def _who(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (KeyError, ImportError):
        return f"uid {uid}"


def _check_own(path: str, st: os.stat_result, what: str, me: int) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise _refuse(path, f"{what} is a symlink")
    if not stat.S_ISDIR(st.st_mode) and what != "the file":
        raise _refuse(path, f"{what} is not a folder")
    if st.st_uid != me:
        raise _refuse(path, f"{what} belongs to {_who(st.st_uid)}, not to you ({_who(me)})")
    if st.st_mode & 0o022:
        raise _refuse(path, f"{what} is writable by others (mode {stat.S_IMODE(st.st_mode):04o})")


def _check_ancestors(path: str, me: int) -> None:
    """Every folder above the home: root's or the user's, and not writable by others unless
    sticky (someone who can write a folder above can rename the home away and put another there)."""
    parent = os.path.realpath(os.path.dirname(path))
    while True:
        st = os.stat(parent)
        if st.st_uid not in (0, me):
            raise _refuse(path, f"the folder {parent} above it belongs to {_who(st.st_uid)}")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise _refuse(
                path,
                f"the folder {parent} above it is writable by others and not sticky "
                f"(mode {stat.S_IMODE(st.st_mode):04o}): they could replace the home",
            )
        up = os.path.dirname(parent)
        if up == parent:
            return
        parent = up


def check_home(path: str, *, create: bool) -> tuple[int, int]:
    """Check (and with ``create``, make) the home folder; its ``(st_dev, st_ino)``.

    Raises `HomeError` for a home that is not the user's own, and for one that does not exist
    when ``create`` is false.  Sub-folders that exist are checked; missing ones are made (0700)
    only with ``create``.  Never changes a mode.
    """
    me = os.geteuid()
    try:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if not create:
                raise HomeError(
                    f"there is no nbbgtask home at {path}: check the path (nothing has run with "
                    f"this home yet, or it is a typo)"
                ) from None
            _check_ancestors_of_new(path, me)
            os.makedirs(path, mode=0o700, exist_ok=True)
            st = os.lstat(path)
        _check_own(path, st, "the folder", me)
        _check_ancestors(path, me)
        for sub in (*SUBFOLDERS, *STORE_FOLDERS):
            full = os.path.join(path, sub)
            try:
                sub_st = os.lstat(full)
            except FileNotFoundError:
                if create and sub in SUBFOLDERS:
                    os.mkdir(full, 0o700)
                continue
            _check_own(path, sub_st, f"its sub-folder {sub}/", me)
    except HomeError:
        raise
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise HomeError(
            f"cannot use {path} as the nbbgtask home: {reason}. Point the NBBGTASK_HOME "
            f"environment variable, or bg.configure(home=...), at a folder you can write."
        ) from None
    return st.st_dev, st.st_ino


def _check_ancestors_of_new(path: str, me: int) -> None:
    """Before making a home: the nearest existing folder above it must pass `_check_ancestors`."""
    existing = os.path.dirname(path)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    _check_ancestors(os.path.join(existing, "x"), me)


def check_folder(home: str | os.PathLike[str], folder: str) -> None:
    """``folder`` (in ``home``) is a plain folder of the user's that nobody else can write."""
    _check_own(os.fspath(home), os.lstat(folder), f"its sub-folder {os.path.basename(folder)}/", os.geteuid())


def verify_home(path: str, identity: tuple[int, int] | None) -> None:
    """Cheap re-check before trusting what the home holds (a result to unpickle, a pid to
    signal, files to delete): still the same folder, ours, and writable by nobody else."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise _refuse(path, f"it cannot be read any more ({exc.strerror or exc})") from None
    if identity is not None and (st.st_dev, st.st_ino) != identity:
        raise _refuse(path, "it was replaced by another folder since it was checked")
    _check_own(path, st, "the folder", os.geteuid())


# -- files in the home ----------------------------------------------------------------------------


def open_owned(path: str | os.PathLike[str], flags: int = os.O_RDONLY, mode: int = 0o600) -> int:
    """Open a file in the home without following a symlink; it must be a regular file of the
    user's that nobody else can write, else `HomeError` (the descriptor is closed)."""
    try:
        fd = os.open(path, flags | NOFOLLOW, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # the last part is a symlink
            raise HomeError(f"refusing the nbbgtask file {os.fspath(path)}: it is a symlink") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            what = (
                "is not a regular file" if not stat.S_ISREG(st.st_mode)
                else f"belongs to {_who(st.st_uid)}" if st.st_uid != os.geteuid()
                else f"is writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
            )
            raise HomeError(f"refusing the nbbgtask file {os.fspath(path)}: it {what}; nothing in it was read")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_owned(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a file in the home (`open_owned`); `FileNotFoundError` if there is none, and
    `HomeError` for a symlink."""
    fd = open_owned(path)
    with os.fdopen(fd, "rb") as f:
        return f.read()


# -- secrets in what nbbgtask writes -------------------------------------------------------------

#: a secret's text shorter than this is not redacted (it would blank out ordinary words)
MIN_SECRET = 4
REDACTED = "***"


def _texts(value: Any) -> Iterable[str]:
    if isinstance(value, Mapping):
        for item in value.values():
            yield from _texts(item)
        return
    if isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from _texts(item)
        return
    if isinstance(value, bytes):
        yield value.decode("utf-8", errors="replace")
    try:
        yield str(value)
        yield repr(value)
    except Exception:  # a secret whose str() fails is not in any text either
        return


def redactor(secrets: Mapping[str, Any] | None) -> Any:
    """A function that replaces every secret's text (``str`` and ``repr`` of each value) by ***."""
    found = sorted({t for t in _texts(dict(secrets or {})) if len(t) >= MIN_SECRET}, key=len, reverse=True)
    if not found:
        return lambda text: text
    pattern = re.compile("|".join(re.escape(t) for t in found))

    def redact(text: Any) -> Any:
        return pattern.sub(REDACTED, text) if isinstance(text, str) else text

    return redact


# -- text for a terminal -------------------------------------------------------------------------


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def visible(text: Any, *, keep: str = "") -> str:
    """``text`` with every character that is not printable shown as an escape (``\\x1b``,
    ``\\u202e``), so that a terminal prints it as it is: control characters (Cc: ``\\x1b]0;x\\x07``
    stays those characters, a newline cannot start a fake field), format characters (Cf: a bidi
    override, a zero-width space), line and paragraph separators, unassigned code points and lone
    surrogates (which no terminal could even be sent).  Characters in ``keep`` pass (``"\\n\\t"``
    for a log).  The one escaping of the command line, for every field it prints."""
    text = str(text)
    if text.isprintable() and not keep:
        return text
    return "".join(ch if ch in keep or ch.isprintable() else _escape_char(ch) for ch in text)


def visible_lines(text: Any) -> str:
    """A log, a traceback or a stack: its line breaks and tabs kept, every other control character
    shown as an escape (a carriage return too: it would overwrite the line on a terminal)."""
    return visible(text, keep="\n\t")
