"""Reading widget models out of a kernel's iopub traffic, as a front end would see them."""

from __future__ import annotations

from typing import Any


class Models:
    """Every widget model the kernel opened, with its state after each update, in order."""

    def __init__(self, messages: list[dict[str, Any]]) -> None:
        self.state: dict[str, dict[str, Any]] = {}
        self.history: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
        for msg in messages:
            kind, content = msg["msg_type"], msg["content"]
            if kind == "comm_open" and content.get("target_name") == "jupyter.widget":
                state = dict(content["data"]["state"])
                self.state[content["comm_id"]] = state
                self.history[content["comm_id"]] = [(msg, dict(state))]
            elif kind == "comm_msg" and content["comm_id"] in self.state:
                data = content["data"]
                if data.get("method") in ("update", "echo_update"):
                    self.state[content["comm_id"]].update(data["state"])
                    self.history[content["comm_id"]].append((msg, dict(data["state"])))

    def of(self, model_name: str, **match: Any) -> list[str]:
        return [
            mid
            for mid, st in self.state.items()
            if st.get("_model_name") == model_name and all(st.get(k) == v for k, v in match.items())
        ]

    def values(self, model_id: str, key: str = "value") -> list[Any]:
        return [st[key] for _, st in self.history[model_id] if key in st]

    def updates_during(self, model_id: str, start: str, end: str) -> list[Any]:
        """Values a model took between two ISO timestamps (message header dates)."""
        return [
            st["value"]
            for msg, st in self.history[model_id]
            if "value" in st and start <= str(msg["header"]["date"]) <= end
        ]


def click(kernel: Any, model_id: str, subshell_id: str | None = None) -> None:
    """Send what a front end sends when a person clicks an ipywidgets Button.

    ``subshell_id``: as JupyterLab >= 4.4 and Notebook 7 send it, through a subshell of their own.
    """
    msg = kernel.kc.session.msg(
        "comm_msg", {"comm_id": model_id, "data": {"method": "custom", "content": {"event": "click"}}}
    )
    if subshell_id is not None:
        msg["header"]["subshell_id"] = subshell_id
    kernel.kc.shell_channel.send(msg)
