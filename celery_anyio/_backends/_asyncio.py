"""asyncio backend: the loop's own ``call_soon_threadsafe``."""

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
