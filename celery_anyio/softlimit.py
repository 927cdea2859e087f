"""Raise ``SoftTimeLimitExceeded`` inside an async task body, where it can catch it.

Under prefork the soft limit is a signal: the body gets
``SoftTimeLimitExceeded`` wherever it is, may catch it, clean up (even with
more I/O) and return a value.  AnyIO cancellation is level-triggered instead:
once a cancel scope is cancelled every later ``await`` inside it fails, so a
plain cancel scope would leave the body no way to carry on.

:func:`await_with_soft_limit` awaits the body through :class:`_BodyDriver`, a
transparent ``yield from``-style trampoline.  Each time the body waits, the
driver opens a fresh cancel scope, innermost, whose deadline is the soft limit,
and closes it when the body resumes.  If that deadline passes during the wait,
the scope ends the wait (with the backend's own abort protocol) and closes
cleanly; the driver then raises ``SoftTimeLimitExceeded`` at that very
``await`` in the body, with no cancellation left pending, so the body can carry
on.  Trio delivers ``KeyboardInterrupt`` at a checkpoint in the same way.

The driver does not interrupt a wait that must not be interrupted:

* inside a shielded scope (shielded cleanup, ``to_thread.run_sync``): the limit
  is raised at the first wait after the shield;
* while leaving an ``async with`` block (a task group waiting for its
  children, a client closing): a fallback scope around the whole body is
  cancelled instead, which unwinds that block properly (the children are
  cancelled), and ``SoftTimeLimitExceeded`` is raised where the body ends.
  Cleanup then runs in ``finally`` blocks, and awaits there need a shielded
  scope, as after any AnyIO cancellation.
"""

from __future__ import annotations

import contextvars
import math
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any, TypeVar

from anyio import CancelScope
from celery.exceptions import SoftTimeLimitExceeded

from ._backends import BackendModule

T = TypeVar("T")

# Frames of a body's await chain where a wait belongs to leaving a context.
_CONTEXT_EXITS = frozenset({"__aexit__", "_nested_child_finished"})


class _BodyDriver:
    """Drives a coroutine step by step, opening a soft-limit scope per wait."""

    def __init__(
        self,
        coro: Coroutine[Any, Any, Any],
        context: contextvars.Context,
        deadline: float,
        fallback: CancelScope,
        backend: BackendModule,
        on_expired: Callable[[], None],
        seconds: float,
    ) -> None:
        self._coro = coro
        self._context = context
        self._deadline = deadline
        self._fallback = fallback
        self._backend = backend
        self._on_expired = on_expired
        self._seconds = seconds
        self.delivered = False

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, run = self._coro, self._context.run
        send: Any = None
        pending: BaseException | None = None
        while True:
            try:
                if pending is not None:
                    exc, pending = pending, None
                    yielded = run(coro.throw, exc)
                else:
                    yielded = run(coro.send, send)
            except StopIteration as stop:
                return stop.value
            scope = None if self.delivered else self._arm()
            if scope is None:
                try:
                    send = yield yielded
                except BaseException as exc:  # noqa: BLE001 - passed on to the body
                    pending = exc
                continue
            try:
                send = yield yielded
            except BaseException as exc:  # noqa: BLE001 - passed on to the body
                if scope.__exit__(type(exc), exc, exc.__traceback__):
                    pending = self._deliver()
                else:
                    pending = exc
            else:
                # trio resumes the task with an outcome the innermost frame unwraps.
                cancelled = self._backend.cancellation_sent(send)
                if cancelled is None:
                    scope.__exit__(None, None, None)
                elif scope.__exit__(type(cancelled), cancelled, cancelled.__traceback__):
                    send = self._backend.error_to_send(self._deliver())

    def _arm(self) -> CancelScope | None:
        """The scope for the coming wait, or None if it must not be interrupted."""
        if self._backend.in_shielded_scope():
            self._set_fallback(math.inf)
            return None
        if _leaving_a_context(self._coro):
            self._set_fallback(self._deadline)
            return None
        self._set_fallback(math.inf)
        scope = CancelScope(deadline=self._deadline)
        scope.__enter__()
        return scope

    def _set_fallback(self, deadline: float) -> None:
        if self._fallback.deadline != deadline:
            self._fallback.deadline = deadline

    def _deliver(self) -> SoftTimeLimitExceeded:
        self.delivered = True
        self._set_fallback(math.inf)
        self._on_expired()
        return SoftTimeLimitExceeded(self._seconds)


def _leaving_a_context(coro: Any) -> bool:
    """Whether the body waits inside an ``__aexit__`` (e.g. of a task group)."""
    awaited = coro
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is not None and frame.f_code.co_name in _CONTEXT_EXITS:
            return True
        if isinstance(awaited, types.CoroutineType):
            awaited = awaited.cr_await
        else:
            awaited = getattr(awaited, "gi_yieldfrom", None) or getattr(awaited, "cr_await", None)
    return False


async def await_with_soft_limit(
    body: Awaitable[T],
    context: contextvars.Context,
    deadline: float,
    seconds: float,
    on_expired: Callable[[], None],
    backend: BackendModule,
) -> T:
    """Await ``body``; at ``deadline`` (loop clock) raise the soft limit in it.

    ``on_expired`` runs once when the soft limit fires (Celery logs it there).
    Each step of the body runs in ``context`` (see :mod:`celery_anyio.bridge`).
    """
    if not isinstance(body, Coroutine):
        return await body
    with CancelScope() as fallback:
        driver = _BodyDriver(body, context, deadline, fallback, backend, on_expired, seconds)
        return await driver  # type: ignore[no-any-return]
    # The fallback scope ended the body: the limit hit while it left a context.
    if not driver.delivered:
        on_expired()
    raise SoftTimeLimitExceeded(seconds)
