"""trio backend: the run's ``TrioToken.run_sync_soon``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio


def current_call_soon_threadsafe() -> Callable[[Callable[[], object]], None]:
    token = trio.lowlevel.current_trio_token()

    def call_soon(callback: Callable[[], object]) -> None:
        token.run_sync_soon(callback)

    return call_soon


def run_options(options: dict[str, Any]) -> dict[str, Any]:
    return {}
