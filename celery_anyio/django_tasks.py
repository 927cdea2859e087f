"""Django's per-task database hygiene for async tasks, and a trio-safe ORM call.

Celery's Django fixup closes a task's database connections in ``task_prerun``
and ``task_postrun``, in the thread that sends them.  Django keeps connections
per thread; a sync task's thread is where its queries ran, so that works.  An
async task's queries do not run where its signals are sent (the loop thread):

* Django's async ORM (``acreate``, ``sync_to_async``) runs them in asgiref's one
  shared executor thread, so without more one connection would serve every async
  task of the worker, never be closed (``CONN_MAX_AGE = 0``) and never be
  replaced when it goes bad.  :meth:`DjangoTasks.wrap_body` gives each async task
  an ``asgiref.sync.ThreadSensitiveContext``, as Django's ASGI handler does for
  each request: the task's ORM calls share a thread of their own, and when the
  body ends the fixup's ``close_database`` runs in that thread.  asgiref needs
  asyncio: on trio the async ORM cannot run at all.
* :func:`run_sync` is the way on either backend (and the only one on trio): the
  call runs in a worker thread (``anyio.to_thread.run_sync``) and Django's
  ``close_old_connections`` runs after it in that same thread.
* The result backend's writes run in the pool's result threads
  (:mod:`celery_anyio.offload`); :meth:`DjangoTasks.after_blocking_call` closes
  their unusable or obsolete connections after each one, as Django does after
  each request.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from .settings import RESULT_THREADS, SettingError

logger = logging.getLogger(__name__)

T = TypeVar("T")


class DjangoTasks:
    """Django support for one worker: the app's installed Celery worker fixup."""

    def __init__(self, fixup: Any) -> None:
        self.fixup = fixup

    @classmethod
    def of(cls, app: Any) -> DjangoTasks | None:
        """The Django support ``app`` needs, if Celery's Django fixup runs in it."""
        for fixup in getattr(app, "_fixups", None) or ():
            worker_fixup = getattr(fixup, "_worker_fixup", None)
            if worker_fixup is not None and hasattr(worker_fixup, "close_database"):
                return cls(worker_fixup)
        return None

    def check(self, app: Any, backend: str, result_threads: int) -> None:
        """Refuse what cannot work, warn about what does not, at worker start."""
        if result_threads == 0 and _stores_with_django(app):
            raise SettingError(
                f"{RESULT_THREADS} = 0 stores async tasks' results on the event loop "
                "thread, where Django refuses to run its ORM (SynchronousOnlyOperation): "
                "the Django database result backend would never store them. Leave "
                f"{RESULT_THREADS} at 1 or more."
            )
        if backend == "trio":
            logger.warning(
                "celery_anyio: Django is set up and the backend is trio: Django's async "
                "ORM (acreate, sync_to_async) needs asyncio and fails here, and a sync ORM "
                "call in an async task blocks the loop unnoticed. Call the ORM through "
                "celery_anyio.django_tasks.run_sync(...) (or use --backend=asyncio)."
            )

    def wrap_body(self, body: Coroutine[Any, Any, T]) -> Coroutine[Any, Any, T]:
        """``body`` in a thread-sensitive context of its own (asyncio only)."""
        return self._in_own_thread(body)

    async def _in_own_thread(self, body: Coroutine[Any, Any, T]) -> T:
        from asgiref.sync import SyncToAsync, ThreadSensitiveContext, sync_to_async

        context = ThreadSensitiveContext()
        async with context:
            try:
                return await body
            finally:
                if context in SyncToAsync.context_to_thread_executor:  # the ORM was used
                    with anyio.CancelScope(shield=True):
                        await sync_to_async(self.fixup.close_database, thread_sensitive=True)()

    def after_blocking_call(self) -> None:
        """In a result thread: drop connections that are unusable or past their age."""
        from django.db import close_old_connections

        try:
            close_old_connections()
        except Exception:  # a store must not fail because a close did
            logger.debug("celery_anyio: closing old database connections failed", exc_info=True)


async def run_sync(func: Callable[..., T], *args: Any) -> T:
    """Run a sync (ORM) call in a worker thread, with Django's connection hygiene.

    Works on asyncio and trio.  After the call, Django's ``close_old_connections``
    runs in the same thread: with ``CONN_MAX_AGE = 0`` the connection is closed,
    as after a request; with a longer age it is kept, unless it is unusable.
    """
    return await anyio.to_thread.run_sync(functools.partial(_call_and_close, func, *args))


def _call_and_close(func: Callable[..., T], *args: Any) -> T:
    from django.db import close_old_connections

    try:
        return func(*args)
    finally:
        close_old_connections()


def _stores_with_django(app: Any) -> bool:
    try:
        backend = app.backend
    except Exception:  # noqa: BLE001 - a backend that does not load fails elsewhere
        return False
    return type(backend).__module__.startswith("django_celery_results")
