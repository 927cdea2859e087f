"""Keep every ack, reject and prefetch change on the consumer's own thread.

The consumer reads tasks from one broker connection, and an AMQP connection
(like kombu's channel state on any transport) must only be used by the thread
that reads it.  The pool reports a job's outcome on the loop thread, where
Celery's ``Request`` callbacks then ack or reject the message, and on the
first acks after a reconnect Celery chains a prefetch restore onto each ack
(``Consumer._restore_prefetch_count_after_connection_restart``: a
``basic_qos`` on the consumer's channel).  Run where they are called, those
interleave frames with the consumer's own reads: after a RabbitMQ restart
both threads end up waiting on the same socket.

So each job's ``Request`` gets its ack and reject wrapped: called from any
other thread, the call (with everything chained onto it) is handed to kombu's
hub, whose loop runs on the consumer's thread; called there, it runs at once.
Without a hub (transports without an event loop, e.g. ``memory://``), Celery
itself runs acks in the calling thread, as under ``-P threads``: nothing
changes.  kombu < 5.7's hub does not wake up for a callback queued from
another thread, so the pool wakes it through a socket pair of its own.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from functools import partial
from typing import Any


class ConsumerThread:
    """What the pool knows of the consumer's thread: its hub, and how to wake it."""

    def __init__(self) -> None:
        self._hub: Any = None
        self._ident: int | None = None
        self._waker: socket.socket | None = None

    def register(self, hub: Any) -> None:
        """Called by Celery on the consumer's thread, with the worker's hub."""
        self._hub = hub
        self._ident = threading.get_ident()
        if hasattr(hub, "_create_waker"):
            return  # kombu >= 5.7: call_soon wakes the hub itself
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)

        def drain(*_: Any) -> None:
            with contextlib.suppress(BlockingIOError):
                while reader.recv(4096):
                    pass

        hub.add_reader(reader, drain)
        self._waker = writer

    @property
    def has_hub(self) -> bool:
        return self._hub is not None

    def on_consumer_thread(self) -> bool:
        return self._hub is None or threading.get_ident() == self._ident

    def route_acks(self, request: Any) -> None:
        """Make ``request``'s ack and reject run on the consumer's thread."""
        if self._hub is None or request is None:
            return
        for name in ("_on_ack", "_on_reject"):
            call = getattr(request, name, None)
            if call is not None:
                setattr(request, name, self._routed(call))

    def call_soon(self, call: Callable[..., Any], *args: Any) -> None:
        """Run ``call(*args)`` on the consumer's thread (at once if already there)."""
        if self.on_consumer_thread():
            call(*args)
            return
        self._hub.call_soon(partial(call, *args))
        self.wake()

    def wake(self) -> None:
        """Wake kombu < 5.7's hub for callbacks queued from another thread."""
        waker = self._waker
        if waker is not None:
            # BlockingIOError: already due to wake up; OSError: closing.
            with contextlib.suppress(OSError):
                waker.send(b"\0")

    def _routed(self, call: Callable[..., Any]) -> Callable[..., Any]:
        def on_consumer_thread(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() == self._ident:
                return call(*args, **kwargs)
            self._hub.call_soon(partial(call, *args, **kwargs))
            self.wake()
            return None

        return on_consumer_thread
