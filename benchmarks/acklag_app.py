"""The Celery app the ack-lag workers run (``celery -A benchmarks.acklag_app worker``).

Each process of the worker notes, per task id, three ``time.monotonic()`` readings
(one clock for every process of the machine): the end of the task's body, the
``task_postrun`` signal (the result is stored by then) and the moment the consumer
sends the task's ack (``kombu.Message.ack``). It keeps them in memory and writes them
to three Redis hashes when it shuts down (``worker_process_shutdown`` in every
process that runs tasks, ``worker_shutdown`` in the main one): nothing is written on
the tasks' path. Broker, queue and the key prefix come from the environment.
"""

from __future__ import annotations

import os
import time
from typing import Any

import anyio
import redis
from celery import Celery, current_task, signals
from kombu.message import Message

BROKER_ENV = "CELERY_ANYIO_ACKLAG_BROKER"
RESULTS_ENV = "CELERY_ANYIO_ACKLAG_RESULTS"
QUEUE_ENV = "CELERY_ANYIO_ACKLAG_QUEUE"
KEY_ENV = "CELERY_ANYIO_ACKLAG_KEY"
DEFAULT_REDIS = "redis://127.0.0.1:6379/13"
MOMENTS = ("body", "postrun", "ack")

app = Celery(
    "acklag",
    broker=os.environ.get(BROKER_ENV, DEFAULT_REDIS),
    backend=os.environ.get(RESULTS_ENV, DEFAULT_REDIS),
)
app.conf.update(
    task_default_queue=os.environ.get(QUEUE_ENV, "celery-anyio-acklag"),
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    result_expires=3600,
    broker_connection_retry_on_startup=True,
)
# ``worker_anyio_result_threads`` (0: results stored on the loop thread), as in benchapp.
if os.environ.get("CELERY_ANYIO_BENCH_RESULT_THREADS"):
    app.conf.worker_anyio_result_threads = int(os.environ["CELERY_ANYIO_BENCH_RESULT_THREADS"])

_noted: dict[str, dict[str, float]] = {moment: {} for moment in MOMENTS}


def _note(moment: str, task_id: Any) -> None:
    if task_id:
        _noted[moment][str(task_id)] = time.monotonic()


@app.task
async def sleep_async(seconds: float) -> None:
    await anyio.sleep(seconds)
    _note("body", current_task.request.id)


@app.task
def sleep_sync(seconds: float) -> None:
    time.sleep(seconds)
    _note("body", current_task.request.id)


@signals.task_postrun.connect
def _postrun(task_id: str | None = None, **_: Any) -> None:
    _note("postrun", task_id)


_stock_ack = Message.ack


def _ack(self: Message, multiple: bool = False) -> None:
    _note("ack", (self.headers or {}).get("id"))
    _stock_ack(self, multiple)


Message.ack = _ack  # type: ignore[method-assign]  # the measurement


def _write(**_: Any) -> None:
    key = os.environ.get(KEY_ENV)
    if not key:
        return
    store = redis.Redis.from_url(os.environ.get(RESULTS_ENV, DEFAULT_REDIS))
    with store.pipeline() as pipe:
        for moment, times in _noted.items():
            if times:
                pipe.hset(f"{key}:{moment}", mapping={k: repr(v) for k, v in times.items()})
                pipe.expire(f"{key}:{moment}", 3600)
        pipe.execute()


signals.worker_process_shutdown.connect(_write, weak=False)
signals.worker_shutdown.connect(_write, weak=False)
