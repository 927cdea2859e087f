"""The worker side of ``async_client.py``.

    celery -A tasks worker -P celery_anyio:Pool --backend trio

Broker, result backend and queue come from ``CELERY_BROKER_URL`` (default
``redis://127.0.0.1:6379/0``), ``CELERY_RESULT_BACKEND`` (default the same Redis)
and ``CELERY_QUEUE`` (default ``celery``).
"""

from __future__ import annotations

import os

import anyio
from celery import Celery

import celery_anyio

celery_anyio.install_aio()  # adelay/aapply_async/asend_task/aget on Celery's classes

REDIS = "redis://127.0.0.1:6379/0"
app = Celery(
    "tasks",
    broker=os.environ.get("CELERY_BROKER_URL", REDIS),
    backend=os.environ.get("CELERY_RESULT_BACKEND", REDIS),
)
app.conf.task_default_queue = os.environ.get("CELERY_QUEUE", "celery")


@app.task
async def add(a: int, b: int) -> int:
    await anyio.sleep(0.1)
    return a + b


@app.task
async def total(values: list[int]) -> int:
    return sum(values)


@app.task
async def sleepy(seconds: float) -> float:
    await anyio.sleep(seconds)
    return seconds


@app.task
async def add_twice(a: int, b: int) -> int:
    """Sends subtasks and awaits them: the loop runs other tasks meanwhile."""
    first = await add.adelay(a, b)
    second = await add.adelay(await first.aget(timeout=10), b)
    return int(await second.aget(timeout=10))
