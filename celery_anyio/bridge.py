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
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from greenlet import getcurrent, greenlet

T = TypeVar("T")


class _TracerGreenlet(greenlet):  # type: ignore[misc]
    """A greenlet whose parent is the loop task awaiting on its behalf."""


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


async def _plain_await(awaitable: Awaitable[T]) -> T:
    return await awaitable


async def run_bridged(
    func: Callable[..., T],
    *args: Any,
    awaiter: Callable[[Awaitable[Any]], Awaitable[Any]] = _plain_await,
) -> T:
    """Call ``func(*args)`` in a greenlet, awaiting whatever it passes to await_.

    ``awaiter`` awaits each of those awaitables; the pool uses it to put the
    task body under its soft time limit.
    """
    glet = _TracerGreenlet(func, getcurrent())
    glet.gr_context = contextvars.copy_context()
    request = glet.switch(*args)
    while not glet.dead:
        try:
            if type(request) is _Plain:
                value = await request.awaitable
            else:
                value = await awaiter(request)
        except BaseException:  # noqa: BLE001 - every outcome goes back to the tracer
            request = glet.throw(*sys.exc_info())
        else:
            request = glet.switch(value)
    result: T = request
    return result
