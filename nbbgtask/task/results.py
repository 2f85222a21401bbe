"""Other tasks' results as a task's arguments: `ResultOf` stands for a prerequisite's result in the
job, and is replaced by that result when the task starts (`resolved`), read from the store there,
so a large result never passes through the kernel that started the task."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from nbbgtask.core.errors import NbbgtaskError
from nbbgtask.core.states import State
from nbbgtask.core.trust import read_owned
from nbbgtask.store.files import result_path
from nbbgtask.store.store import store_for

__all__ = ["ResultOf", "replaced", "resolved", "load_result"]


class ResultOf:
    """The result of task ``task_id``, once it has completed."""

    __slots__ = ("task_id",)

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id

    def __reduce__(self) -> Any:
        return (ResultOf, (self.task_id,))

    def __repr__(self) -> str:
        return f"ResultOf({self.task_id[:8]})"


def _one_level(value: Any, swap: Any) -> Any:
    """``value`` with ``swap`` applied to it, or to its items one level deep (list, tuple, dict)."""
    if isinstance(value, list):
        return [swap(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):  # a namedtuple stays as it is
        return tuple(swap(v) for v in value)
    if isinstance(value, dict):
        return {k: swap(v) for k, v in value.items()}
    return swap(value)


def replaced(
    args: tuple[Any, ...], kwargs: dict[str, Any], is_handle: Any
) -> tuple[tuple[Any, ...], dict[str, Any], list[str]]:
    """``args`` and ``kwargs`` with each handle (``is_handle(value)`` returns its id, else
    ``None``) swapped for a `ResultOf`; and the ids found, in order."""
    found: list[str] = []

    def swap(value: Any) -> Any:
        task_id = is_handle(value)
        if task_id is None:
            return value
        if task_id not in found:
            found.append(task_id)
        return ResultOf(task_id)

    new_args = tuple(_one_level(a, swap) for a in args)
    new_kwargs = {k: _one_level(v, swap) for k, v in kwargs.items()}
    return new_args, new_kwargs, found


def load_result(home: Path, task_id: str) -> Any:
    """Task ``task_id``'s result, read from the store of ``home``; it must have completed."""
    import cloudpickle

    record = store_for(home).get(task_id)
    if record is None or record["state"] != State.COMPLETE.value:
        state = "gone from the store" if record is None else record["state"]
        raise NbbgtaskError(f"the result of task {task_id[:8]} was to be an argument, but that task is {state}")
    if not record.get("has_result"):
        return None
    inline = record.get("result_inline")
    data = base64.b64decode(inline) if inline is not None else read_owned(result_path(home, task_id))
    return cloudpickle.loads(data)


def resolved(home: Path, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``args`` and ``kwargs`` with every `ResultOf` (one level deep) replaced by its result."""
    cache: dict[str, Any] = {}

    def swap(value: Any) -> Any:
        if not isinstance(value, ResultOf):
            return value
        if value.task_id not in cache:
            cache[value.task_id] = load_result(home, value.task_id)
        return cache[value.task_id]

    if not any(isinstance(v, ResultOf) or isinstance(v, (list, tuple, dict)) for v in (*args, *kwargs.values())):
        return args, kwargs
    return tuple(_one_level(a, swap) for a in args), {k: _one_level(v, swap) for k, v in kwargs.items()}
