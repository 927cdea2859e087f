"""The Celery app the worker subprocesses under test run (``-A tests.workerapp``).

Broker, result backend and queue come from the environment so that every test
run uses its own Redis database and queue names.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
from celery import Celery, current_task, signals

app = Celery(
    "workerapp",
    broker=os.environ.get("CELERY_ANYIO_TEST_BROKER", "redis://127.0.0.1:6379/11"),
    backend=os.environ.get("CELERY_ANYIO_TEST_RESULTS", "redis://127.0.0.1:6379/11"),
)
app.conf.update(
    task_default_queue=os.environ.get("CELERY_ANYIO_TEST_QUEUE", "celery"),
    result_expires=600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
_extra = os.environ.get("CELERY_ANYIO_TEST_CONF")
if _extra:
    import json

    app.conf.update(json.loads(_extra))

_marks: dict[str, list[str]] = {"prerun": [], "postrun": []}


@signals.task_prerun.connect
def _on_prerun(task_id: str | None = None, **_: Any) -> None:
    current = current_task.request.id if current_task else None
    if current != task_id:
        _marks["prerun"].append(f"{task_id}!={current}")


@app.task
async def sleepy(x: int, seconds: float = 0.5) -> int:
    await anyio.sleep(seconds)
    return x


@app.task
async def noop() -> None:
    return None


@app.task(bind=True)
async def whoami(self: Any, seconds: float = 0.05) -> dict[str, Any]:
    before = self.request.id
    current_before = current_task.request.id
    await anyio.sleep(seconds)
    after = self.request.id
    in_thread = await anyio.to_thread.run_sync(lambda: current_task.request.id)
    async with anyio.create_task_group() as tg:
        seen: list[str] = []

        async def child() -> None:
            await anyio.lowlevel.checkpoint()
            seen.append(self.request.id)

        tg.start_soon(child)
    return {
        "before": before,
        "after": after,
        "current": current_before,
        "thread": in_thread,
        "child": seen[0],
        "prerun_mismatches": len(_marks["prerun"]),
    }


@app.task
def sync_add(a: int, b: int) -> dict[str, Any]:
    return {"sum": a + b, "thread": threading.current_thread().name}


@app.task
async def add(a: int, b: int) -> int:
    await anyio.sleep(0.01)
    return a + b


@app.task
async def total(values: list[int]) -> int:
    await anyio.sleep(0.01)
    return sum(values)


@app.task(bind=True, max_retries=5)
async def flaky(self: Any, fail_times: int) -> int:
    await anyio.sleep(0.01)
    if self.request.retries < fail_times:
        raise self.retry(countdown=0.1)
    return int(self.request.retries)


@app.task(
    bind=True, autoretry_for=(ValueError,), retry_backoff=0.1, retry_jitter=False, max_retries=4
)
async def auto_flaky(self: Any, fail_times: int) -> int:
    await anyio.sleep(0.01)
    if self.request.retries < fail_times:
        raise ValueError(f"attempt {self.request.retries}")
    return int(self.request.retries)


@app.task(bind=True)
async def progress(self: Any) -> str:
    self.update_state(state="PROGRESS", meta={"step": 1})
    await anyio.sleep(0.3)
    return "done"


@app.task
async def boom(message: str) -> None:
    await anyio.sleep(0.01)
    raise ValueError(message)


@app.task(ignore_result=True)
async def mark(key: str) -> None:
    """Record that the body ran, in Redis, for tasks whose result is ignored."""
    await anyio.sleep(0.01)
    import redis

    redis.Redis.from_url(app.conf.result_backend).set(key, "ran", ex=600)


@app.task(acks_late=True)
async def late_sleepy(x: int, seconds: float) -> int:
    await anyio.sleep(seconds)
    return x


_tally_store: Any = None


def _tally(key: str, member: str) -> None:
    global _tally_store
    if _tally_store is None:
        import redis

        _tally_store = redis.Redis.from_url(app.conf.result_backend)
    _tally_store.hincrby(key, member, 1)


@app.task(ignore_result=True)
async def tally(key: str, member: str) -> None:
    """Count executions per message: lost ones are missing, redelivered ones count 2."""
    await anyio.lowlevel.checkpoint()
    _tally(key, member)


@app.task(ignore_result=True, acks_late=True)
async def tally_late(key: str, member: str) -> None:
    await anyio.lowlevel.checkpoint()
    _tally(key, member)
