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

Acks must also be prompt: with ``acks_late``, every finished task whose ack has
not reached the broker runs again if the connection is lost.  A callback queued
on the hub waits for the hub's next pass, and under load one pass reads a
long batch of messages first (each read queues the next), so acks queued from
the loop thread waited tens to hundreds of milliseconds.  This pool's acks and
rejects therefore go to the :class:`ConsumerThread`'s own queue
(:func:`route_acks`), which the consumer's thread sends on the hub's next pass
*and* before it hands the pool each new message (:meth:`ConsumerThread.send_acks`):
no more than one message's handling behind the task's end.  The hub is woken
for them (kombu < 5.7 does not wake for a callback queued from another thread,
and one queued from its own thread waits for its poll).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections import deque
from collections.abc import Callable
from functools import partial, wraps
from typing import Any

from vine import ppartial

_GUARDED = "__celery_anyio_guarded__"
#: The consumer's thread of each hub the pool was given (kombu < 5.7 keeps none).
_HUB_THREADS: dict[int, int] = {}


class ConsumerThread:
    """What the pool knows of the consumer's thread: its hub, and how to wake it."""

    def __init__(self) -> None:
        self._hub: Any = None
        self._ident: int | None = None
        self._waker: socket.socket | None = None
        self._waker_reader: socket.socket | None = None
        self._hub_wakes_itself = False
        self._acks: deque[Callable[[], Any]] = deque()
        self._pass_scheduled = False
        #: True while the pool takes a message: the consumer is inside a read.
        self.taking_message = False

    def register(self, hub: Any) -> None:
        """Called by Celery on the consumer's thread, with the worker's hub.

        Celery calls it again each time its consumer loop starts over, after a
        lost connection, on a hub it has reset: callbacks queued on the hub may have
        been dropped with the old connection's (one that raised ends the hub's pass
        and the rest of its batch), our pass among them.
        """
        self._close_waker()
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
        self._waker_reader = reader  # the hub holds its number only
        self._waker = writer
        self._pass_scheduled = False
        if self._acks:
            self._schedule_pass()

    def _close_waker(self) -> None:
        reader, writer = self._waker_reader, self._waker
        self._waker_reader = self._waker = None
        if reader is not None:
            if self._hub is not None:
                with contextlib.suppress(Exception):
                    self._hub.remove(reader.fileno())
            reader.close()
        if writer is not None:
            writer.close()

    @property
    def has_hub(self) -> bool:
        return self._hub is not None

    def on_consumer_thread(self) -> bool:
        return self._hub is None or threading.get_ident() == self._ident

    def queue_ack(self, call: Callable[[], Any]) -> None:
        """Send ``call`` (an ack or reject) from the consumer's thread, soon; any thread."""
        self._acks.append(call)
        if not self._pass_scheduled:  # one hub pass for a batch; a duplicate is harmless
            self._schedule_pass()
            self.wake()

    def send_acks(self) -> None:
        """On the consumer's thread: send every queued ack and reject, in order, now.

        A pass already scheduled on the hub stays scheduled (it finds less to do),
        so that acks queued meanwhile do not schedule and wake the hub again.  An
        error propagates to the caller (from the hub: the consumer's loop, as for
        Celery's own acks); what is still queued goes out on another pass.
        """
        acks = self._acks
        while acks:
            call = acks.popleft()
            try:
                call()
            except BaseException:
                if acks:
                    self._schedule_pass()
                raise

    def _schedule_pass(self) -> None:
        self._pass_scheduled = True
        self._hub.call_soon(self._hub_pass)

    def _hub_pass(self) -> None:
        self._pass_scheduled = False  # before draining: a later ack schedules again
        self.send_acks()

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


def route_acks(consumer_cls: Any) -> None:
    """Send the acks and rejects of this pool's jobs through its :class:`ConsumerThread`.

    Celery queues each on the hub (``Consumer.call_soon_ack``; ``call_soon`` before
    Celery 5.7); a consumer whose pool has a consumer thread with a hub hands them to
    it instead.  Everything else is left to Celery.
    """
    name = "call_soon_ack" if "call_soon_ack" in vars(consumer_cls) else "call_soon"
    stock = vars(consumer_cls)[name]
    if getattr(stock, _GUARDED, False):
        return

    @wraps(stock)
    def call_soon_ack(self: Any, p: Any, *args: Any, **kwargs: Any) -> Any:
        consumer_thread = getattr(getattr(self, "pool", None), "consumer_thread", None)
        if (
            consumer_thread is None
            or not consumer_thread.has_hub
            or (name == "call_soon" and not _is_ack(p))
        ):
            return stock(self, p, *args, **kwargs)
        call = ppartial(p, *args, **kwargs)
        consumer_thread.queue_ack(call)
        return call

    setattr(call_soon_ack, _GUARDED, True)
    setattr(consumer_cls, name, call_soon_ack)


def _is_ack(callback: Any) -> bool:
    """``Message.ack_log_error`` or ``reject_log_error``: what Celery queues per task."""
    return getattr(callback, "__name__", None) in ("ack_log_error", "reject_log_error") and (
        getattr(callback, "__self__", None) is not None
    )


def guard_prefetch_restore(consumer_cls: Any) -> None:
    """Make the consumer's prefetch restore run on its hub's thread, from the hub."""
    stock = consumer_cls.__dict__.get("_restore_prefetch_count_after_connection_restart")
    if stock is None or getattr(stock, _GUARDED, False):
        return  # a Celery without it (< 5.5), or done already

    @wraps(stock)
    def restore(self: Any, *args: Any, **kwargs: Any) -> Any:
        hub: Any = getattr(self, "hub", None)
        owner = _hub_thread(hub) if hub is not None else None
        consumer_thread = getattr(getattr(self, "pool", None), "consumer_thread", None)
        # Its basic_qos waits for the broker's reply, reading (and handling) the
        # messages that come first: not from inside the handling of one.
        inside_a_read = consumer_thread is not None and consumer_thread.taking_message
        if owner is not None and (threading.get_ident() != owner or inside_a_read):
            hub.call_soon(partial(stock, self, *args, **kwargs))
            return None
        return stock(self, *args, **kwargs)

    setattr(restore, _GUARDED, True)
    consumer_cls._restore_prefetch_count_after_connection_restart = restore


def _hub_thread(hub: Any) -> int | None:
    """The thread that runs ``hub``'s loop: the consumer's (None: not known yet)."""
    ident = getattr(hub, "_loop_thread", None)  # kombu >= 5.7 records it
    return int(ident) if ident is not None else _HUB_THREADS.get(id(hub))
