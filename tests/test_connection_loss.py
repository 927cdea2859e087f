"""A lost broker connection: acks and QoS stay on the consumer's thread, queued jobs
are dropped (the broker delivers them again) instead of running twice.

The worker reaches RabbitMQ through a TCP proxy that cuts every connection, so
the shared broker itself is never restarted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import kombu
import pytest
import redis

from .ackwatch import ENV
from .faults.proxy import Proxy
from .harness import (
    Client,
    Namespace,
    PoolBackend,
    Worker,
    key,
    pool_args,
    send,
    tallies,
    wait_for_log,
)

pytestmark = [pytest.mark.worker, pytest.mark.parametrize("broker", ["rabbitmq"], scope="session")]

CONCURRENCY = 5
TASKS = 30


@contextlib.contextmanager
def _worker_behind_a_proxy(
    namespace: Namespace,
    pool_backend: PoolBackend,
    run_id: str,
    args: list[str],
    conf: dict[str, Any] | None = None,
) -> Iterator[tuple[Client, Worker, Proxy, str]]:
    """A worker that reaches the broker through a proxy; its queue; a client."""
    url = urlparse(namespace.broker_url)
    proxy = Proxy(run_id, url.port or 5672)
    proxy.start()
    try:
        via_proxy = url._replace(netloc=f"{url.username}:{url.password}@127.0.0.1:{proxy.port}")
        worker_side = dataclasses.replace(namespace, broker_url=via_proxy.geturl())
        queue = namespace.queue(f"cut-{pool_backend.tag}-{time.monotonic_ns()}")
        args = [*pool_args(pool_backend), *args]
        with Worker(worker_side, queue, args, app_module="tests.limitsapp", conf=conf) as worker:
            client = namespace.client(queue)  # publishes straight to the broker
            try:
                yield client, worker, proxy, queue
            finally:
                client.close()
    finally:
        proxy.close()


@pytest.fixture
def proxied(
    namespace: Namespace, pool_backend: PoolBackend, monkeypatch: pytest.MonkeyPatch, run_id: str
) -> Iterator[tuple[Client, Worker, Proxy, str]]:
    tally = key()
    monkeypatch.setenv(ENV, tally)
    args = ["-c", str(CONCURRENCY), "--prefetch-multiplier", str(TASKS // CONCURRENCY)]
    with _worker_behind_a_proxy(namespace, pool_backend, run_id, args) as (
        client,
        worker,
        proxy,
        _,
    ):
        yield client, worker, proxy, tally


def _counts(client: Client, tally: str) -> dict[str, int]:
    return tallies(client, tally, timeout=0)


def test_after_a_cut_queued_jobs_run_once_and_qos_stays_on_the_consumer_thread(
    proxied: tuple[Client, Worker, Proxy, str],
) -> None:
    client, worker, proxy, tally = proxied
    k, gate = key(), key()
    results = [send(client, "gated", k, str(i), gate) for i in range(TASKS)]
    deadline = time.monotonic() + 30
    while len(_started(client, k)) < CONCURRENCY:  # -c slots busy, the rest queued in the pool
        assert time.monotonic() < deadline, tallies(client, k)
        time.sleep(0.05)
    running_at_cut = _started(client, k)
    proxy.cut()
    # The running ones hold their slots until the gate opens: nothing else starts
    # before the pool has dropped what it queued, however long that takes.
    wait_for_log(worker, r"celery_anyio: \d+ queued tasks not started", timeout=30)
    assert _started(client, k) == running_at_cut
    proxy.restore()
    store = redis.Redis.from_url(client.app.conf.result_backend)
    store.set(gate, 1, ex=600)
    try:
        assert sorted(r.get(timeout=120) for r in results) == sorted(str(i) for i in range(TASKS))
    finally:
        store.delete(gate)
    starts = _started(client, k)
    # Running at the cut: their acks were lost with the connection, so they run again.
    # Queued at the cut: dropped, delivered again, run once.
    assert {m: n for m, n in starts.items() if m not in running_at_cut and n != 1} == {}
    # After the reconnect Celery restores the prefetch count with a basic_qos chained
    # onto acks that the loop thread triggers: it must still run on the consumer thread.
    counts = _counts(client, tally)
    assert counts.get("basic_qos:consumer", 0) >= 3, counts  # start, reconnect, restore
    assert not {name: n for name, n in counts.items() if name.endswith(":other")}, counts
    more = [send(client, "counted", key(), str(i), 0.01) for i in range(20)]
    assert [r.get(timeout=30) for r in more] == [str(i) for i in range(20)]


def _started(client: Client, k: str) -> dict[str, int]:
    return {m: n for m, n in tallies(client, k, timeout=0).items() if m.startswith("started:")}


def test_a_redelivered_task_still_running_here_waits_for_it_and_is_deduplicated(
    namespace: Namespace, pool_backend: PoolBackend, run_id: str
) -> None:
    """``worker_deduplicate_successful_tasks``: the copy the broker sends again after
    a cut does not run beside the first delivery, nor after it once that succeeded.

    Celery's deduplication skips a redelivered task that already succeeded; the
    pool makes the copy wait while the first delivery still runs in this worker
    (free slots would start it at once, under any other pool).
    """
    running = CONCURRENCY  # all running at the cut, as many slots free beside them
    args = ["-c", str(2 * running), "--prefetch-multiplier", "1"]
    conf = {"worker_deduplicate_successful_tasks": True}
    with _worker_behind_a_proxy(namespace, pool_backend, run_id, args, conf) as (
        client,
        worker,
        proxy,
        queue,
    ):
        k, gate = key(), key()
        results = [send(client, "gated", k, str(i), gate) for i in range(running)]
        deadline = time.monotonic() + 30
        while len(_started(client, k)) < running:
            assert time.monotonic() < deadline, tallies(client, k)
            time.sleep(0.05)
        proxy.cut()
        wait_for_log(worker, r"Connection to broker lost", timeout=60)
        proxy.restore()
        # The broker delivers the unacked messages again; they wait in the worker.
        inspect = client.app.control.inspect(timeout=2, destination=[worker.node])
        deadline = time.monotonic() + 60
        while len((inspect.reserved() or {}).get(worker.node, [])) < running:
            assert set(_started(client, k).values()) == {1}, _started(client, k)
            assert time.monotonic() < deadline, (inspect.reserved(), _started(client, k))
            time.sleep(0.1)
        assert set(_started(client, k).values()) == {1}, _started(client, k)
        store = redis.Redis.from_url(client.app.conf.result_backend)
        store.set(gate, 1, ex=600)
        try:
            assert sorted(r.get(timeout=120) for r in results) == [str(i) for i in range(running)]
            more = [send(client, "counted", key(), str(i), 0.01) for i in range(20)]
            assert [r.get(timeout=60) for r in more] == [str(i) for i in range(20)]
        finally:
            store.delete(gate)
        assert _started(client, k) == {f"started:{i}": 1 for i in range(running)}
    # The worker has gone: whatever it had not acked is back in the queue.
    with kombu.Connection(namespace.broker_url) as connection:
        channel: Any = connection.default_channel
        left = channel.queue_declare(queue, passive=True).message_count
    assert left == 0
