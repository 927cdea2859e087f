"""Celery's request stacks keyed by job: thousands of interleaved coroutines."""

from __future__ import annotations

import random

import anyio
import anyio.to_thread
import pytest
from celery import Celery, current_task
from celery._state import _task_stack  # type: ignore[attr-defined]  # private: no stub

from celery_anyio.context import job_identity
from celery_anyio.patches import patch_request_stacks

pytestmark = pytest.mark.anyio


@pytest.fixture
def task() -> object:
    app = Celery("ctx", broker="memory://", set_as_current=False)

    @app.task(bind=True, shared=False)
    async def probe(self: object) -> None: ...

    app.finalize()
    patch_request_stacks(app)
    return probe


async def test_interleaved_requests_stay_with_their_job(task: object) -> None:
    mismatches: list[tuple[int, str, object]] = []

    async def job(i: int) -> None:
        job_identity.set(("job", i))
        task.push_request(id=f"id-{i}")  # type: ignore[attr-defined]
        _task_stack.push(task)
        try:
            for _ in range(3):
                await anyio.sleep(random.random() / 100)
                if task.request.id != f"id-{i}":  # type: ignore[attr-defined]
                    mismatches.append((i, "request", task.request.id))  # type: ignore[attr-defined]
                if current_task.request.id != f"id-{i}":
                    mismatches.append((i, "current_task", current_task.request.id))
            seen = await anyio.to_thread.run_sync(lambda: task.request.id)  # type: ignore[attr-defined]
            if seen != f"id-{i}":
                mismatches.append((i, "thread", seen))
        finally:
            _task_stack.pop()
            task.pop_request()  # type: ignore[attr-defined]

    async with anyio.create_task_group() as tg:
        for i in range(2000):
            tg.start_soon(job, i)
    assert mismatches == []
    assert task.request.id is None  # type: ignore[attr-defined]
    assert len(task.request_stack._local.__storage__) == 0  # type: ignore[attr-defined]


async def test_code_outside_jobs_keeps_thread_semantics(task: object) -> None:
    task.push_request(id="outer")  # type: ignore[attr-defined]
    try:
        assert task.request.id == "outer"  # type: ignore[attr-defined]
        assert await anyio.to_thread.run_sync(lambda: task.request.id) is None  # type: ignore[attr-defined]
    finally:
        task.pop_request()  # type: ignore[attr-defined]
