"""Which Celery task a piece of code belongs to, when many share one thread.

Celery keys ``self.request`` and ``current_task`` by thread (or greenlet).  Every
job the pool runs sets :data:`job_identity` in its own AnyIO task; AnyIO copies
the context into child tasks and into ``to_thread`` workers, and the tracer's
greenlet gets a copy too, so all code working for one job sees one key.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from contextvars import ContextVar

job_identity: ContextVar[Hashable | None] = ContextVar("celery_anyio_job_identity", default=None)


def make_ident_func(fallback: Callable[[], Hashable]) -> Callable[[], Hashable]:
    """Return an ident function: the job's identity, else ``fallback()``."""
    get = job_identity.get

    def ident() -> Hashable:
        identity = get()
        return fallback() if identity is None else identity

    ident.__celery_anyio__ = True  # type: ignore[attr-defined]
    return ident
