"""asyncio backend: the loop's ``call_soon_threadsafe``; AnyIO's task states."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


def current_call_soon_threadsafe() -> Callable[[Callable[[], object]], None]:
    loop = asyncio.get_running_loop()

    def call_soon(callback: Callable[[], object]) -> None:
        loop.call_soon_threadsafe(callback)

    return call_soon


def run_options(options: dict[str, Any]) -> dict[str, Any]:
    if options.get("use_uvloop"):
        return {"use_uvloop": True}
    return {}


def loop_name() -> str:
    return type(asyncio.get_running_loop()).__module__.partition(".")[0]


def cancellation_sent(value: object) -> BaseException | None:
    return None  # asyncio throws cancellations in; nothing is ever sent


def error_to_send(exc: BaseException) -> object:
    raise NotImplementedError("asyncio throws exceptions into tasks")


def in_shielded_scope() -> bool:
    try:
        from anyio._backends._asyncio import _task_states

        state = _task_states.get(asyncio.current_task())  # type: ignore[arg-type]
        scope = state.cancel_scope if state is not None else None
        while scope is not None:
            if scope._shield:
                return True
            scope = scope._parent_scope
    except (ImportError, AttributeError, RuntimeError):
        return True
    return False
