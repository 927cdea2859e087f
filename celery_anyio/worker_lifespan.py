"""The worker lifespan: async resources shared by every task of a worker.

An async context manager, entered on the worker's event loop before the first
task and left after the last; what it yields is what :func:`resources` returns
in any task (and in threads and child tasks the task starts)::

    @celery_anyio.lifespan(app)
    async def lifespan(app):
        async with httpx.AsyncClient() as client:
            yield {"http": client}

    @app.task
    async def fetch(url):
        return (await celery_anyio.resources()["http"].get(url)).status_code

Or name it in the configuration: ``worker_anyio_lifespan = "proj.lifespan:lifespan"``.
It may be an async generator function (as above) or return an async context
manager; it is called with the Celery app.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from typing import Any, TypeVar

from kombu.utils.imports import symbol_by_name

from .settings import LIFESPAN as LIFESPAN_SETTING

F = TypeVar("F", bound=Callable[..., Any])

_resources: ContextVar[Any] = ContextVar("celery_anyio_resources")


class NoLifespanError(LookupError):
    """:func:`resources` was called where no worker lifespan is running."""


def lifespan(app: Any) -> Callable[[F], F]:
    """Register the decorated function as ``app``'s worker lifespan."""

    def register(func: F) -> F:
        app.conf[LIFESPAN_SETTING] = func
        return func

    return register


def resources() -> Any:
    """What the worker lifespan yielded, from any task running in that worker."""
    try:
        return _resources.get()
    except LookupError:
        raise NoLifespanError(
            "no worker lifespan is running here: register one with "
            f"@celery_anyio.lifespan(app) or the {LIFESPAN_SETTING} setting, "
            "and call resources() from a task run by -P celery_anyio:Pool"
        ) from None


def load(configured: Any, app: Any) -> Callable[[], AbstractAsyncContextManager[Any]] | None:
    """The configured lifespan (a callable or its import path) as a factory, or None."""
    if not configured:
        return None
    func = symbol_by_name(configured) if isinstance(configured, str) else configured
    if not callable(func):
        raise TypeError(f"{LIFESPAN_SETTING} must name a callable, got {func!r}")
    if inspect.isasyncgenfunction(func):
        func = contextlib.asynccontextmanager(func)

    @contextlib.asynccontextmanager
    async def entered() -> AsyncIterator[Any]:
        async with func(app) as value:
            token = _resources.set(value)
            try:
                yield value
            finally:
                _resources.reset(token)

    return entered
