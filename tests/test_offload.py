"""BlockingCallThreads on its own: outcomes, context, cancellation, and no service."""

from __future__ import annotations

import contextvars
import threading
import time

import anyio
import anyio.lowlevel
import pytest

from celery_anyio import _backends, bridge
from celery_anyio.offload import BlockingCallThreads, offload_backend

pytestmark = pytest.mark.anyio

marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="unset")


def _threads(backend: str) -> BlockingCallThreads:
    return BlockingCallThreads(1, _backends.load(backend), "test-results")


async def test_calls_run_in_the_threads_with_the_callers_context(anyio_backend_name: str) -> None:
    threads = _threads(anyio_backend_name)

    def where() -> tuple[str, str]:
        return threading.current_thread().name, marker.get()

    def fail() -> None:
        raise ValueError("from the thread")

    async with anyio.create_task_group() as tg:
        tg.start_soon(threads.serve)
        await anyio.wait_all_tasks_blocked()
        results = []

        async def one(i: int) -> None:
            marker.set(f"job {i}")
            results.append((i, await threads.call(where)))

        async with anyio.create_task_group() as callers:
            for i in range(50):
                callers.start_soon(one, i)
        with pytest.raises(ValueError, match="from the thread"):
            await threads.call(fail)
        tg.cancel_scope.cancel()
    assert sorted(results) == [(i, ("test-results-0", f"job {i}")) for i in range(50)]


async def test_a_call_is_not_cancelled_half_way(anyio_backend_name: str) -> None:
    threads = _threads(anyio_backend_name)
    finished: list[int] = []

    def slow() -> int:
        time.sleep(0.2)
        return 7

    async with anyio.create_task_group() as tg:
        tg.start_soon(threads.serve)
        await anyio.wait_all_tasks_blocked()
        with anyio.move_on_after(0.05) as scope:
            finished.append(await threads.call(slow))
            await anyio.lowlevel.checkpoint()  # the cancellation lands here
            finished.append(-1)
        tg.cancel_scope.cancel()
    assert scope.cancelled_caught
    assert finished == [7]


async def test_without_the_service_calls_run_inline(anyio_backend_name: str) -> None:
    threads = _threads(anyio_backend_name)
    assert not threads.serving
    assert await threads.call(lambda: threading.current_thread().name) == (
        threading.current_thread().name
    )


class _Backend:
    """The result backend's blocking methods, each answering where it ran."""

    def store_result(self) -> str:
        return threading.current_thread().name

    def on_chord_part_return(self) -> str:
        return threading.current_thread().name

    def get_task_meta(self) -> str:  # Celery's deduplication reads it for a redelivered task
        return threading.current_thread().name


async def test_the_backends_blocking_methods_leave_the_loop_from_a_tracer(
    anyio_backend_name: str,
) -> None:
    threads = _threads(anyio_backend_name)
    backend = _Backend()
    assert offload_backend(backend, threads)
    assert not offload_backend(backend, threads)  # wrapped once
    here = threading.current_thread().name
    async with anyio.create_task_group() as tg:
        tg.start_soon(threads.serve)
        await anyio.wait_all_tasks_blocked()
        for name in ("store_result", "on_chord_part_return", "get_task_meta"):
            method = getattr(backend, name)
            traced = await bridge.run_bridged_outcome(method)  # as the tracer calls it
            assert traced.unwrap() == "test-results-0", name
            assert method() == here, name  # outside a tracer: as before
        tg.cancel_scope.cancel()
