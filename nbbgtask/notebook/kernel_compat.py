"""Handling widget clicks while a cell blocks, on each supported ipykernel.

A kernel runs one shell message at a time: while a cell blocks, a click on a button (a comm
message on the shell channel) waits until the cell ends.  `ShellPump` reads the messages meant
for the blocked main shell itself, handles comm messages at once, and hands every other
message (the next cells' execute requests, above all) back to the kernel in order when the
wait is over.  Each ipykernel version's way in is kept in `_shell_stream`, with its note.

Which comm messages reach the blocked shell (ipykernel 7.1+, whose shell channel thread routes
every shell message; JupyterLab >= 4.4 and Notebook 7 send widget messages through a subshell of
their own, JEP 91, with its ``subshell_id`` in the header):

- A comm message goes to the shell that last *published* on that comm (``BaseComm.
  _reply_subshell_for``), whatever subshell the front end addressed.  A widget shown by the
  blocked cell was published by it, so its clicks arrive on the blocked shell's stream with
  the front end's ``subshell_id`` still in the header: they are ours to handle, and the header
  is not looked at (ipykernel 7.1-7.4; before this was known, such clicks waited until the cell
  ended, i.e. for ever).
- A comm last published from another thread (the refresher updating a bar) is routed by that
  thread's parent header: the last shell request the kernel handled.  If that was in an idle
  subshell, the click is handled there, at once, by ipykernel itself.
- A cell blocked in a subshell (a front end that runs cells in one) reads that subshell's stream,
  not the main shell's: `_shell_stream` picks the stream of the thread that waits.
- ipykernel 6.x has no subshells; its main thread reads the shell socket, and every comm message
  on it is for the main shell.
"""

from __future__ import annotations

import inspect
import sys
import threading
from typing import Any

__all__ = ["ShellPump"]

_COMM_TYPES = frozenset({"comm_msg", "comm_close"})


def _kernel() -> Any | None:
    if "ipykernel" not in sys.modules:
        return None
    from ipykernel.kernelbase import Kernel

    return Kernel.instance() if Kernel.initialized() else None


def _shell_stream(kernel: Any) -> Any | None:
    """The ZMQStream from which this thread takes its shell messages (main shell or subshell)."""
    channel_thread = getattr(kernel, "shell_channel_thread", None)
    if channel_thread is not None:
        # ipykernel 7.1+: a shell channel thread receives every shell message and forwards each
        # shell's (the main one's, or a subshell's) through an inproc socket pair, read on that
        # shell's own thread.  (ipykernel 7.0.x is excluded by our requirements: it broke
        # widgets updated from threads.)
        manager = channel_thread.manager
        pair = getattr(manager, "get_shell_channel_to_subshell_pair", None)
        if pair is not None:
            try:
                subshell_id = manager.subshell_id_from_thread_id(threading.get_ident())
            except (AttributeError, RuntimeError):  # not a shell's thread: wait as the main shell
                subshell_id = None
            return pair(subshell_id).to_stream
        legacy = getattr(manager, "_shell_channel_to_main", None)
        return getattr(legacy, "to_stream", None)
    # ipykernel 6.x (and 7 without a shell channel thread): the main thread reads the shell
    # socket itself.  Its do_one_iteration() is a no-op from 7.1 on, so it is not used anywhere.
    return getattr(kernel, "shell_stream", None)


class ShellPump:
    """Use as a context manager around a blocking wait; call `pump()` often inside it."""

    def __init__(self) -> None:
        self.kernel: Any = _kernel()
        self.stream: Any = _shell_stream(self.kernel) if self.kernel is not None else None
        self._deferred: list[Any] = []

    @property
    def works(self) -> bool:
        return self.stream is not None and getattr(self.stream, "socket", None) is not None

    def __enter__(self) -> ShellPump:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pump(self) -> int:
        """Handle the comm messages that arrived; returns how many."""
        if not self.works:
            return 0
        import zmq

        handled = 0
        socket = self.stream.socket
        while True:
            try:
                msg = socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return handled
            if self._dispatch_comm(msg):
                handled += 1
            else:
                self._deferred.append(msg)

    def _dispatch_comm(self, msg: list[Any]) -> bool:
        session = self.kernel.session
        try:
            idents, frames = session.feed_identities(msg, copy=False)
            header = session.deserialize(frames, content=False, copy=False)["header"]
            # Every comm message on this stream is ours, whatever subshell its header names:
            # the kernel routed it here (see the module's docstring).
            if header.get("msg_type") not in _COMM_TYPES:
                return False
            full = session.deserialize(frames, content=True, copy=False)
        except Exception:
            return False  # not ours to judge: the kernel will see it as usual
        handler = self.kernel.shell_handlers.get(full["header"]["msg_type"])
        if handler is None:
            return False
        result = handler(self.stream, idents, full)
        if inspect.isawaitable(result):
            import asyncio

            asyncio.ensure_future(result)
        return True

    def close(self) -> None:
        """Hand the deferred messages back to the kernel, in the order they came."""
        if not self._deferred:
            return
        deferred, self._deferred = self._deferred, []
        stream = self.stream
        callback = getattr(stream, "_recv_callback", None)
        if callback is None:  # pragma: no cover - every pyzmq we support has it
            raise RuntimeError("cannot hand shell messages back to this kernel")
        run = getattr(stream, "_run_callback", None)

        def replay() -> None:
            for msg in deferred:
                if run is not None:
                    run(callback, msg)
                else:
                    result = callback(msg)
                    if inspect.isawaitable(result):
                        import asyncio

                        asyncio.ensure_future(result)

        stream.io_loop.add_callback(replay)
