"""The Celery app the fault workers run (``celery -A tests.faults.faultapp worker``).

Broker, result backend, tally store, queue and visibility timeout come from the
environment the harness sets. Every setting that changes how a fault plays out is
here, and the same for every pool. Each task has an ``async def`` twin (for
celery_anyio) and a ``def`` twin (for Celery's threads pool, which cannot await).
Tasks count their own executions in a Redis hash on a broker-independent Redis:
a missing member is a lost task, a count of 2 a task that ran twice.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import anyio
import anyio.lowlevel
import redis
from celery import Celery, signals
from celery.app.task import Task

if sys.version_info >= (3, 11):
    from builtins import ExceptionGroup
else:  # pragma: no cover - Python 3.10
    from exceptiongroup import ExceptionGroup

BROKER_ENV = "CELERY_ANYIO_FAULTS_BROKER"
RESULTS_ENV = "CELERY_ANYIO_FAULTS_RESULTS"
QUEUE_ENV = "CELERY_ANYIO_FAULTS_QUEUE"
VISIBILITY_ENV = "CELERY_ANYIO_FAULTS_VISIBILITY"
DEDUPE_ENV = "CELERY_ANYIO_FAULTS_DEDUPE"
READY_MARKER = "celery-anyio-faults: ready node="
DEFAULT_VISIBILITY = 30
# kombu's sweep of the unacked index runs every interval x throttle seconds.
RESTORE_INTERVAL = 5
# redis-py 8 caps a connection pool at 100: the threads pool at -c 500 needs more.
MAX_CONNECTIONS = 1000
TALLY_TTL = 6 * 3600
TALLY_CONNECTIONS = 50

BROKER = os.environ.get(BROKER_ENV, "redis://127.0.0.1:6399/0")
RESULTS = os.environ.get(RESULTS_ENV, "redis://127.0.0.1:6379/14")
VISIBILITY = int(os.environ.get(VISIBILITY_ENV, DEFAULT_VISIBILITY))
# --dedupe: Celery skips a redelivered acks_late task that already succeeded.
DEDUPE = os.environ.get(DEDUPE_ENV) == "1"


def transport_options(broker_url: str, visibility: int = VISIBILITY) -> dict[str, Any]:
    """Redis transport: redeliver what a dead worker held after ``visibility`` s."""
    if not broker_url.startswith("redis"):
        return {}
    return {
        "visibility_timeout": visibility,
        "unacked_restore_interval": RESTORE_INTERVAL,
        "unacked_restore_throttle": 1,
        "max_connections": MAX_CONNECTIONS,
    }


def settings(broker_url: str, queue: str, visibility: int = VISIBILITY) -> dict[str, Any]:
    """The configuration every fault worker (and the harness's client) uses."""
    return {
        "task_default_queue": queue,
        "task_acks_late": True,
        "worker_prefetch_multiplier": 1,
        "broker_connection_retry": True,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_transport_options": transport_options(broker_url, visibility),
        "redis_max_connections": MAX_CONNECTIONS,
        "result_expires": 3600,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # Left at Celery's default (False): running acks_late tasks are not
        # cancelled when the broker connection is lost.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_deduplicate_successful_tasks": DEDUPE,
    }


app = Celery("faultapp", broker=BROKER, backend=RESULTS)
app.conf.update(settings(BROKER, os.environ.get(QUEUE_ENV, "celery-anyio-faults")))

P = ParamSpec("P")
R = TypeVar("R")


def task(name: str, **options: Any) -> Callable[[Callable[P, R]], Task[P, R]]:
    """``app.task`` with the task's signature kept (options passed on as ``**options``
    match no overload of celery-types' ``app.task``, which then returns ``Any``)."""
    decorator: Callable[[Callable[P, R]], Task[P, R]] = app.task(name=name, **options)
    return decorator


logger = logging.getLogger("celery_anyio.faults")


@signals.worker_ready.connect
def _announce_ready(sender: Any = None, **_: Any) -> None:
    # At WARNING so the marker shows at every log level (the soak runs at -l warning).
    logger.warning("%s%s pid=%d", READY_MARKER, getattr(sender, "hostname", "?"), os.getpid())


_store: redis.Redis | None = None
_store_lock = threading.Lock()


def _tally_store() -> redis.Redis:
    global _store
    with _store_lock:
        if _store is None:
            pool = redis.BlockingConnectionPool.from_url(
                RESULTS, max_connections=TALLY_CONNECTIONS, timeout=60
            )
            _store = redis.Redis(connection_pool=pool)
        return _store


def record(key: str, member: str, started: float) -> None:
    """Count one execution of ``member``, with when it started and ended."""
    pipe = _tally_store().pipeline(transaction=False)
    pipe.hincrby(key, member, 1)
    pipe.rpush(f"{key}:done", f"{started:.6f} {time.time():.6f} {member}")
    pipe.expire(key, TALLY_TTL)
    pipe.expire(f"{key}:done", TALLY_TTL)
    pipe.execute()


def count(key: str, member: str) -> None:
    """Count one execution, without timings (the soak's 100,000 tasks)."""
    pipe = _tally_store().pipeline(transaction=False)
    pipe.hincrby(key, member, 1)
    pipe.expire(key, TALLY_TTL)
    pipe.execute()


# -- the drain: each task awaits (or sleeps) ``seconds`` -------------------------------


@task("faults.sleep_async")
async def sleep_async(key: str, member: str, seconds: float) -> str:
    started = time.time()
    await anyio.sleep(seconds)
    record(key, member, started)
    return member


@task("faults.sleep_sync")
def sleep_sync(key: str, member: str, seconds: float) -> str:
    started = time.time()
    time.sleep(seconds)
    record(key, member, started)
    return member


@task("faults.reject_async", reject_on_worker_lost=True)
async def reject_async(key: str, member: str, seconds: float) -> str:
    started = time.time()
    await anyio.sleep(seconds)
    record(key, member, started)
    return member


@task("faults.reject_sync", reject_on_worker_lost=True)
def reject_sync(key: str, member: str, seconds: float) -> str:
    started = time.time()
    time.sleep(seconds)
    record(key, member, started)
    return member


@task("faults.block_async")
async def block_async(key: str, member: str, seconds: float) -> str:
    """Blocks the event loop (a synchronous sleep inside ``async def``), on purpose."""
    started = time.time()
    time.sleep(seconds)  # noqa: ASYNC251 - the fault under test
    record(key, member, started)
    return member


@task("faults.block_sync")
def block_sync(key: str, member: str, seconds: float) -> str:
    started = time.time()
    time.sleep(seconds)
    record(key, member, started)
    return member


@task("faults.noop_async", ignore_result=True)
async def noop_async(key: str, member: str) -> None:
    count(key, member)


@task("faults.noop_sync", ignore_result=True)
def noop_sync(key: str, member: str) -> None:
    count(key, member)


# -- hostile tasks (see tests.faults.malformed) ---------------------------------------


@task("faults.size_async")
async def size_async(data: str) -> int:
    await anyio.lowlevel.checkpoint()
    return len(data)


@task("faults.size_sync")
def size_sync(data: str) -> int:
    return len(data)


@task("faults.unserializable_async")
async def unserializable_async() -> object:
    await anyio.lowlevel.checkpoint()
    return object()


@task("faults.unserializable_sync")
def unserializable_sync() -> object:
    return object()


class Unpicklable(Exception):
    """Cannot be pickled (a lock) nor rebuilt from its args (two required arguments)."""

    def __init__(self, what: str, code: int) -> None:
        super().__init__(what)
        self.code = code
        self.lock = threading.Lock()


def _unpicklable_group() -> BaseException:
    return ExceptionGroup("several failures", [Unpicklable("first", 1), Unpicklable("second", 2)])


@task("faults.group_async")
async def group_async() -> None:
    await anyio.lowlevel.checkpoint()
    raise _unpicklable_group()


@task("faults.group_sync")
def group_sync() -> None:
    raise _unpicklable_group()


@task("faults.generator_exit_sync")
def generator_exit_sync() -> None:
    raise GeneratorExit("raised by the task body")
