"""Keep the consumer's broker connection to the consumer's thread, and acks prompt.

The consumer reads tasks from one broker connection, and an AMQP connection
(like kombu's channel state on any transport) must only be used by the thread
that reads it.  With kombu's hub, Celery itself sends every ack and reject
there: ``Request.acknowledge`` calls ``Consumer.call_soon_ack``, which queues
the ack on the hub.  What it does not send there is what it chains onto those
acks after a reconnect: ``Consumer._restore_prefetch_count_after_connection_restart``,
a ``basic_qos`` on the consumer's channel, runs in whichever thread acked.  In
this pool that is the loop thread, and after a RabbitMQ restart the two
threads ended up waiting on the same socket.  :func:`guard_prefetch_restore`
sends that call to the hub when it is made from another thread.

Two more things keep acks prompt:

* kombu < 5.7's hub does not wake up for a callback queued from another
  thread: the pool wakes it after each job's report (:meth:`ConsumerThread.wake`);
* an ack queued from the consumer's own thread (``--processes N``: the
  ``Request`` callbacks run there) waits for the hub's next pass, which first
  sleeps in its poll until some broker traffic or a timer: the pool wakes it
  then too, so the ack goes out at once instead of up to a second later.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from functools import partial, wraps
from typing import Any

_GUARDED = "__celery_anyio_guarded__"
#: The consumer's thread of each hub the pool was given (kombu < 5.7 keeps none).
_HUB_THREADS: dict[int, int] = {}


class ConsumerThread:
    """What the pool knows of the consumer's thread: its hub, and how to wake it."""

    def __init__(self) -> None:
        self._hub: Any = None
        self._ident: int | None = None
        self._waker: socket.socket | None = None
        self._hub_wakes_itself = False

    def register(self, hub: Any) -> None:
        """Called by Celery on the consumer's thread, with the worker's hub."""
        self._hub = hub
        self._ident = _HUB_THREADS[id(hub)] = threading.get_ident()
        # kombu >= 5.7 wakes its hub for a callback queued from another thread.
        self._hub_wakes_itself = hasattr(hub, "_create_waker")
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)

        def drain(*_: Any) -> None:
            with contextlib.suppress(BlockingIOError):
                while reader.recv(4096):
                    pass

        hub.add_reader(reader.fileno(), drain)
        self._keep = reader  # the hub holds its number only
        self._waker = writer

    @property
    def has_hub(self) -> bool:
        return self._hub is not None

    def on_consumer_thread(self) -> bool:
        return self._hub is None or threading.get_ident() == self._ident

    def wake(self) -> None:
        """Make the hub take its queued callbacks (acks) now, from any thread."""
        waker = self._waker
        if waker is None:
            return
        if self._hub_wakes_itself and threading.get_ident() != self._ident:
            return  # call_soon from this thread has woken it already
        # BlockingIOError: already due to wake up; OSError: closing.
        with contextlib.suppress(OSError):
            waker.send(b"\0")


def guard_prefetch_restore(consumer_cls: Any) -> None:
    """Make the consumer's prefetch restore run on its hub's thread."""
    stock = consumer_cls.__dict__.get("_restore_prefetch_count_after_connection_restart")
    if stock is None or getattr(stock, _GUARDED, False):
        return  # a Celery without it (< 5.5), or done already

    @wraps(stock)
    def restore(self: Any, *args: Any, **kwargs: Any) -> Any:
        hub: Any = getattr(self, "hub", None)
        owner = _hub_thread(hub) if hub is not None else None
        if owner is not None and threading.get_ident() != owner:
            hub.call_soon(partial(stock, self, *args, **kwargs))
            return None
        return stock(self, *args, **kwargs)

    setattr(restore, _GUARDED, True)
    consumer_cls._restore_prefetch_count_after_connection_restart = restore


def _hub_thread(hub: Any) -> int | None:
    """The thread that runs ``hub``'s loop: the consumer's (None: not known yet)."""
    ident = getattr(hub, "_loop_thread", None)  # kombu >= 5.7 records it
    return int(ident) if ident is not None else _HUB_THREADS.get(id(hub))
