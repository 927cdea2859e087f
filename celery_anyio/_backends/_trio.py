"""trio backend: the run's ``TrioToken.run_sync_soon``; the task's cancel status."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import outcome
import trio


def current_call_soon_threadsafe() -> Callable[[Callable[[], object]], None]:
    token = trio.lowlevel.current_trio_token()

    def call_soon(callback: Callable[[], object]) -> None:
        token.run_sync_soon(callback)

    return call_soon


def run_options(options: dict[str, Any]) -> dict[str, Any]:
    return {}


def loop_name() -> str:
    return "trio"


def cancellation_sent(value: object) -> BaseException | None:
    if isinstance(value, outcome.Error) and isinstance(value.error, trio.Cancelled):
        return value.error
    return None


def error_to_send(exc: BaseException) -> object:
    return outcome.Error(exc)


def in_shielded_scope() -> bool:
    try:
        status: Any = trio.lowlevel.current_task()._cancel_status
        while status is not None:
            if status._scope.shield:
                return True
            status = status._parent
    except AttributeError:
        return True
    return False
