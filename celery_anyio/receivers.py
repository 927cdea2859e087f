"""``async def`` receivers for Celery's signals, awaited in registration order.

Celery's ``Signal.send`` calls each receiver and keeps what it returns, so an
``async def`` receiver would only produce an un-awaited coroutine.  The
``signals`` patch hands ``send`` a synchronous stand-in for each async
receiver (see :func:`sync_stand_in`); the stand-in runs the receiver to
completion before ``send`` moves on to the next receiver, wherever the signal
is sent from:

* inside a task's tracer (``task_prerun``, ``task_success``, ...) on the
  worker loop: awaited on the loop through the greenlet bridge, so it shares the
  loop (and the lifespan's resources) with the tasks;
* from another thread of a worker (the consumer's ``task_received``,
  ``worker_ready``, a sync task's thread): run on the worker loop while that
  thread waits, which cannot deadlock, as the loop never waits for it;
* on the loop thread outside the bridge, or where no worker loop runs (a client
  process, ``worker_init`` before the pool starts): on a short-lived loop of its
  own, in a helper thread if the calling thread already runs an event loop.

An exception from the receiver propagates into ``send``, which logs it and goes
on, as Celery does for sync receivers.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel

from . import bridge
from .context import job_identity
from .ownloop import run_on_own_loop

AsyncReceiver = Callable[..., Coroutine[Any, Any, Any]]


class WorkerLoop:
    """The running worker loop, if this process has one (set by the pool)."""

    token: anyio.lowlevel.EventLoopToken | None = None
    thread: threading.Thread | None = None
    backend = "asyncio"

    @classmethod
    def set(cls, backend: str) -> None:
        """Called on the loop thread when the loop starts."""
        cls.token = anyio.lowlevel.current_token()
        cls.thread = threading.current_thread()
        cls.backend = backend

    @classmethod
    def clear(cls) -> None:
        cls.token = None
        cls.thread = None


def is_async_receiver(receiver: Any) -> bool:
    return inspect.iscoroutinefunction(receiver) or inspect.iscoroutinefunction(
        getattr(receiver, "__call__", None)  # noqa: B004 - an async __call__ method
    )


def sync_stand_in(receiver: AsyncReceiver) -> Callable[..., Any]:
    """A sync receiver that runs ``receiver`` to completion where it is sent."""

    @functools.wraps(receiver)
    def stand_in(*args: Any, **kwargs: Any) -> Any:
        return run_receiver(functools.partial(receiver, *args, **kwargs))

    return stand_in


def run_receiver(make_coro: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run a coroutine from synchronous code, on the worker loop where possible."""
    if bridge.in_bridge():
        return bridge.await_(make_coro())
    token, loop_thread = WorkerLoop.token, WorkerLoop.thread
    if token is not None and threading.current_thread() is not loop_thread:
        try:
            return anyio.from_thread.run(make_coro, token=token)
        except anyio.RunFinishedError:
            pass  # the worker loop has just ended: fall through to a loop of our own
    identity = job_identity.get()
    return run_on_own_loop(make_coro, WorkerLoop.backend, lambda: job_identity.set(identity))
