"""Run a coroutine to completion from synchronous code, on a loop of its own.

Used where no worker loop can take it: eager mode (``task.apply()``) and
signal receivers sent outside a worker.  A thread that already runs an event
loop cannot start another, so there the coroutine runs on a helper thread
while the caller waits.  The helper does not copy the caller's context (it
holds the caller's running-loop markers); ``before`` sets what it needs.  In the
caller's own thread the loop runs in a copy of the caller's context, so what
``before`` sets (the job's identity) does not outlive the call there.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import anyio.lowlevel
import outcome


def run_on_own_loop(
    make_coro: Callable[[], Coroutine[Any, Any, Any]],
    backend: str,
    before: Callable[[], object] | None = None,
) -> Any:
    """``anyio.run(make_coro)``, in a helper thread if this one runs a loop.

    ``before`` runs first in the thread that runs the loop.
    """

    def run_here() -> Any:
        if before is not None:
            before()
        return anyio.run(make_coro, backend=backend)

    try:
        anyio.lowlevel.current_token()
    except Exception:  # noqa: BLE001 - NoEventLoopError: this thread runs no loop
        return contextvars.copy_context().run(run_here)

    result: list[outcome.Outcome[Any]] = []
    helper = threading.Thread(
        target=lambda: result.append(outcome.capture(run_here)), name="celery-anyio-own-loop"
    )
    helper.start()
    helper.join()
    return result[0].unwrap()
