"""The Celery app the worker subprocesses under test run (``-A tests.workerapp``).

Broker, result backend and queue come from the environment so that every test
run uses its own Redis database and queue names.
"""

from __future__ import annotations

import contextvars
import os
import threading
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
from celery import Celery, current_task, signals

from . import ackwatch

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

ackwatch.install(app)

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


@app.task
async def loop_gaps(seconds: float, tick: float = 0.01) -> float:
    """The longest the loop kept this task waiting for a ``tick`` sleep, in seconds."""
    longest = 0.0
    deadline = anyio.current_time() + seconds
    while (now := anyio.current_time()) < deadline:
        await anyio.sleep(tick)
        longest = max(longest, anyio.current_time() - now - tick)
    return longest


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


# celery-types: retry_backoff is a bool or an int; Celery takes any number of seconds.
@app.task(  # type: ignore[call-overload, untyped-decorator]
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


def _tally(key: str, member: str) -> int:
    """Count ``member`` in the Redis hash ``key``; return the new count."""
    global _tally_store
    if _tally_store is None:
        import redis

        _tally_store = redis.Redis.from_url(app.conf.result_backend)
    return int(_tally_store.hincrby(key, member, 1))


@app.task(ignore_result=True)
async def tally(key: str, member: str) -> None:
    """Count executions per message: lost ones are missing, redelivered ones count 2."""
    await anyio.lowlevel.checkpoint()
    _tally(key, member)


@app.task(ignore_result=True, acks_late=True)
async def tally_late(key: str, member: str) -> None:
    await anyio.lowlevel.checkpoint()
    _tally(key, member)


@app.task
async def guarded(key: str, seconds: float) -> str:
    """Sleeps; its ``finally`` records (shielded) that cleanup ran."""
    try:
        await anyio.sleep(seconds)
        return "slept"
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.sleep(0.01)
            _tally(key, "finally")


@app.task(bind=True)
async def rejecting(self: Any) -> None:
    from celery.exceptions import Reject

    await anyio.sleep(0.01)
    raise Reject("no thanks", requeue=False)


@app.task(bind=True)
async def ignoring(self: Any) -> None:
    from celery.exceptions import Ignore

    await anyio.sleep(0.01)
    raise Ignore()


@app.task(rate_limit="5/s")
async def limited(i: int) -> float:
    import time

    await anyio.lowlevel.checkpoint()
    return time.time()


@app.task
async def calls_other(x: int) -> int:
    """``await other_task(...)`` inside a task is a plain call."""
    return int(await add(x, x))


class _Hooked(app.Task):  # type: ignore[name-defined,misc]
    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        _tally(f"hooks:{args[0]}", f"on_success:{task_id}")

    def on_failure(self, exc: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        _tally(f"hooks:{args[0]}", f"on_failure:{task_id}")

    def after_return(self, status: str, retval: Any, task_id: str, *rest: Any) -> None:
        _tally(f"hooks:{rest[0][0]}", f"after_return:{status}:{task_id}")


@app.task(base=_Hooked, bind=True)
async def hooked(self: Any, key: str, fail: bool) -> str:
    await anyio.sleep(0.01)
    if fail:
        raise RuntimeError("hooked failure")
    return "ok"


def _record_signal(name: str) -> Any:
    def receiver(sender: Any = None, **kwargs: Any) -> None:
        request = kwargs.get("request")
        task_id = kwargs.get("task_id") or getattr(request, "id", None)
        if task_id is None and sender is not None and hasattr(sender, "request"):
            task_id = sender.request.id
        args = kwargs.get("args") or getattr(request, "args", None)
        if not args and sender is not None and hasattr(sender, "request"):
            args = sender.request.args  # task_success carries only the result
        args = args or ()
        if args and isinstance(args[0], str) and args[0].startswith("sig:"):
            current = current_task.request.id if current_task else None
            _tally(args[0], f"{name}:{task_id}:{current == task_id}")

    return receiver


for _name in ("task_received", "task_prerun", "task_postrun", "task_success",
              "task_failure", "task_retry"):  # fmt: skip
    getattr(signals, _name).connect(_record_signal(_name), weak=False)


@app.task(bind=True, max_retries=1)
async def signalled(self: Any, key: str, fail: bool) -> str:
    await anyio.sleep(0.01)
    if fail and self.request.retries == 0:
        raise self.retry(countdown=0.05)
    if fail:
        raise RuntimeError("signalled failure")
    return "ok"


# -- the async client API inside a worker (tests/test_aio.py) ------------------


@app.task(bind=True)
async def lineage(self: Any, depth: int) -> list[dict[str, Any]]:
    """Send the next level with ``adelay`` and await it with ``aget``, as a task."""
    request = self.request
    me = {"id": request.id, "parent_id": request.parent_id, "root_id": request.root_id}
    if depth <= 0:
        return [me]
    child = await lineage.adelay(depth - 1)  # type: ignore[attr-defined]  # install_aio() adds it
    return [me, *await child.aget(timeout=30)]


@app.task
async def fan_out(n: int) -> list[int]:
    """Send a group from a task and await all of it."""
    from celery import group

    result = await group(add.s(i, i) for i in range(n)).aapply_async()  # type: ignore[attr-defined]  # install_aio() adds it
    return list(await result.aget(timeout=30))


class Kaput(Exception):
    """A task's own exception type: a client that can import it gets it back."""


# `throws`: an expected error, logged at INFO, so the shared worker's log stays clean.
@app.task(throws=(Kaput,))
async def kaput(message: str) -> None:
    await anyio.sleep(0.01)
    raise Kaput(message)


# -- context from task_prerun into the body and back (tests/test_signal_context.py) --

set_by_prerun: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "set_by_prerun", default=None
)
set_by_body: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "set_by_body", default=None
)


@signals.task_prerun.connect
def _prerun_sets_context(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    if task is not None and task.name.endswith(".context_probe"):
        set_by_prerun.set(task_id)


@signals.task_postrun.connect
def _postrun_reads_context(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    if task is not None and task.name.endswith(".context_probe"):
        key = task.request.args[0]
        _tally(key, "postrun saw the body" if set_by_body.get() == task_id else "postrun: wrong")


@app.task(bind=True)
async def context_probe(self: Any, key: str, seconds: float) -> str:
    """Reports what ``task_prerun`` left in the context, across awaits and in a child."""
    seen = [set_by_prerun.get()]
    await anyio.sleep(seconds)
    seen.append(set_by_prerun.get())
    seen.append(await anyio.to_thread.run_sync(set_by_prerun.get))
    set_by_body.set(self.request.id)
    ok = all(value == self.request.id for value in seen)
    _tally(key, "body saw prerun" if ok else f"body: wrong {seen}")
    return "ok" if ok else "wrong"
