"""The worker app of the process lifecycle tests (``-A tests.processapp``).

Every process that runs tasks records its ``worker_process_init`` and
``worker_process_shutdown`` in the Redis hash named by
``CELERY_ANYIO_TEST_LIFECYCLE``.
"""

from __future__ import annotations

import gc
import os
from typing import Any

import anyio
from celery import signals

from .limitsapp import app
from .workerapp import _tally

__all__ = ["app"]

LIFECYCLE_ENV = "CELERY_ANYIO_TEST_LIFECYCLE"
_hoard: list[bytes] = []


def _record(event: str) -> None:
    key = os.environ.get(LIFECYCLE_ENV)
    if key:
        _tally(key, f"{event}:{os.getpid()}")


@signals.worker_process_init.connect(weak=False)
def _on_init(**_: Any) -> None:
    _record("init")


@signals.worker_process_shutdown.connect(weak=False)
def _on_shutdown(**_: Any) -> None:
    _record("shutdown")


@app.task(bind=True)
async def where(self: Any, key: str, member: str, seconds: float) -> int:
    """Records its start and finish per member; returns the process that ran it."""
    _tally(key, f"started:{member}")
    await anyio.sleep(seconds)
    _tally(key, f"finished:{member}")
    return os.getpid()


@app.task(bind=True, acks_late=True, reject_on_worker_lost=True)
async def redelivered(self: Any, key: str, member: str, seconds: float) -> int:
    """An acks_late task Celery gives back to the broker when its process dies."""
    starts = _tally(key, f"started:{member}")
    await anyio.sleep(seconds if starts == 1 else 0.05)
    _tally(key, f"finished:{member}")
    return os.getpid()


@app.task
async def hoard(megabytes: int) -> int:
    """Keeps ``megabytes`` for the life of its process (for --max-memory-per-child)."""
    _hoard.append(b"x" * (megabytes * 1024 * 1024))
    await anyio.sleep(0.05)
    return os.getpid()


@app.task
async def block_loop(key: str, seconds: float) -> str:
    """Holds its process's event loop (the mistake a cold stop must survive)."""
    import time

    _tally(key, "started:blocker")
    time.sleep(seconds)  # noqa: ASYNC251 - the point of the task
    return "unblocked"


@app.task
async def frozen() -> tuple[int, int]:
    """Its process's id and how many objects its garbage collector never visits."""
    await anyio.sleep(0.05)
    return os.getpid(), gc.get_freeze_count()
