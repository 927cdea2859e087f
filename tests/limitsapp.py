"""Tasks for the cancellation tests: limits, revoke, exception groups, exits, shutdown.

The worker subprocesses run ``-A tests.limitsapp``: the app is the one of
:mod:`tests.workerapp` (imported, so its tasks are registered too), plus these.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import anyio.lowlevel
from celery.exceptions import Ignore, Reject, SoftTimeLimitExceeded
from celery.utils.log import get_task_logger

from .workerapp import _tally, app

logger = get_task_logger(__name__)

__all__ = ["app"]


@app.task
async def soft_cleanup(key: str, seconds: float = 30) -> str:
    """Catches the soft limit, cleans up with more I/O, returns a value."""
    try:
        await anyio.sleep(seconds)
        return "slept"
    except SoftTimeLimitExceeded:
        await anyio.sleep(0.05)
        _tally(key, "cleanup")
        return "cleaned up"


@app.task
async def soft_swallower(key: str) -> str:
    """A soft-limit handler that would run forever: the hard limit must win."""
    try:
        await anyio.sleep(30)
    except SoftTimeLimitExceeded:
        _tally(key, "soft")
        await anyio.sleep(30)
    return "masked the hard limit"


@app.task
def sync_soft_cleanup(key: str) -> str:
    """The sync twin of :func:`soft_cleanup`: the exception lands in its thread."""
    try:
        for _ in range(3000):
            time.sleep(0.01)
        return "slept"
    except SoftTimeLimitExceeded:
        _tally(key, "cleanup")
        return "cleaned up"


@app.task
def sync_stuck(key: str, seconds: float) -> str:
    """Blocks in one C call, so only the reported state can be on time.

    ``unwound`` is counted when the call returns, interrupted or not: from then
    on ``returned`` either was counted or never will be.
    """
    try:
        _tally(key, "started")
        time.sleep(seconds)
        _tally(key, "returned")  # never runs: the thread is interrupted on return
        return "finished"
    finally:
        _tally(key, "unwound")


async def _fail_after(delay: float, exc: BaseException) -> None:
    # Shielded, so a sibling's failure cannot cancel this child before it raises:
    # every child's exception reaches the group, on both backends.
    with anyio.CancelScope(shield=True):
        await anyio.sleep(delay)
    raise exc


@app.task
async def group_failure(messages: list[str]) -> None:
    """Each child raises ValueError(message): one leaf or many."""
    async with anyio.create_task_group() as tg:
        for message in messages:
            tg.start_soon(_fail_after, 0.01, ValueError(message))


@app.task
async def group_mixed() -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(_fail_after, 0.01, ValueError("bad value"))
        tg.start_soon(_fail_after, 0.01, KeyError("missing"))
        tg.start_soon(_fail_after, 0.01, RuntimeError("broken"))


@app.task(bind=True, max_retries=2)
async def group_retry(self: Any, key: str) -> int:
    """``self.retry()`` raised inside a task group is a retry, not a failure."""
    _tally(key, f"try{self.request.retries}")

    async def child() -> None:
        await anyio.sleep(0.01)
        if self.request.retries == 0:
            raise self.retry(countdown=0.1)

    async with anyio.create_task_group() as tg:
        tg.start_soon(child)
        tg.start_soon(anyio.sleep, 0.02)
    return int(self.request.retries)


@app.task
async def group_reject() -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(_fail_after, 0.01, Reject("rejected in a group", requeue=False))
        tg.start_soon(_fail_after, 0.01, ValueError("also failed"))


@app.task
async def group_ignore() -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(_fail_after, 0.01, Ignore())


@app.task
async def group_sleepers(key: str, seconds: float) -> str:
    """Children wait in a task group; each records its start, its ``finally`` the unwinding."""

    async def child(i: int) -> None:
        _tally(key, f"started:child{i}")
        try:
            await anyio.sleep(seconds)
        finally:
            _tally(key, f"child{i}")

    _tally(key, "started:group")
    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(child, i)
    return "slept"


class OwnBaseException(BaseException):
    """A ``BaseException`` of the task's own, neither an exit nor a cancellation."""


def _raise_exit(kind: str) -> None:
    if kind == "SystemExit":
        raise SystemExit(3)
    if kind == "KeyboardInterrupt":
        raise KeyboardInterrupt
    if kind == "GeneratorExit":
        raise GeneratorExit
    raise OwnBaseException("not an Exception")


@app.task
async def exits(kind: str) -> None:
    await anyio.lowlevel.checkpoint()
    _raise_exit(kind)


@app.task
def sync_raises(kind: str) -> None:
    """The sync twin of :func:`exits`: the exception leaves the tracer in a thread."""
    _raise_exit(kind)


@app.task
async def unserializable() -> object:
    await anyio.lowlevel.checkpoint()
    return threading.Lock()


class UnpicklableError(Exception):
    def __init__(self, lock: Any) -> None:
        super().__init__(lock)
        self.lock = lock


@app.task
async def unpicklable_error() -> None:
    await anyio.lowlevel.checkpoint()
    raise UnpicklableError(threading.Lock())


@app.task
async def blocker(seconds: float) -> str:
    time.sleep(seconds)  # noqa: ASYNC251 - the mistake this test is about
    return "blocked"


@app.task(bind=True)
async def announced_blocker(self: Any, seconds: float) -> str:
    """Blocks its loop, after a log line that says so (the test waits for it)."""
    logger.warning("blocking the loop now: %s", self.request.id)
    time.sleep(seconds)  # noqa: ASYNC251 - holds the loop on purpose
    return "blocked"


@app.task(acks_late=True)
async def late_counted(key: str, member: str, seconds: float) -> str:
    """Counts starts and finishes per message; a redelivered one is quick."""
    starts = _tally(key, f"started:{member}")
    await anyio.sleep(seconds if starts == 1 else 0.05)
    _tally(key, f"finished:{member}")
    return member


@app.task(acks_late=True)
async def gated(key: str, member: str, gate: str, limit: float = 120) -> str:
    """Counts starts and finishes per message; runs until the Redis key ``gate`` exists."""
    import redis

    store = redis.Redis.from_url(app.conf.result_backend)
    _tally(key, f"started:{member}")
    with anyio.fail_after(limit):
        while not store.exists(gate):  # noqa: ASYNC110 - set by the test process
            await anyio.sleep(0.02)
    _tally(key, f"finished:{member}")
    return member


@app.task
async def counted(key: str, member: str, seconds: float) -> str:
    _tally(key, f"started:{member}")
    await anyio.sleep(seconds)
    _tally(key, f"finished:{member}")
    return member


@app.task
async def ticking(key: str, member: str, seconds: float) -> str:
    """As :func:`counted`, and counts ``tick:<member>`` every 50 ms while it runs."""
    _tally(key, f"started:{member}")
    deadline = anyio.current_time() + seconds
    while anyio.current_time() < deadline:
        await anyio.sleep(0.05)
        _tally(key, f"tick:{member}")
    _tally(key, f"finished:{member}")
    return member


@app.task
def sync_exits() -> None:
    raise SystemExit(4)


async def broken_lifespan(app: Any) -> Any:
    """A lifespan whose resource cannot be opened (``worker_anyio_lifespan``)."""
    raise ConnectionError("database unreachable")
    yield  # an async generator function, like any lifespan


@app.task(bind=True)
async def logs_its_id(self: Any, rounds: int) -> str:
    """Logs through Celery's task logger between awaits, under concurrency."""
    from celery.utils.log import get_task_logger

    log = get_task_logger("tests.limitsapp.logs_its_id")
    for i in range(rounds):
        await anyio.sleep(0.01 * (i % 3))
        log.warning("my id is %s (round %d)", self.request.id, i)
    return str(self.request.id)


# celery-types: time limits are ints; Celery takes any number of seconds.
@app.task(soft_time_limit=0.3)  # type: ignore[call-overload, untyped-decorator]
async def soft_limited_by_option() -> str:
    """The soft limit set as a task option (``@app.task(soft_time_limit=...)``)."""
    try:
        await anyio.sleep(30)
    except SoftTimeLimitExceeded:
        return "caught"
    return "slept"


@app.task(acks_late=True)
async def late_rejecting() -> None:
    """An acks_late task whose ``Reject`` is a ``basic_reject`` of its message."""
    await anyio.sleep(0.01)
    raise Reject("not for me", requeue=False)


@app.task
def sync_rendezvous(key: str, count: int, timeout: float = 30) -> bool:
    """Arrives, then waits for ``count`` arrivals: True only if they all ran at once."""
    _tally(key, "arrived")
    import redis

    store = redis.Redis.from_url(app.conf.result_backend)
    deadline = time.monotonic() + timeout
    while int(store.hget(key, "arrived") or 0) < count:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
