"""Tasks that use Django's ORM: async ORM, the trio-safe call, and a sync task."""

from __future__ import annotations

import anyio
from celery import shared_task
from django.db import connection

from celery_anyio.django_tasks import run_sync

from .models import Note


def _create(text: str) -> int:
    Note.objects.create(text=text)
    return int(connection.connection.info.backend_pid)


@shared_task
async def add_note(text: str, pause: float = 0.0) -> int:
    """Django's async ORM (asyncio only); returns the database session that served it."""
    from asgiref.sync import sync_to_async

    await anyio.sleep(pause)
    await Note.objects.acreate(text=text)
    return int(await sync_to_async(lambda: connection.connection.info.backend_pid)())


@shared_task
async def add_note_in_thread(text: str, pause: float = 0.0) -> int:
    """The trio-safe way: the ORM in a worker thread, connections cared for."""
    await anyio.sleep(pause)
    return await run_sync(_create, text)


@shared_task
def add_note_sync(text: str) -> int:
    return _create(text)
