"""Consumer bootsteps that record where and when the worker acks.

``CELERY_ANYIO_TEST_ACKWATCH=<redis hash key>``: every ``basic_ack``,
``basic_reject`` and ``basic_qos`` on the channel the consumer reads tasks from
is counted in that hash as ``<method>:consumer`` when it runs on the consumer's
(main) thread and ``<method>:other`` when it does not: the broker connection
must only be used by the thread that reads it.

``CELERY_ANYIO_TEST_ACKORDER=<redis key>``: one sequence, in the worker's main
process, of the moments the pool is handed a message (``apply``), an ack is
queued for the consumer (``queued``, task id) and sent (``sent``, task id),
stored in that key as JSON when the consumer shuts down.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import threading
from collections.abc import Callable
from typing import Any

from celery import bootsteps

ENV = "CELERY_ANYIO_TEST_ACKWATCH"
ORDER_ENV = "CELERY_ANYIO_TEST_ACKORDER"
METHODS = ("basic_ack", "basic_reject", "basic_qos")


class WatchTaskChannel(bootsteps.StartStopStep):
    """Wraps the task consumer's channel methods after each (re)connect."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.key = os.environ[ENV]
        self.store: Any = None

    def start(self, c: Any) -> None:
        import redis

        if self.store is None:
            self.store = redis.Redis.from_url(c.app.conf.result_backend)
        channel = c.task_consumer.channel
        for name in METHODS:
            method = getattr(channel, name)
            if not getattr(method, "_ackwatch", False):
                setattr(channel, name, self._watched(name, method))

    def _watched(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        main = threading.main_thread()

        @functools.wraps(method)
        def watched(*args: Any, **kwargs: Any) -> Any:
            where = "consumer" if threading.current_thread() is main else "other"
            self.store.hincrby(self.key, f"{name}:{where}", 1)
            return method(*args, **kwargs)

        watched._ackwatch = True  # type: ignore[attr-defined]
        return watched


class RecordAckOrder(bootsteps.StartStopStep):
    """Wraps the pool's ``on_apply``, the consumer's ``call_soon_ack`` and ``Message.ack``.

    Started before the consumer's loop builds its message handler, which binds
    ``call_soon_ack`` then; ``itertools.count`` hands out numbers atomically, so the
    sequence orders events across the consumer's and the pool's threads.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.key = os.environ[ORDER_ENV]
        self.events: list[tuple[int, str, str]] = []
        self.numbers = itertools.count()
        self.installed = False

    def start(self, c: Any) -> None:
        if self.installed:
            return
        self.installed = True
        from kombu.message import Message

        events, numbers = self.events, self.numbers
        # Celery < 5.7 queues acks with call_soon, among other callbacks.
        name = "call_soon_ack" if hasattr(c, "call_soon_ack") else "call_soon"
        on_apply, call_soon_ack, ack = c.pool.on_apply, getattr(c, name), Message.ack

        def applied(*args: Any, **kwargs: Any) -> Any:
            events.append((next(numbers), "apply", ""))
            return on_apply(*args, **kwargs)

        def queued(p: Any, *args: Any, **kwargs: Any) -> Any:
            result = call_soon_ack(p, *args, **kwargs)
            events.append((next(numbers), "queued", _task_id(getattr(p, "__self__", None))))
            return result

        def sent(message: Any, *args: Any, **kwargs: Any) -> Any:
            events.append((next(numbers), "sent", _task_id(message)))
            return ack(message, *args, **kwargs)

        c.pool.on_apply = applied
        setattr(c, name, queued)
        Message.ack = sent  # type: ignore[method-assign, assignment]  # test instrumentation

    def shutdown(self, c: Any) -> None:
        import redis

        store = redis.Redis.from_url(c.app.conf.result_backend)
        store.set(self.key, json.dumps(self.events), ex=3600)


def _task_id(message: Any) -> str:
    headers = getattr(message, "headers", None) or {}
    return str(headers.get("id", ""))


def install(app: Any) -> None:
    if os.environ.get(ENV):
        app.steps["consumer"].add(WatchTaskChannel)
    if os.environ.get(ORDER_ENV):
        app.steps["consumer"].add(RecordAckOrder)
