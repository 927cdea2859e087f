"""The async client's thread calls run in a small limiter of its own, one per event loop.

Dozens of threads publishing and reading results at once hold the GIL against the
caller's loop thread.  The loop lag itself is measured by benchmarks/client_lag.py;
these tests time nothing and count instead: how many threads were inside the
client's publishes (``Celery.send_task``) and result reads (the result backend's
``get``/``mget``) at the same moment, under 200 concurrent ``adelay`` + ``aget``
calls against the session's real worker, from a client on asyncio and on trio.
They count threads busy at once, not distinct threads: which thread a call gets
is the thread pool's business (under pytest, trio runs in guest mode, and its
I/O waits take threads from the same cache), while the threads that contend
with the loop for the GIL are the busy ones.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread
import pytest

import celery_anyio  # noqa: F401 - installs the aio methods, as the worker does
from celery_anyio import aio

from .harness import Client, selected_backends

CLIENTS = 200


class ThreadLog:
    """Which threads ran the client's blocking calls, and how many at once at most."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.busy: Counter[int] = Counter()  # thread id: its calls in progress
        self.threads: set[int] = set()
        self.kinds: set[str] = set()
        self.most_at_once = 0

    def wrap(self, kind: str, func: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            me = threading.get_ident()
            with self.lock:
                self.kinds.add(kind)
                self.threads.add(me)
                self.busy[me] += 1
                self.most_at_once = max(self.most_at_once, len(self.busy))
            try:
                return func(*args, **kwargs)
            finally:
                with self.lock:
                    self.busy[me] -= 1
                    if not self.busy[me]:
                        del self.busy[me]

        return recorded


def record_threads(monkeypatch: pytest.MonkeyPatch, client: Client) -> ThreadLog:
    log = ThreadLog()
    monkeypatch.setattr(client.app, "send_task", log.wrap("send", client.app.send_task))
    backend = type(client.app.backend)  # Celery makes one instance per thread
    for name in ("get", "mget"):
        monkeypatch.setattr(backend, name, log.wrap("read", getattr(backend, name)))
    return log


async def send_and_wait_all(client: Client, count: int = CLIENTS) -> list[Any]:
    """``count`` concurrent ``adelay`` + ``aget`` of a task that awaits 50 ms."""
    values: list[Any] = []

    async def one(i: int) -> None:
        result = await client.sig("sleepy", i, 0.05).adelay()
        values.append(await result.aget(timeout=60))

    async with anyio.create_task_group() as tg:
        for i in range(count):
            tg.start_soon(one, i)
    return sorted(values)


@pytest.mark.worker
@pytest.mark.anyio
async def test_concurrent_sends_and_waits_keep_to_the_client_limiter(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = record_threads(monkeypatch, client)
    assert aio.client_limiter().total_tokens == aio.DEFAULT_THREADS

    assert await send_and_wait_all(client) == list(range(CLIENTS))
    assert log.kinds == {"send", "read"}
    assert threading.get_ident() not in log.threads  # nothing blocking on the loop thread
    # In AnyIO's default limiter, up to 40 would run at once.
    assert log.most_at_once <= aio.DEFAULT_THREADS, log.most_at_once


@pytest.mark.worker
@pytest.mark.anyio
async def test_the_client_limiter_size_can_be_changed(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = record_threads(monkeypatch, client)
    aio.client_limiter().total_tokens = 1

    assert await send_and_wait_all(client) == list(range(CLIENTS))
    assert log.most_at_once == 1


@pytest.mark.worker
@pytest.mark.anyio
async def test_the_client_does_not_wait_for_anyio_default_limiter(client: Client) -> None:
    # The program's own to_thread calls (or Starlette's sync endpoints) hold all
    # of AnyIO's default threads: the client's sends and waits still go on.
    default = anyio.to_thread.current_default_thread_limiter()
    default.total_tokens = 1
    await default.acquire()
    try:
        with anyio.fail_after(30):  # only turns a hang into a failure
            assert await send_and_wait_all(client, 20) == list(range(20))
    finally:
        default.release()


@pytest.mark.parametrize("backend", selected_backends())
def test_each_event_loop_run_has_its_own_limiter(backend: str) -> None:
    async def size_then_change() -> float:
        limiter = aio.client_limiter()
        assert aio.client_limiter() is limiter  # the same for the whole run
        assert limiter is not anyio.to_thread.current_default_thread_limiter()
        size = limiter.total_tokens
        limiter.total_tokens = 1
        return size

    assert anyio.run(size_then_change, backend=backend) == aio.DEFAULT_THREADS
    assert anyio.run(size_then_change, backend=backend) == aio.DEFAULT_THREADS
