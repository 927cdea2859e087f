"""Warm, soft and cold shutdown of a real worker, and redelivery of acks_late tasks."""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest

from .harness import (
    CELERY_VERSION,
    Namespace,
    PoolBackend,
    Worker,
    key,
    pool_args,
    send,
    tallies,
    wait_for_count,
    wait_for_log,
    wait_until_active,
    wait_until_started,
)

pytestmark = pytest.mark.worker

EXIT_BOUND = 15  # seconds a stopping worker may take beyond its running tasks


def start_worker(
    namespace: Namespace, pool_backend: PoolBackend, name: str, conf: dict[str, Any] | None = None
) -> Worker:
    queue = namespace.queue(f"{name}-{pool_backend.tag}-{time.monotonic_ns()}")
    args = [*pool_args(pool_backend), "-c", "50"]
    return Worker(namespace, queue, args, conf=conf, app_module="tests.limitsapp").start()


def test_warm_shutdown_lets_running_tasks_finish(
    namespace: Namespace, pool_backend: PoolBackend
) -> None:
    worker = start_worker(namespace, pool_backend, "warm")
    client = namespace.client(worker.queue)
    try:
        k = key()
        results = [send(client, "counted", k, str(i), 1.0) for i in range(5)]
        wait_until_started(client, k, 5)
        worker.signal(signal.SIGTERM)
        assert worker.wait(EXIT_BOUND) == 0
        assert [r.get(timeout=10) for r in results] == [str(i) for i in range(5)]
        seen = tallies(client, k, 10)
        assert all(seen[f"finished:{i}"] == 1 for i in range(5)), seen
    finally:
        worker.stop()
        client.close()


@pytest.mark.skipif(CELERY_VERSION < (5, 5), reason="soft shutdown is new in Celery 5.5")
def test_soft_shutdown_lets_tasks_finish_within_its_timeout(
    namespace: Namespace, pool_backend: PoolBackend
) -> None:
    conf = {"worker_soft_shutdown_timeout": 5}
    worker = start_worker(namespace, pool_backend, "soft", conf)
    client = namespace.client(worker.queue)
    try:
        k = key()
        results = [send(client, "late_counted", k, str(i), 1.5) for i in range(3)]
        wait_until_started(client, k, 3)
        worker.signal(signal.SIGQUIT)
        wait_for_log(worker, "Initiating Soft Shutdown")
        assert [r.get(timeout=15) for r in results] == ["0", "1", "2"]
        worker.wait(EXIT_BOUND)
        seen = tallies(client, k, 6)
        assert all(seen[f"started:{i}"] == 1 for i in range(3)), seen  # nothing redelivered
    finally:
        worker.stop()
        client.close()


def test_cold_shutdown_redelivers_acks_late_tasks(
    namespace: Namespace, pool_backend: PoolBackend
) -> None:
    n = 10
    worker = start_worker(namespace, pool_backend, "cold")
    client = namespace.client(worker.queue)
    second: Worker | None = None
    try:
        k, early = key(), key()
        late = [send(client, "late_counted", k, str(i), 30) for i in range(n)]
        acked = send(client, "counted", early, "x", 30)
        wait_until_started(client, k, n)
        wait_until_started(client, early, 1)
        wait_until_active(client, worker, acked.id)  # accepted, hence acked, by the consumer
        stopped_at = time.monotonic()
        worker.signal(signal.SIGQUIT)
        worker.wait(EXIT_BOUND)
        assert time.monotonic() - stopped_at < EXIT_BOUND
        assert "Error on stopping Pool" not in worker.log()
        # A fresh worker on the same queue gets every acks_late message again.
        second = Worker(namespace, worker.queue, worker.args, app_module="tests.limitsapp").start()
        assert sorted(r.get(timeout=60) for r in late) == sorted(str(i) for i in range(n))
        seen = tallies(client, k, 2 * n)
        assert {m: c for m, c in seen.items() if m.startswith("started:")} == {
            f"started:{i}": 2 for i in range(n)
        }  # N started twice: once before the stop, once redelivered
        assert {m: c for m, c in seen.items() if m.startswith("finished:")} == {
            f"finished:{i}": 1 for i in range(n)
        }  # N finished, 0 lost
        # The task that was acked on start is not redelivered (Celery's rule): a task
        # sent now comes after any message given back to the queue, and it has run.
        assert send(client, "counted", key(), "later", 0.01).get(timeout=30) == "later"
        assert tallies(client, early) == {"started:x": 1}
        if CELERY_VERSION >= (5, 5):
            assert acked.state == "RETRY"  # Celery marks cancelled requests for retry
    finally:
        worker.stop()
        if second is not None:
            second.stop()
        client.close()


def test_sigterm_then_sigquit_stops_promptly(
    namespace: Namespace, pool_backend: PoolBackend
) -> None:
    worker = start_worker(namespace, pool_backend, "escalate")
    client = namespace.client(worker.queue)
    try:
        k = key()
        send(client, "ticking", k, "long", 30)
        wait_until_started(client, k, 1)
        worker.signal(signal.SIGTERM)
        wait_for_log(worker, r"Warm shutdown \(MainProcess\)")
        # Warm: the worker waits, and the task goes on, counting its ticks, for a while.
        ticks = tallies(client, k, timeout=0).get("tick:long", 0)
        wait_for_count(client, k, "tick:long", ticks + 20)
        assert worker.process is not None and worker.process.poll() is None  # warm: waiting
        stopped_at = time.monotonic()
        worker.signal(signal.SIGQUIT)
        worker.wait(EXIT_BOUND)
        assert time.monotonic() - stopped_at < EXIT_BOUND
        log = worker.log()
        assert "Error on stopping Pool" not in log
        assert "Traceback" not in log
        assert "finished:long" not in tallies(client, k)
    finally:
        worker.stop()
        client.close()


def test_cold_shutdown_does_not_wait_for_a_stuck_sync_thread(
    namespace: Namespace, pool_backend: PoolBackend
) -> None:
    worker = start_worker(namespace, pool_backend, "stuck")
    client = namespace.client(worker.queue)
    try:
        k = key()
        send(client, "sync_stuck", k, 60)
        tallies(client, k, 1)
        stopped_at = time.monotonic()
        worker.signal(signal.SIGQUIT)
        worker.wait(EXIT_BOUND)
        assert time.monotonic() - stopped_at < EXIT_BOUND
        # Celery >= 5.5 cancels each active request first (terminate_job); older
        # Celery leaves it to the pool's cancellation of the root task group.
        reason = "was terminated" if CELERY_VERSION >= (5, 5) else "was cancelled by shutdown"
        wait_for_log(worker, rf"sync task .*sync_stuck.* {reason}.* cannot be stopped")
    finally:
        worker.stop()
        client.close()
