"""Run Celery's synchronous tracer and let it ``await`` on the event loop.

The stock tracer (``celery.app.trace``) calls ``task.run(...)`` and expects the
return value.  For an ``async def`` task the pool runs the tracer in a greenlet;
the task's ``run`` wrapper hands the coroutine to :func:`await_`, which switches
back to the loop task that started the greenlet.  That task awaits the coroutine
(so cancel scopes, context and task groups behave as usual) and switches the
outcome back into the tracer.  SQLAlchemy's asyncio layer uses the same bridge.
Everything Celery does around the body (signals, states, retries, canvas) runs
unchanged, in Celery's own code.
"""

from __future__ import annotations

import contextvars
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from greenlet import GreenletExit, getcurrent, greenlet

T = TypeVar("T")

# Idle greenlets kept per thread. A new greenlet costs an allocation of its own
# frame stack (an mmap, a page fault, a munmap on exit) on top of the object:
# ~3 of them per job otherwise. Above this many idle ones, a finished greenlet is
# dropped, and killed (GreenletExit) when collected.
MAX_IDLE_GREENLETS = 256


class _TracerGreenlet(greenlet):  # type: ignore[misc]
    """A greenlet whose parent is the loop task awaiting on its behalf.

    It runs one call after another (:func:`_serve`), so a finished call leaves
    it idle rather than dead.
    """


class _Finished:
    """What a call in the bridge ended with: its return value or its exception."""

    __slots__ = ("error", "value")

    def __init__(self, value: Any, error: BaseException | None) -> None:
        self.value = value
        self.error = error


class _Idle(threading.local):
    greenlets: list[_TracerGreenlet]

    def __init__(self) -> None:
        self.greenlets = []


_idle = _Idle()


def in_bridge() -> bool:
    """Whether the caller runs synchronous code inside :func:`run_bridged`."""
    return isinstance(getcurrent(), _TracerGreenlet)


class _Plain:
    """An awaitable the pool's own code awaits as is (not as the task body)."""

    __slots__ = ("awaitable",)

    def __init__(self, awaitable: Awaitable[Any]) -> None:
        self.awaitable = awaitable


def await_(awaitable: Awaitable[T], *, as_body: bool = True) -> T:
    """Await ``awaitable`` on the loop from synchronous code in a bridge greenlet.

    ``as_body=False`` skips the ``awaiter`` of :func:`run_bridged` (the task
    body's soft time limit and exception translation): for the pool's own waits.
    """
    current = getcurrent()
    if not isinstance(current, _TracerGreenlet):
        raise RuntimeError("await_() called outside a celery_anyio bridge")  # noqa: TRY004
    result: T = current.parent.switch(awaitable if as_body else _Plain(awaitable))
    return result


def _serve(func: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """A bridge greenlet's life: run a call, hand its outcome over, wait for the next."""
    while True:
        try:
            finished = _Finished(func(*args), None)
        except GreenletExit:
            raise  # the greenlet is being collected: end it
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            finished = _Finished(None, exc)
        del func, args
        func, args = getcurrent().parent.switch(finished)


async def _plain_await(awaitable: Awaitable[T]) -> T:
    return await awaitable


async def run_bridged(
    func: Callable[..., T],
    *args: Any,
    awaiter: Callable[[Awaitable[Any]], Awaitable[Any]] = _plain_await,
) -> T:
    """Call ``func(*args)`` in a greenlet, awaiting whatever it passes to await_.

    ``awaiter`` awaits each of those awaitables; the pool uses it to put the
    task body under its soft time limit.  The call sees a copy of the caller's
    context, as a new task would.
    """
    idle = _idle.greenlets
    current = getcurrent()
    if idle:
        glet = idle.pop()
        if glet.parent is not current:
            glet.parent = current
    else:
        glet = _TracerGreenlet(_serve, current)
    glet.gr_context = contextvars.copy_context()
    request = glet.switch(func, args)
    while type(request) is not _Finished:
        if glet.dead:
            raise RuntimeError("a celery_anyio bridge greenlet ended unexpectedly")
        try:
            if type(request) is _Plain:
                value = await request.awaitable
            else:
                value = await awaiter(request)
        except BaseException:  # noqa: BLE001 - every outcome goes back to the tracer
            request = glet.throw(*sys.exc_info())
        else:
            request = glet.switch(value)
    glet.gr_context = None
    if len(idle) < MAX_IDLE_GREENLETS:
        idle.append(glet)
    # The idle greenlet's frame still refers to ``request``: empty it.
    result: T = request.value
    error, request.value, request.error = request.error, None, None
    if error is not None:
        raise error
    return result
