"""Send tasks and await their results from async code, without blocking the loop.

Works in any AnyIO program (asyncio or trio): inside a ``celery_anyio`` worker
task, a Starlette/FastAPI or Quart app, a plain ``trio.run`` script.  With the
``aio`` patch (on by default) the same calls are methods with the names a
Celery user guesses: ``await task.adelay(...)``, ``await sig.aapply_async()``,
``await app.asend_task(...)``, ``await result.aget(timeout=...)``.

Publishing runs Celery's own ``apply_async``/``send_task`` in a worker thread
(kombu producers are synchronous).  AnyIO copies the caller's context into the
thread, so inside a worker task Celery sees the calling task as the parent and
the message carries its ``parent_id``/``root_id``, as a synchronous call would.

Waiting polls the result backend from a worker thread (``get_task_meta``, one
key read per pending result) with a backoff from 2 ms up to ``interval``; the
loop only sleeps between looks, so a deadline or a cancellation ends the wait at
once.  This works with the backends that store results under the task id
(Redis, the database, MongoDB and other key-value stores) whose client can be
used from several threads.  It does not use the Redis backend's pub/sub
consumer, which belongs to whoever calls ``.get()``.  ``rpc://`` delivers each
result as a message to the thread that sent the task, which no poller can read:
:func:`aget` refuses it with :class:`UnsupportedResultBackend`.

Both run in a few threads of their own per event loop (:func:`client_limiter`),
not in AnyIO's default limiter: publishing and reading results is Python work
that holds the GIL, and dozens of threads doing it at once keep the loop thread
waiting for the GIL, which is what every other coroutine of the program waits for.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread
from celery.exceptions import ImproperlyConfigured
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import EagerResult, ResultSet

if TYPE_CHECKING:
    from celery import Celery
    from celery.result import AsyncResult, ResultBase

__all__ = [
    "UnsupportedResultBackend",
    "aapply_async",
    "adelay",
    "aget",
    "asend_task",
    "client_limiter",
]

T = TypeVar("T")

#: First pause between two looks at the backend; it grows by BACKOFF up to ``interval``.
FIRST_DELAY = 0.002
BACKOFF = 1.5
#: How many of the client's thread calls (sends, looks at results) run at once per loop.
DEFAULT_THREADS = 4

_limiter: anyio.lowlevel.RunVar[anyio.CapacityLimiter] = anyio.lowlevel.RunVar(
    "celery_anyio.aio.client_limiter"
)


class UnsupportedResultBackend(ImproperlyConfigured):
    """The result backend cannot be polled from a worker thread (``rpc://``)."""


def client_limiter() -> anyio.CapacityLimiter:
    """The limiter of the client's thread calls on the running event loop.

    One per event loop run, created with :data:`DEFAULT_THREADS` tokens, as AnyIO
    keeps its own default thread limiter.  Few threads are enough: the calls are
    short, and the GIL runs one at a time anyway; more only make the loop thread
    wait longer for the GIL.  Being its own limiter, it also leaves AnyIO's default
    one (the program's ``to_thread`` calls, Starlette's sync endpoints) to the
    program.  Change it on the running loop: ``client_limiter().total_tokens = 8``.
    """
    try:
        return _limiter.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(DEFAULT_THREADS)
        _limiter.set(limiter)
        return limiter


# -- sending -----------------------------------------------------------------


async def aapply_async(
    task_or_signature: Any,
    args: Sequence[Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    **options: Any,
) -> ResultBase:
    """``task_or_signature.apply_async(args, kwargs, **options)`` off the loop.

    Works for tasks and every signature (chain, group, chord); returns what
    ``apply_async`` returns (a ``GroupResult`` for a group).
    """
    return await _publish(functools.partial(task_or_signature.apply_async, args, kwargs, **options))


async def adelay(task_or_signature: Any, /, *args: Any, **kwargs: Any) -> ResultBase:
    """``task_or_signature.delay(*args, **kwargs)`` off the loop."""
    return await _publish(functools.partial(task_or_signature.delay, *args, **kwargs))


async def asend_task(
    app: Celery,
    name: str,
    args: Sequence[Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    **options: Any,
) -> AsyncResult[Any]:
    """``app.send_task(name, args, kwargs, **options)`` off the loop."""
    # celery-types asks for a dict of keyword arguments; send_task takes any mapping.
    send = functools.partial(app.send_task, name, args, kwargs, **options)  # type: ignore[arg-type]
    return await _publish(send)


async def _publish(send: Callable[[], T]) -> T:
    # Not abandoned on cancellation: the thread would publish anyway, and the
    # caller should not go on before knowing whether it did.
    return await anyio.to_thread.run_sync(send, limiter=client_limiter())


# -- waiting -----------------------------------------------------------------


async def aget(
    result: ResultBase,
    timeout: float | None = None,  # noqa: ASYNC109 - the same as AsyncResult.get()
    propagate: bool = True,
    interval: float = 0.5,
    *,
    follow_parents: bool = True,
) -> Any:
    """Await ``result`` and return what ``result.get()`` returns, never blocking the loop.

    ``result`` is an ``AsyncResult``, a ``GroupResult`` or a ``ResultSet``.
    ``timeout`` raises :class:`celery.exceptions.TimeoutError` like ``.get()``;
    ``propagate`` re-raises the task's exception (a failed parent's for a chain,
    a failed member's for a group, as soon as it is stored), else returns it.
    ``interval`` caps the pause between two looks at the backend.
    Cancelling the caller ends the wait at once.
    """
    _check_pollable(result)
    look = functools.partial(_look, result, propagate, follow_parents)
    deadline = math.inf if timeout is None else anyio.current_time() + timeout
    ready = await _poll(look)  # even with timeout=0, like .get(timeout=0)
    delay = FIRST_DELAY
    with anyio.CancelScope(deadline=deadline):
        while not ready:
            await anyio.sleep(delay)
            delay = min(delay * BACKOFF, interval)
            ready = await _poll(look)
    if not ready:
        raise CeleryTimeoutError("The operation timed out.")
    return await _poll(functools.partial(_collect, result, propagate, follow_parents))


async def _poll(func: Callable[[], T]) -> T:
    # A look only reads the backend, so a cancelled caller need not wait for it.
    return await anyio.to_thread.run_sync(func, abandon_on_cancel=True, limiter=client_limiter())


def _check_pollable(result: Any) -> None:
    if isinstance(result, ResultSet):
        for member in result.results:  # type: ignore[union-attr]  # a list, never None here
            _check_pollable(member)
        return
    if isinstance(result, EagerResult):
        return
    from celery.backends.rpc import RPCBackend

    if isinstance(result.backend, RPCBackend):
        raise UnsupportedResultBackend(
            "aget() polls the result backend from a worker thread, but rpc:// sends "
            "each result as a message to the thread that sent the task. Use a backend "
            "that stores results (redis://, db+..., mongodb://, ...), or call "
            "result.get() in the thread that sent the task."
        )


def _look(result: Any, propagate: bool, follow_parents: bool) -> bool:
    """One look at the backend: whether ``result`` is ready (runs in a thread).

    Raises early, as ``.get()`` does, when propagating and a chain's parent or
    a group's member has failed.  Ready results are cached on their objects, so
    later looks read only the pending ones.
    """
    if isinstance(result, ResultSet):
        ready = True
        for member in result.results:  # type: ignore[union-attr]  # a list, never None here
            if not _look(member, propagate, follow_parents=True):
                ready = False
                if not propagate:
                    break  # no failure to find early: wait for this one first
        return ready
    if result.ignored:
        return True  # .get() returns None at once
    if propagate and follow_parents:
        parents = []
        node = result.parent
        while node is not None:
            parents.append(node)
            node = getattr(node, "parent", None)
        for node in reversed(parents):
            node.maybe_throw()
    if not result.ready():
        return False
    if propagate:
        result.maybe_throw()
    return True


def _collect(result: Any, propagate: bool, follow_parents: bool) -> Any:
    """What ``.get()`` returns for a ready ``result`` (runs in a thread).

    ``disable_sync_subtasks=False`` because Celery's guard is against a worker
    blocking on a subtask that may need that worker's own slot to run.  Here
    nothing blocks: the result is ready and cached, so ``get()`` only reads the
    cache, in a helper thread, while the loop goes on running other tasks
    (including the subtask, had it still been pending).
    """
    if isinstance(result, ResultSet):
        # What ResultSet.join() returns, member by member, without
        # join_native(), which would drive the Redis pub/sub consumer.
        members = result.results  # a list, never None here (celery-types: list | None)
        return [_collect(member, propagate, follow_parents=True) for member in members]  # type: ignore[union-attr]
    return result.get(
        propagate=propagate, follow_parents=follow_parents, disable_sync_subtasks=False
    )
