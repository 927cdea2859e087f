"""A consumer bootstep that records which thread acks, rejects and sets QoS.

Enabled in the test workers by ``CELERY_ANYIO_TEST_ACKWATCH=<redis hash key>``:
every ``basic_ack``, ``basic_reject`` and ``basic_qos`` on the channel the
consumer reads tasks from is counted in that hash as ``<method>:consumer``
when it runs on the consumer's (main) thread and ``<method>:other`` when it
does not: the broker connection must only be used by the thread that reads it.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from typing import Any

from celery import bootsteps

ENV = "CELERY_ANYIO_TEST_ACKWATCH"
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


def install(app: Any) -> None:
    if os.environ.get(ENV):
        app.steps["consumer"].add(WatchTaskChannel)
