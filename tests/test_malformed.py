"""A malformed task message is rejected with a clear error; the worker goes on.

Under every stock pool such a message ends the worker ("Unrecoverable error").
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery.exceptions import InvalidTaskError
from kombu import Producer

from .harness import Client, Namespace, PoolBackend, Worker, pool_args, wait_for_log

pytestmark = pytest.mark.worker

ADD = "tests.workerapp.add"


@pytest.fixture(scope="module")
def worker(namespace: Namespace, pool_backend: PoolBackend) -> Iterator[Worker]:
    """A worker of its own: the errors it logs must not reach the shared worker's log."""
    queue = namespace.queue(f"malformed-{pool_backend.tag}")
    args = [*pool_args(pool_backend), "-c", "50"]
    with Worker(namespace, queue, args) as w:
        yield w


@pytest.fixture(scope="module")
def client(namespace: Namespace, worker: Worker) -> Iterator[Client]:
    c = namespace.client(worker.queue)
    yield c
    c.close()


def _publish(client: Client, queue: str, body: bytes, headers: dict[str, Any] | None) -> None:
    with client.app.connection_for_write() as conn:
        Producer(conn).publish(
            body,
            routing_key=queue,
            content_type="application/json",
            content_encoding="utf-8",
            headers=headers or {},
            declare=[client.app.amqp.queues[queue]],
        )


def _headers(task_id: str | None) -> dict[str, Any]:
    headers: dict[str, Any] = {"lang": "py", "task": ADD, "argsrepr": "", "kwargsrepr": ""}
    if task_id == "":  # no task header at all (Celery drops it with a mere warning)
        return {"lang": "py", "id": str(uuid.uuid4())}
    if task_id is not None:
        headers.update(id=task_id, root_id=task_id)
    return headers


@pytest.mark.parametrize(
    ("body", "with_id", "problem"),  # with_id None: no task header either
    [
        (b"{}", True, "ValueError"),
        (b"[1]", True, "ValueError"),
        (json.dumps([[1, 2], {}, {}]).encode(), False, "KeyError: 'id'"),
        (json.dumps([[1, 2], {}, {}]).encode(), None, "no task name"),
    ],
    ids=["json-object", "short-list", "no-id-header", "no-task-header"],
)
def test_malformed_message_is_rejected_and_the_worker_goes_on(
    client: Client, worker: Worker, body: bytes, with_id: bool | None, problem: str
) -> None:
    task_id = str(uuid.uuid4()) if with_id else None
    if with_id is None:  # no task header: the message names no task
        _publish(client, worker.queue, body, _headers(""))
        found = wait_for_log(worker, r"ERROR.*task message \?\[\S+\] is malformed: (.*)")
        task_id = None
    else:
        _publish(client, worker.queue, body, _headers(task_id))
        shown = re.escape(task_id or "?")
        found = wait_for_log(worker, rf"task message {ADD}\[{shown}\] is malformed: (.*)")
    assert problem in found.group(1)
    if task_id is not None:  # a client waiting on it gets the error, not silence
        result = client.app.AsyncResult(task_id)
        with pytest.raises(InvalidTaskError, match="is malformed"):
            result.get(timeout=30)
    later = [client.send("add", i, i) for i in range(100)]
    assert [r.get(timeout=60) for r in later] == [2 * i for i in range(100)]
    assert "Unrecoverable error" not in worker.log()
