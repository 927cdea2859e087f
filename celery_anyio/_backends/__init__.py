"""The few things AnyIO does not offer portably, one small module per backend.

AnyIO (as of 4.14) has no public, non-blocking way to schedule a callback on its
loop from another thread: ``from_thread.run_sync`` waits for the round trip, which
caps a worker near 2,000 tasks/s.  Each backend module exposes the same functions.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol, cast

BACKENDS = ("asyncio", "trio")


class BackendModule(Protocol):
    def current_call_soon_threadsafe(self) -> Callable[[Callable[[], object]], None]:
        """Return a thread-safe, non-blocking "run this on the running loop"."""

    def run_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Translate celery_anyio backend options into ``anyio.run`` options."""


def load(name: str) -> BackendModule:
    if name not in BACKENDS:
        raise LookupError(f"unknown AnyIO backend {name!r}: choose one of {', '.join(BACKENDS)}")
    return cast(BackendModule, importlib.import_module(f"{__name__}._{name}"))
