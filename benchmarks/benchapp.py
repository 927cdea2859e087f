"""The Celery app the benchmark workers run (``celery -A benchmarks.benchapp worker``).

Broker, result backend, queue and ``worker_anyio_backend_options`` (the uvloop
variant) come from the environment, so every run of a case has its own queue.
Each workload has an ``async def`` version (for ``-P celery_anyio:Pool``) and a plain one (for the
stock pools); all of them store a result, ``[sent, started, finished]``, where
``sent`` is the publisher's timestamp passed in the arguments (0 when unused)
and the other two are ``time.time()`` readings taken by the task body.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from typing import Any

import anyio
from celery import Celery, signals

from benchmarks.cases import (
    BACKEND_OPTIONS_ENV,
    BROKER_ENV,
    QUEUE_ENV,
    READY_MARKER,
    RESULTS_ENV,
    START_PACING_ENV,
)

# ``worker_anyio_result_threads`` (0: results stored on the loop thread), to compare.
RESULT_THREADS_ENV = "CELERY_ANYIO_BENCH_RESULT_THREADS"
DEFAULT_REDIS = "redis://127.0.0.1:6379/14"
HOLD_TIMEOUT = 600.0  # a hold task never waits longer than this for the others

app = Celery(
    "benchapp",
    broker=os.environ.get(BROKER_ENV, DEFAULT_REDIS),
    backend=os.environ.get(RESULTS_ENV, DEFAULT_REDIS),
)
app.conf.update(
    task_default_queue=os.environ.get(QUEUE_ENV, "celery-anyio-bench"),
    result_expires=3600,
    broker_connection_retry_on_startup=True,
)
if os.environ.get(BACKEND_OPTIONS_ENV):
    app.conf.worker_anyio_backend_options = json.loads(os.environ[BACKEND_OPTIONS_ENV])
if os.environ.get(RESULT_THREADS_ENV):
    app.conf.worker_anyio_result_threads = int(os.environ[RESULT_THREADS_ENV])
if os.environ.get(START_PACING_ENV):
    app.conf.worker_anyio_start_pacing = float(os.environ[START_PACING_ENV])

logger = logging.getLogger("celery_anyio.bench")

Timings = list[float]


def _gevent_patched() -> bool:
    """Whether ``celery -P gevent`` monkey-patched ``time`` (so ``time.sleep`` yields)."""
    monkey = sys.modules.get("gevent.monkey")
    return bool(monkey is not None and monkey.is_module_patched("time"))


@signals.worker_ready.connect
def _announce_ready(**_: Any) -> None:
    # Celery logs its own "ready." line at INFO; the harness runs workers at
    # WARNING, so announce readiness (with a precise timestamp) ourselves.
    logger.warning("%s%.6f gevent-patched=%d", READY_MARKER, time.time(), _gevent_patched())


def _burn_cpu(ms: float) -> None:
    """Spin until this thread has used ``ms`` milliseconds of CPU."""
    deadline = time.thread_time() + ms / 1000.0
    while time.thread_time() < deadline:
        pass


# -- async versions (celery_anyio) -----------------------------------------------


@app.task(name="bench.noop_async")
async def noop_async(sent: float = 0.0) -> Timings:
    now = time.time()
    return [sent, now, now]


@app.task(name="bench.io_async")
async def io_async(seconds: float, sent: float = 0.0) -> Timings:
    started = time.time()
    await anyio.sleep(seconds)
    return [sent, started, time.time()]


@app.task(name="bench.cpu_async")
async def cpu_async(ms: float, sent: float = 0.0) -> Timings:
    started = time.time()
    _burn_cpu(ms)
    return [sent, started, time.time()]


class _Hold:
    """How many hold tasks started in this worker process; set once ``n`` have."""

    started = 0
    async_event: anyio.Event | None = None  # created on the worker's loop
    sync_event = threading.Event()
    lock = threading.Lock()


@app.task(name="bench.hold_async")
async def hold_async(seconds: float, n: int, sent: float = 0.0) -> Timings:
    """Await ``seconds``, then on until ``n`` hold tasks have started in this process.

    So all of them are in flight at the same moment, however slowly the worker
    takes messages in: what the ``inflight`` workload's peak RSS is about.  Under
    ``--processes N`` the harness passes each process's share as ``n``.
    """
    started = time.time()
    if _Hold.async_event is None:
        _Hold.async_event = anyio.Event()
    _Hold.started += 1  # only ever touched on the worker's one event loop
    if _Hold.started >= n:
        _Hold.async_event.set()
    await anyio.sleep(seconds)
    with anyio.move_on_after(HOLD_TIMEOUT):
        await _Hold.async_event.wait()
    return [sent, started, time.time()]


# -- sync versions (threads, solo, prefork, gevent) ----------------------------------


@app.task(name="bench.noop_sync")
def noop_sync(sent: float = 0.0) -> Timings:
    now = time.time()
    return [sent, now, now]


@app.task(name="bench.io_sync")
def io_sync(seconds: float, sent: float = 0.0) -> Timings:
    started = time.time()
    time.sleep(seconds)
    return [sent, started, time.time()]


@app.task(name="bench.cpu_sync")
def cpu_sync(ms: float, sent: float = 0.0) -> Timings:
    started = time.time()
    _burn_cpu(ms)
    return [sent, started, time.time()]


@app.task(name="bench.hold_sync")
def hold_sync(seconds: float, n: int, sent: float = 0.0) -> Timings:
    started = time.time()
    with _Hold.lock:
        _Hold.started += 1
        if _Hold.started >= n:
            _Hold.sync_event.set()
    time.sleep(seconds)
    _Hold.sync_event.wait(HOLD_TIMEOUT)
    return [sent, started, time.time()]


# -- Celery's own share of memory (the ``reserved`` reference) ---------------------


class _Received:
    """How many messages this worker process has received (``task_received``)."""

    count = 0
    changed = threading.Condition()


@signals.task_received.connect
def _count_received(**_: Any) -> None:
    with _Received.changed:
        _Received.count += 1
        _Received.changed.notify_all()


@app.task(name="bench.reserved_sync")
def reserved_sync(n: int, sent: float = 0.0) -> Timings:
    """Return once this worker has received ``n`` messages.

    Under ``-P threads -c 1`` with a prefetch of ``n``, the first task holds the
    only thread until the consumer has taken in all ``n``: the peak RSS is then
    what Celery itself keeps per received message, before any pool runs it.
    """
    started = time.time()
    with _Received.changed:
        if not _Received.changed.wait_for(lambda: _Received.count >= n, HOLD_TIMEOUT):
            raise RuntimeError(f"only {_Received.count} of {n} messages received")
    return [sent, started, time.time()]
