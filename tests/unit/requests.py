"""Celery ``Request`` objects from real kombu messages, without a broker.

The message is what Celery's client would publish (``app.amqp.as_task_v2``),
wrapped in kombu's own ``Message``; acks and rejects are recorded instead of
going to a broker. ``Request.execute_using_pool(pool)`` then takes the same
path as in a worker: the pool's ``apply_async``, Celery's callbacks, the tracer
and the app's result backend.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from celery.worker.request import Request
from kombu.message import Message
from kombu.serialization import dumps


@dataclass
class Acks:
    """What the requests' ack/reject callbacks were called for."""

    acked: list[str] = field(default_factory=list)
    rejected: list[tuple[str, bool]] = field(default_factory=list)


def make_request(
    app: Celery, name: str, args: tuple[Any, ...] = (), acks: Acks | None = None, **options: Any
) -> Request:
    task_id = str(uuid.uuid4())
    sent = app.amqp.as_task_v2(task_id, name, args=args, kwargs={}, **options)
    content_type, encoding, body = dumps(sent.body, serializer="json")
    message = Message(
        body=body,
        content_type=content_type,
        content_encoding=encoding,
        headers=sent.headers,
        properties=sent.properties,
        delivery_info={"exchange": "", "routing_key": "celery"},
        delivery_tag=task_id,
    )
    record = acks if acks is not None else Acks()

    def on_ack(*_: Any) -> None:
        record.acked.append(task_id)

    def on_reject(_logger: Any, _errors: Any, requeue: bool = False) -> None:
        record.rejected.append((task_id, requeue))

    return Request(
        message, on_ack=on_ack, on_reject=on_reject, app=app, task=app.tasks[name], hostname="unit"
    )
