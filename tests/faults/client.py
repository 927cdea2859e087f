"""The harness's side of the broker: publishing (well-formed and raw), and ping.

It always talks to the private broker directly, never through the proxy, so a cut
connection is the workers' problem only. Messages are built with Celery's own
``as_task_v2`` and published with one kombu producer, in batches.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from celery import Celery
from celery.app.amqp import task_message as TaskMessage
from kombu import Connection
from kombu.transport import pyamqp, virtual

from .faultapp import settings

PERSISTENT = 2


@dataclass(frozen=True)
class Outgoing:
    """One task message: name, positional args, task id."""

    name: str
    args: tuple[Any, ...]
    task_id: str

    @classmethod
    def new(cls, name: str, *args: Any) -> Outgoing:
        return cls(name, args, str(uuid.uuid4()))


class Client:
    def __init__(self, broker_url: str, results_url: str, visibility: int) -> None:
        self.broker_url = broker_url
        self.app = Celery("faults-client", broker=broker_url, backend=results_url)
        self.app.conf.update(settings(broker_url, "celery-anyio-faults-client", visibility))
        self.last_ping_error = ""

    def connection(self) -> Connection:
        return self.app.connection_for_write()

    def declare(self, queue: str) -> None:
        """The queue as a worker's ``-Q`` declares it, so messages sent first are kept."""
        with self.connection() as conn:
            channel = conn.default_channel
            # The stubs type it as the StdChannel base, without the declare methods.
            assert isinstance(channel, (pyamqp.Channel, virtual.Channel))
            channel.exchange_declare(exchange=queue, type="direct", durable=True, auto_delete=False)
            channel.queue_declare(queue=queue, durable=True, auto_delete=False)
            channel.queue_bind(queue=queue, exchange=queue, routing_key=queue)

    def publish(self, queue: str, messages: Iterable[Outgoing]) -> int:
        sent = 0
        with self.connection() as conn:
            producer = conn.Producer(serializer="json")
            for msg in messages:
                built = self.app.amqp.as_task_v2(msg.task_id, msg.name, args=msg.args)
                producer.publish(
                    built.body,
                    exchange="",
                    routing_key=queue,
                    headers=built.headers,
                    delivery_mode=PERSISTENT,
                    **built.properties,
                )
                sent += 1
        return sent

    def publish_raw(
        self,
        queue: str,
        body: bytes,
        content_type: str,
        headers: dict[str, Any] | None,
        properties: dict[str, Any] | None = None,
    ) -> None:
        """A message exactly as given: no serializer, whatever body and headers."""
        with self.connection() as conn:
            conn.Producer().publish(
                body,
                exchange="",
                routing_key=queue,
                content_type=content_type,
                content_encoding="utf-8" if content_type != "application/x-python-serialize"
                else "binary",
                headers=headers or {},
                delivery_mode=PERSISTENT,
                **(properties or {}),
            )  # fmt: skip

    def task_message(self, name: str, args: Sequence[Any] = ()) -> tuple[str, TaskMessage]:
        """A well-formed message's (task id, Celery task_message) to take apart."""
        task_id = str(uuid.uuid4())
        return task_id, self.app.amqp.as_task_v2(task_id, name, args=tuple(args))

    def ping(self, node: str, attempts: int = 3, timeout: float = 5.0) -> bool:
        """Whether ``node`` answers a remote-control ping (on a fresh connection)."""
        for _ in range(attempts):
            try:
                with self.connection() as conn:
                    replies = self.app.control.ping(
                        destination=[node], timeout=timeout, connection=conn
                    )
            except Exception as exc:  # noqa: BLE001 - a broken connection is a failed ping
                self.last_ping_error = repr(exc)
                continue
            if any(node in reply for reply in replies or []):
                return True
        return False

    def close(self) -> None:
        self.app.close()
