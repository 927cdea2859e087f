"""A worker lifespan and async signal receivers (run by tests/test_async_api.py).

    celery -A docs.examples.worker_resources worker -P celery_anyio:Pool --backend=trio

The lifespan opens one shared resource per worker, on the worker's own event
loop, before the first task; every task reaches it with
``celery_anyio.resources()``.  In a real project it would be an
``httpx.AsyncClient`` or a database pool; here it is a small object with an
``anyio.Lock`` (bound to the loop it was made on) and a counter.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
from celery import Celery, signals

import celery_anyio

app = Celery(
    "worker_resources",
    broker=os.environ.get("CELERY_ANYIO_TEST_BROKER", "redis://127.0.0.1:6379/0"),
    backend=os.environ.get("CELERY_ANYIO_TEST_RESULTS", "redis://127.0.0.1:6379/0"),
)
app.conf.task_default_queue = os.environ.get("CELERY_ANYIO_TEST_QUEUE", "celery")
logger = logging.getLogger("worker_resources")


@dataclass
class Resources:
    """What the lifespan shares: made once, used by every task."""

    lock: anyio.Lock = field(default_factory=anyio.Lock)
    calls: int = 0
    prerun_seen: set[str] = field(default_factory=set)


@celery_anyio.lifespan(app)
async def lifespan(app: Celery) -> AsyncIterator[Resources]:
    resources = Resources()
    logger.warning("lifespan: entered on %s", threading.current_thread().name)
    try:
        yield resources
    finally:
        await anyio.sleep(0.01)  # async cleanup, e.g. `await client.aclose()`
        logger.warning("lifespan: exited after %d calls", resources.calls)


@app.task(bind=True)
async def use_resource(self: Any) -> dict[str, Any]:
    resources: Resources = celery_anyio.resources()
    async with resources.lock:  # a loop-bound primitive, shared across tasks
        resources.calls += 1
        await anyio.sleep(0.01)
    return {
        "pid": os.getpid(),
        "resources": id(resources),
        "prerun_saw_me": self.request.id in resources.prerun_seen,
    }


@signals.task_prerun.connect
async def remember_task(task_id: str | None = None, **_: Any) -> None:
    """An async receiver, awaited on the worker loop before the task body runs."""
    await anyio.lowlevel.checkpoint()
    celery_anyio.resources().prerun_seen.add(task_id)


@signals.worker_ready.connect
async def announce(**_: Any) -> None:
    """Sent from Celery's main thread: awaited on the worker loop all the same."""
    await anyio.lowlevel.checkpoint()
    logger.warning("worker_ready receiver ran on %s", threading.current_thread().name)


@signals.task_postrun.connect
async def flaky_receiver(task: Any = None, **_: Any) -> None:
    """A failing receiver is logged by Celery and does not fail the task."""
    await anyio.lowlevel.checkpoint()
    raise RuntimeError("this receiver always fails")
