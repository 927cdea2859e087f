"""Run Celery's synchronous tracer and let it ``await`` on the event loop.

The stock tracer (``celery.app.trace``) calls ``task.run(...)`` and expects the
return value.  For an ``async def`` task the pool runs the tracer in a greenlet;
the task's ``run`` wrapper hands the coroutine to :func:`await_`, which switches
back to the loop task that started the greenlet.  That task awaits the coroutine
(so cancel scopes, context and task groups behave as usual) and switches the
outcome back into the tracer.  SQLAlchemy's asyncio layer uses the same bridge.
Everything Celery does around the body (signals, states, retries, canvas) runs
unchanged, in Celery's own code.

The body is awaited in the greenlet's context, not the loop task's: what
``task_prerun`` receivers set (OpenTelemetry's current span, any
``ContextVar``) is what the body sees, and what the body sets is what
``task_postrun`` sees, as if the tracer had called a sync body.
"""

from __future__ import annotations

import contextvars
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any, TypeVar

from greenlet import GreenletExit, getcurrent, greenlet
from outcome import Error, Outcome, Value

T = TypeVar("T")

#: Awaits what the greenlet hands over, in the greenlet's context.
Awaiter = Callable[[Awaitable[Any], contextvars.Context], Awaitable[Any]]

# Idle greenlets kept per thread. A new greenlet costs an allocation of its own
# frame stack (an mmap, a page fault, a munmap on exit) on top of the object:
# ~3 of them per job otherwise. Above this many idle ones, a finished greenlet is
# dropped, and killed (GreenletExit) when collected.
MAX_IDLE_GREENLETS = 256


class _TracerGreenlet(greenlet):  # type: ignore[misc]
    """A greenlet whose parent is the loop task awaiting on its behalf.

    It runs one call after another (:func:`_serve`), so a finished call leaves
    it idle rather than dead; the call's outcome waits in :attr:`outcome` for
    the loop task to take it.
    """

    outcome: Outcome[Any] | None = None


class _Idle(threading.local):
    greenlets: list[_TracerGreenlet]

    def __init__(self) -> None:
        self.greenlets = []


_idle = _Idle()
#: What a bridge greenlet switches to its parent when its call has finished.
_FINISHED = object()


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
    """A bridge greenlet's life: run a call, leave its outcome, wait for the next."""
    me: _TracerGreenlet = getcurrent()
    while True:
        try:
            me.outcome = Value(func(*args))
        except GreenletExit:
            raise  # the greenlet is being collected: end it
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            me.outcome = Error(exc)
        del func, args
        func, args = me.parent.switch(_FINISHED)


class _InContext:
    """Awaits a coroutine with each of its steps run in ``context``.

    The loop task that drives it keeps its own context; only the coroutine's
    code (and what it calls, spawns or starts in threads) sees ``context``.
    """

    __slots__ = ("_context", "_coro")

    def __init__(self, coro: Coroutine[Any, Any, Any], context: contextvars.Context) -> None:
        self._coro = coro
        self._context = context

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, run = self._coro, self._context.run
        send: Any = None
        error: BaseException | None = None
        while True:
            try:
                if error is None:
                    yielded = run(coro.send, send)
                else:
                    exc, error = error, None
                    yielded = run(coro.throw, exc)
            except StopIteration as stop:
                return stop.value
            try:
                send = yield yielded
            except BaseException as exc:  # noqa: BLE001 - thrown on into the coroutine
                send, error = None, exc


async def await_in_context(awaitable: Awaitable[T], context: contextvars.Context) -> T:
    """Await ``awaitable``; a coroutine's steps run in ``context``."""
    if isinstance(awaitable, Coroutine):
        result: T = await _InContext(awaitable, context)
        return result
    return await awaitable


async def run_bridged_outcome(
    func: Callable[..., T], *args: Any, awaiter: Awaiter = await_in_context
) -> Outcome[T]:
    """Call ``func(*args)`` in a greenlet, awaiting whatever it passes to await_.

    Returns the call's outcome: what it raised is never raised here.
    ``awaiter(awaitable, context)`` awaits each of those awaitables in the
    greenlet's context; the pool's own adds the task body's soft time limit.
    The call sees a copy of the caller's context, as a new task would.
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
    while request is not _FINISHED:
        if glet.dead:
            raise RuntimeError("a celery_anyio bridge greenlet ended unexpectedly")
        try:
            if type(request) is _Plain:
                value = await request.awaitable
            else:
                value = await awaiter(request, glet.gr_context)
        except BaseException:  # noqa: BLE001 - every outcome goes back to the tracer
            request = glet.throw(*sys.exc_info())
        else:
            request = glet.switch(value)
    glet.gr_context = None
    result, glet.outcome = glet.outcome, None
    if len(idle) < MAX_IDLE_GREENLETS:
        idle.append(glet)
    assert result is not None
    return result


async def run_bridged(func: Callable[..., T], *args: Any, awaiter: Awaiter = await_in_context) -> T:
    """:func:`run_bridged_outcome`, returning the value or raising the error."""
    return (await run_bridged_outcome(func, *args, awaiter=awaiter)).unwrap()
