"""The few things AnyIO does not offer portably, one small module per backend.

AnyIO (as of 4.16) has no public, non-blocking way to schedule a callback on its
loop from another thread: ``from_thread.run_sync`` waits for the round trip, which
caps a worker near 2,000 tasks/s.  Nor can it tell whether the current task is
inside a shielded scope, which the soft time limit must respect.  Each backend
module exposes the same functions; the last reads private state of AnyIO or
Trio and answers "shielded" when that state is not where it expects.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol, cast

from ..settings import BACKENDS

__all__ = ["BACKENDS", "BackendModule", "load"]


class BackendModule(Protocol):
    def current_call_soon_threadsafe(self) -> Callable[[Callable[[], object]], None]:
        """Return a thread-safe, non-blocking "run this on the running loop"."""

    def run_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Translate celery_anyio backend options into ``anyio.run`` options."""

    def loop_name(self) -> str:
        """The running event loop's implementation (``asyncio``, ``uvloop``, ``trio``)."""

    def cancellation_sent(self, value: object) -> BaseException | None:
        """The cancellation a task is resumed with, when it comes as a sent value.

        asyncio throws cancellations into a task; trio sends it an outcome that
        the innermost frame unwraps.
        """

    def error_to_send(self, exc: BaseException) -> object:
        """What to send to a resumed task instead, so it raises ``exc``."""

    def in_shielded_scope(self) -> bool:
        """Whether the current task is inside a shielded cancel scope.

        True when it cannot tell: callers must then take the safe path.
        """


def load(name: str) -> BackendModule:
    if name not in BACKENDS:
        raise LookupError(f"unknown AnyIO backend {name!r}: choose one of {', '.join(BACKENDS)}")
    return cast(BackendModule, importlib.import_module(f"{__name__}._{name}"))
