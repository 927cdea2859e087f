"""The saq reference worker: ``saq benchmarks.saq_app.settings``.

One queue on the Redis the harness names in the environment, ``concurrency``
jobs at once per process; the jobs mirror ``benchapp``'s async ``noop`` and
``io``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

from redis import asyncio as aioredis
from saq.queue.redis import RedisQueue

from .cases import BROKER_ENV, CONCURRENCY_ENV, QUEUE_ENV, READY_MARKER

DEFAULT_REDIS = "redis://127.0.0.1:6379/14"


async def noop(ctx: dict[str, Any], *, sent: float = 0.0) -> list[float]:
    now = time.time()
    return [sent, now, now]


async def io(ctx: dict[str, Any], *, seconds: float, sent: float = 0.0) -> list[float]:
    started = time.time()
    await asyncio.sleep(seconds)
    return [sent, started, time.time()]


async def _announce_ready(ctx: dict[str, Any]) -> None:
    print(f"{READY_MARKER}{time.time():.6f}", file=sys.stderr, flush=True)


CONCURRENCY = int(os.environ.get(CONCURRENCY_ENV, "500"))
# Each of the ``concurrency`` job slots dequeues on a connection of its own:
# more than redis-py's default cap of 100 connections.
REDIS = aioredis.from_url(
    os.environ.get(BROKER_ENV, DEFAULT_REDIS), max_connections=CONCURRENCY + 50
)
settings = {
    "queue": RedisQueue(REDIS, name=os.environ.get(QUEUE_ENV, "saq-bench")),
    "functions": [noop, io],
    "concurrency": CONCURRENCY,
    "startup": _announce_ready,
}
