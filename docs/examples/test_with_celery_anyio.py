"""Test async Celery tasks on a real worker running celery_anyio's pool.

``pytest test_with_celery_anyio.py`` runs each test twice: on an asyncio worker
and on a trio worker.  No broker is needed: ``memory://`` carries the messages
and ``cache+memory://`` keeps the results, inside the test process.  Set
``CELERY_BROKER_URL`` and ``CELERY_RESULT_BACKEND`` (Celery reads both) to run
the same tests on Redis or RabbitMQ.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import sniffio
from celery import Celery, group

app = Celery("example", broker="memory://", backend="cache+memory://")


@app.task
async def add(x: int, y: int) -> int:
    await anyio.sleep(0.01)  # a real await, on the worker's event loop
    return x + y


@app.task
async def event_loop_name() -> str:
    return sniffio.current_async_library()


@app.task
def multiply(x: int, y: int) -> int:
    return x * y  # sync tasks run in the worker's threads


@pytest.fixture
def celery_app() -> Celery:
    """The app that ``celery_anyio_worker`` starts a worker for."""
    return app


def test_async_task(celery_anyio_worker: Any) -> None:
    assert add.delay(2, 3).get(timeout=10) == 5


def test_sync_task(celery_anyio_worker: Any) -> None:
    assert multiply.delay(4, 5).get(timeout=10) == 20


def test_runs_on_the_backend_of_the_test(
    celery_anyio_worker: Any, celery_anyio_backend: str
) -> None:
    assert event_loop_name.delay().get(timeout=10) == celery_anyio_backend


def test_group_of_async_tasks(celery_anyio_worker: Any) -> None:
    result = group(add.s(i, i) for i in range(10)).delay()
    assert result.get(timeout=10) == [2 * i for i in range(10)]
