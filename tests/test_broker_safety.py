"""Acks and publishes under load: 20,000 tasks, none lost, none run twice."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
import redis

from .harness import Namespace, PoolBackend, Worker, pool_args

pytestmark = pytest.mark.worker

TASKS = 20_000


def test_20000_tasks_none_lost_none_twice(namespace: Namespace, pool_backend: PoolBackend) -> None:
    queue = namespace.queue(f"load-{pool_backend.tag}")
    key = f"celery-anyio-test:tally:{uuid.uuid4().hex}"
    store = redis.Redis.from_url(namespace.results_url)
    client = namespace.client(queue)
    args = [*pool_args(pool_backend), "-c", "500"]
    try:
        with Worker(namespace, queue, args) as worker:
            with client.app.producer_or_acquire() as producer:
                for i in range(TASKS):
                    name = "tally_late" if i % 2 else "tally"
                    client.sig(name, key, str(i)).apply_async(producer=producer)
            deadline = time.monotonic() + 180
            while store.hlen(key) < TASKS and time.monotonic() < deadline:
                time.sleep(0.5)
        # Counted once the worker has stopped (warm: every task it started finished),
        # so a duplicate delivery has run by now, or is still in the queue (below).
        assert worker.process is not None and worker.process.returncode == 0
        counts = store.hgetall(key)
        assert len(counts) == TASKS, f"{TASKS - len(counts)} lost"
        twice = {k: v for k, v in counts.items() if v != b"1"}
        assert not twice, f"{len(twice)} ran more than once"
        log = worker.log()
        for marker in ("ChannelError", "PRECONDITION_FAILED", "unknown delivery tag",
                       "Unrecoverable error", "CRITICAL", "ERROR"):  # fmt: skip
            assert marker not in log, marker
        if namespace.broker == "redis":  # an empty queue is no key at all in Redis
            messages = store.llen(queue)
        else:
            with client.app.connection_for_read() as conn:
                # kombu-stubs types the AMQP channel as the abstract StdChannel.
                channel: Any = conn.default_channel
                _, messages, _ = channel.queue_declare(queue, passive=True)
        assert messages == 0
    finally:
        store.delete(key)
        client.close()
