"""Handling widget clicks while a cell blocks, on each supported ipykernel.

A kernel runs one shell message at a time: while a cell blocks, a click on a button (a comm
message on the shell channel) waits until the cell ends.  `ShellPump` reads the messages meant
for the blocked main shell itself, handles comm messages at once, and hands every other
message (the next cells' execute requests, above all) back to the kernel in order when the
wait is over.  Each ipykernel version's way in is kept in `_main_shell_stream`, with its note.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

__all__ = ["ShellPump"]

_COMM_TYPES = frozenset({"comm_msg", "comm_close"})


def _kernel() -> Any | None:
    if "ipykernel" not in sys.modules:
        return None
    from ipykernel.kernelbase import Kernel

    return Kernel.instance() if Kernel.initialized() else None


def _main_shell_stream(kernel: Any) -> Any | None:
    """The ZMQStream from which the main thread takes its shell messages."""
    channel_thread = getattr(kernel, "shell_channel_thread", None)
    if channel_thread is not None:
        # ipykernel 7.1+: a shell channel thread receives every shell message and forwards the
        # main shell's through an inproc socket pair, read on the main thread's loop.
        # (ipykernel 7.0.x is excluded by our requirements: it broke widgets updated from threads.)
        manager = channel_thread.manager
        pair = getattr(manager, "get_shell_channel_to_subshell_pair", None)
        if pair is not None:
            return pair(None).to_stream
        legacy = getattr(manager, "_shell_channel_to_main", None)
        return getattr(legacy, "to_stream", None)
    # ipykernel 6.x (and 7 without a shell channel thread): the main thread reads the shell
    # socket itself.  Its do_one_iteration() is a no-op from 7.1 on, so it is not used anywhere.
    return getattr(kernel, "shell_stream", None)


class ShellPump:
    """Use as a context manager around a blocking wait; call `pump()` often inside it."""

    def __init__(self) -> None:
        self.kernel: Any = _kernel()
        self.stream: Any = _main_shell_stream(self.kernel) if self.kernel is not None else None
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
            if header.get("msg_type") not in _COMM_TYPES or header.get("subshell_id"):
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
