"""The taskiq reference worker: ``taskiq worker benchmarks.taskiq_app:broker``.

taskiq-redis's stream broker (a consumer group, each message acked once its
result is stored) and its Redis result backend, on the queue the harness names
in the environment; the tasks mirror ``benchapp``'s async ``noop`` and ``io``.
"""

from __future__ import annotations

import os
import sys
import time

from taskiq import AsyncBroker, TaskiqEvents, TaskiqState
from taskiq.serializers import JSONSerializer
from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

from .cases import BROKER_ENV, QUEUE_ENV, READY_MARKER

DEFAULT_REDIS = "redis://127.0.0.1:6379/14"


def make_broker(url: str, queue: str) -> AsyncBroker:
    """``consumer_id="0"``: the group reads the messages pre-loaded before it existed.

    Results in JSON, as Celery's (the backend's default is pickle).
    """
    backend: RedisAsyncResultBackend[list[float]] = RedisAsyncResultBackend(
        url, prefix_str=queue, result_ex_time=3600, serializer=JSONSerializer()
    )
    stream = RedisStreamBroker(url, queue_name=queue, consumer_group_name=queue, consumer_id="0")
    return stream.with_result_backend(backend)


broker = make_broker(
    os.environ.get(BROKER_ENV, DEFAULT_REDIS), os.environ.get(QUEUE_ENV, "taskiq-bench")
)


@broker.on_event(TaskiqEvents.WORKER_STARTUP)
async def _announce_ready(state: TaskiqState) -> None:
    print(f"{READY_MARKER}{time.time():.6f}", file=sys.stderr, flush=True)


@broker.task(task_name="bench.noop")
async def noop(sent: float = 0.0) -> list[float]:
    now = time.time()
    return [sent, now, now]


@broker.task(task_name="bench.io")
async def io(seconds: float, sent: float = 0.0) -> list[float]:
    import asyncio

    started = time.time()
    await asyncio.sleep(seconds)
    return [sent, started, time.time()]
