"""Sync ``def`` tasks in worker threads, with limits and revoke as close to prefork as a thread allows.

Prefork signals a child process; a thread can only be sent an *asynchronous
exception* (``PyThreadState_SetAsyncExc``), which Python raises at the
thread's next bytecode.  A thread blocked inside a C call (``time.sleep``, a
socket read without timeout) sees it only when that call returns.

* Soft limit: ``SoftTimeLimitExceeded`` is raised in the thread; the task can
  catch it, as under prefork.
* Hard limit and revoke(terminate): the pool reports the outcome at once
  (``TimeLimitExceeded`` / ``REVOKED``) and raises :class:`ThreadInterrupted`
  in the thread.  It is a ``BaseException``, which Celery's tracer re-raises
  without storing a result, so the thread's late outcome never overwrites the
  state already reported.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import Any

import outcome


class ThreadInterrupted(BaseException):
    """Raised in a sync task's thread whose outcome the pool already reported."""


class ThreadSlot:
    """The thread running one sync job, while it runs it.

    :meth:`interrupt` (loop thread) and :meth:`run` (worker thread) take the
    same lock, so an exception is only ever raised inside the job's own call:
    never after it returned, in the thread pool's code.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ident: int | None = None
        self._interrupted = False
        self.thread_name: str | None = None
        self.finished = False

    def run(
        self, target: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> outcome.Outcome[Any]:
        """Call ``target`` and return its outcome: what it raises stays in the value.

        Any ``BaseException`` (``GeneratorExit`` too) raised back into the job's
        coroutine would end up in the root task group; as a value it cannot.
        """
        with self._lock:
            self._ident = threading.get_ident()
            self.thread_name = threading.current_thread().name
        try:
            try:
                result: outcome.Outcome[Any] = outcome.capture(target, *args, **kwargs)
                return result
            finally:
                with self._lock:
                    self._ident = None
                    self.finished = True
                    if self._interrupted:
                        _drop_pending(threading.get_ident())
        except BaseException as exc:  # noqa: BLE001 - an interrupt that landed after the call
            return outcome.Error(exc)

    def interrupt(self, exc_type: type[BaseException]) -> bool:
        """Raise ``exc_type`` in the job's thread; False if it is not running."""
        with self._lock:
            if self._ident is None:
                return False
            self._interrupted = True
            return _set_async_exc(self._ident, exc_type)


class _Dropped(BaseException):
    """Replaces an interrupt that came too late, and is caught at once."""


def _drop_pending(ident: int) -> None:
    """Drop an exception not yet raised in this (``ident``) thread.

    Clearing it with ``PyThreadState_SetAsyncExc(id, NULL)`` would leave the
    interpreter's "async exception pending" flag set with nothing to raise
    (CPython only clears the flag when it raises one), and every thread would
    then take the interpreter's slow path at every instruction.  So replace it
    with :class:`_Dropped`, which the next instruction raises, and catch that.
    """
    try:
        _set_async_exc(ident, _Dropped)
        while True:  # the next check for pending work raises it
            pass
    except _Dropped:
        pass


def _set_async_exc(ident: int, exc_type: type[BaseException]) -> bool:
    return bool(
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(ident), ctypes.py_object(exc_type)
        )
    )
