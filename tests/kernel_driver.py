"""Drives a real ipykernel over jupyter_client the way a notebook front end does."""

from __future__ import annotations

import json
import queue
import tempfile
import time
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager


def _spec_manager(python: Path) -> KernelSpecManager:
    """A kernelspec that starts ipykernel from ``python``'s environment."""
    folder = Path(tempfile.mkdtemp(prefix="nbbgtask-kernels-"))
    spec = folder / "python3"
    spec.mkdir()
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python ({python})",
        "language": "python",
    }))
    return KernelSpecManager(kernel_dirs=[str(folder)])


class Kernel:
    def __init__(self, env: dict[str, str], python: Path) -> None:
        self.km = KernelManager(kernel_name="python3", kernel_spec_manager=_spec_manager(python))
        self.km.start_kernel(env=env)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)
        #: every iopub message seen so far, in order
        self.iopub: list[dict[str, Any]] = []

    def _drain(self, timeout: float) -> dict[str, Any] | None:
        try:
            msg = self.kc.get_iopub_msg(timeout=timeout)
        except queue.Empty:
            return None
        self.iopub.append(msg)
        return msg

    def submit(self, code: str, stop_on_error: bool = True, subshell_id: str | None = None) -> str:
        """Send a cell (to a subshell, if given); returns its msg_id without waiting."""
        if subshell_id is None:
            return self.kc.execute(code, allow_stdin=False, stop_on_error=stop_on_error)
        content = {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                   "allow_stdin": False, "stop_on_error": stop_on_error}
        msg = self.kc.session.msg("execute_request", content)
        msg["header"]["subshell_id"] = subshell_id
        self.kc.shell_channel.send(msg)
        return msg["header"]["msg_id"]

    def create_subshell(self) -> str:
        """What JupyterLab >= 4.4 does on connecting to a kernel that supports subshells (JEP 91)."""
        msg = self.kc.session.msg("create_subshell_request", {})
        self.kc.control_channel.send(msg)
        while True:
            reply = self.kc.get_control_msg(timeout=30)
            if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                assert reply["content"]["status"] == "ok", reply["content"]
                return reply["content"]["subshell_id"]

    def wait(self, msg_id: str, timeout: float = 60) -> dict[str, Any]:
        """Collect iopub until the cell is idle; returns {'status', 'stdout', 'stderr', 'error', 'messages'}."""
        out: dict[str, Any] = {"stdout": "", "stderr": "", "error": None, "messages": [], "data": []}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self._drain(0.2)
            if msg is None or msg["parent_header"].get("msg_id") != msg_id:
                continue
            out["messages"].append(msg)
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                out[content["name"]] += content["text"]
            elif kind == "error":
                out["error"] = content
            elif kind in ("execute_result", "display_data"):
                out["data"].append(content["data"])
            elif kind == "status" and content["execution_state"] == "idle":
                reply = self.kc.get_shell_msg(timeout=timeout)
                while reply["parent_header"].get("msg_id") != msg_id:
                    reply = self.kc.get_shell_msg(timeout=timeout)
                out["status"] = reply["content"]["status"]
                return out
        raise TimeoutError(f"cell {msg_id} did not finish within {timeout} s")

    def run(self, code: str, timeout: float = 60) -> dict[str, Any]:
        return self.wait(self.submit(code), timeout)

    def ok(self, code: str, timeout: float = 60) -> str:
        """Run a cell that must succeed; its stdout."""
        out = self.run(code, timeout)
        if out["status"] != "ok":
            err = out["error"] or {}
            raise AssertionError(f"cell failed: {err.get('ename')}: {err.get('evalue')}\n" + "\n".join(err.get("traceback", [])))
        return out["stdout"]

    def drain_all(self, seconds: float) -> list[dict[str, Any]]:
        """Collect iopub for ``seconds`` (e.g. output that arrives after a cell)."""
        end = time.monotonic() + seconds
        got = []
        while time.monotonic() < end:
            msg = self._drain(0.05)
            if msg is not None:
                got.append(msg)
        return got

    def pid(self) -> int:
        return int(self.ok("import os; print(os.getpid())").strip())

    def restart(self) -> None:
        self.km.restart_kernel(now=True)
        self.kc.wait_for_ready(timeout=60)

    def shutdown(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)
