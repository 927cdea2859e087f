"""Acks and publishes under load: 20,000 tasks, none lost, none run twice; acks
sent before the consumer takes another message."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
import redis

from .ackwatch import ORDER_ENV
from .harness import Namespace, PoolBackend, Worker, key, pool_args

pytestmark = pytest.mark.worker

TASKS = 20_000
ORDERED_TASKS = 1_000


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


def test_acks_go_out_before_the_consumer_takes_another_message(
    namespace: Namespace, pool_backend: PoolBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``acks_late`` every finished task whose ack has not reached the broker
    runs again if the connection is lost: an ack queued before the pool is handed
    a message must be sent before the pool is handed the next one (under load the
    consumer's hub reads a batch of messages per pass)."""
    queue = namespace.queue(f"ackorder-{pool_backend.tag}")
    order = key()
    monkeypatch.setenv(ORDER_ENV, order)
    store = redis.Redis.from_url(namespace.results_url)
    client = namespace.client(queue)
    args = [*pool_args(pool_backend), "-c", "50", "--prefetch-multiplier", "4"]
    try:
        with Worker(namespace, queue, args):
            with client.app.producer_or_acquire() as producer:
                results = [
                    client.sig("late_sleepy", i, 0.01).apply_async(producer=producer)
                    for i in range(ORDERED_TASKS)
                ]
            assert [r.get(timeout=120) for r in results] == list(range(ORDERED_TASKS))
        raw = store.get(order)
        assert raw is not None, "the worker recorded nothing"
        events = json.loads(raw)
    finally:
        store.delete(order)
        client.close()
    pending: set[str] = set()  # queued, not sent yet
    sent: set[str] = set()
    due: set[str] = set()  # queued before the last message was handed over
    late: set[str] = set()
    for _, kind, task_id in sorted(events):
        if kind == "apply":
            late |= due & pending
            due = set(pending)
        elif kind == "queued" and task_id and task_id not in sent:
            pending.add(task_id)
        elif kind == "sent":
            sent.add(task_id)
            pending.discard(task_id)
    assert len(sent) >= ORDERED_TASKS
    assert not pending, f"{len(pending)} acks queued and never sent"
    assert not late, f"{len(late)} acks still queued after the next message was taken"
