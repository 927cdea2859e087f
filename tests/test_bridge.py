"""The greenlet bridge on its own: outcomes, context, cancellation, reuse."""

from __future__ import annotations

import contextvars
import gc
import weakref
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest
from greenlet import getcurrent

from celery_anyio import bridge

pytestmark = pytest.mark.anyio

marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="unset")


class Result:
    """A return value that can be watched with a weak reference."""


def _sleep_then(value: str, seconds: float) -> str:
    bridge.await_(anyio.sleep(seconds))
    return f"{value}/{marker.get()}"


async def test_interleaved_calls_each_get_their_own_outcome_and_context() -> None:
    results: dict[int, str] = {}

    async def one(i: int) -> None:
        marker.set(f"job {i}")
        results[i] = await bridge.run_bridged(_sleep_then, f"r{i}", 0.01 * (i % 7))

    async with anyio.create_task_group() as tg:
        for i in range(300):
            tg.start_soon(one, i)
    assert results == {i: f"r{i}/job {i}" for i in range(300)}
    assert len(bridge._idle.greenlets) <= bridge.MAX_IDLE_GREENLETS


async def test_a_greenlet_is_reused_with_a_fresh_context() -> None:
    def where() -> tuple[object, str]:
        seen = marker.get()
        marker.set("set inside the bridge")
        return getcurrent(), seen

    marker.set("caller")
    first, seen_first = await bridge.run_bridged(where)
    marker.set("caller again")
    second, seen_second = await bridge.run_bridged(where)
    assert first is second  # the same greenlet ran both calls
    assert (seen_first, seen_second) == ("caller", "caller again")
    assert marker.get() == "caller again"  # nothing leaks back out


async def test_errors_reach_the_caller_and_the_greenlet_runs_on() -> None:
    def fail() -> None:
        bridge.await_(anyio.lowlevel.checkpoint())
        raise KeyError("from the bridge")

    with pytest.raises(KeyError, match="from the bridge"):
        await bridge.run_bridged(fail)
    assert await bridge.run_bridged(_sleep_then, "after", 0) == "after/unset"


async def test_an_idle_greenlet_keeps_no_outcome_alive() -> None:
    def make() -> Result:
        return Result()

    watched = weakref.ref(await bridge.run_bridged(make))
    gc.collect()
    assert watched() is None


async def test_a_cancelled_call_is_told_and_the_greenlet_is_reusable() -> None:
    told: list[str] = []

    def wait_forever() -> None:
        try:
            bridge.await_(anyio.sleep_forever())
        except anyio.get_cancelled_exc_class():
            told.append("cancelled")
            raise

    with anyio.move_on_after(0.05):
        await bridge.run_bridged(wait_forever)
    assert told == ["cancelled"]
    assert await bridge.run_bridged(_sleep_then, "next", 0) == "next/unset"


async def test_idle_greenlets_are_capped() -> None:
    async with anyio.create_task_group() as tg:
        for _ in range(bridge.MAX_IDLE_GREENLETS + 50):
            tg.start_soon(bridge.run_bridged, _sleep_then, "x", 0.01)
    assert len(bridge._idle.greenlets) == bridge.MAX_IDLE_GREENLETS


def test_await_outside_the_bridge_is_a_clear_error() -> None:
    coro = anyio.lowlevel.checkpoint()
    with pytest.raises(RuntimeError, match="outside a celery_anyio bridge"):
        bridge.await_(coro)
    coro.close()


seen_by_body: contextvars.ContextVar[str] = contextvars.ContextVar("seen_by_body", default="unset")


async def _body(tag: str) -> str:
    """Reads what the sync caller set, sets something the caller then reads."""
    before = marker.get()
    await anyio.sleep(0.01 * (hash(tag) % 3))
    seen_by_body.set(f"body of {tag}")
    async with anyio.create_task_group() as tg:  # child tasks inherit the body's context
        children: list[str] = []

        async def child() -> None:
            await anyio.lowlevel.checkpoint()
            children.append(marker.get())

        tg.start_soon(child)
    in_thread = await anyio.to_thread.run_sync(marker.get)
    return f"{before}|{children[0]}|{in_thread}"


def _tracer_like(tag: str) -> tuple[str, str]:
    """As Celery's tracer: a prerun sets the context, the body runs, postrun reads."""
    marker.set(f"prerun of {tag}")
    body_saw = bridge.await_(_body(tag))
    return body_saw, seen_by_body.get()


async def test_the_awaited_body_runs_in_the_callers_context() -> None:
    results: dict[int, tuple[str, str]] = {}

    async def one(i: int) -> None:
        results[i] = await bridge.run_bridged(_tracer_like, str(i))

    async with anyio.create_task_group() as tg:
        for i in range(200):
            tg.start_soon(one, i)
    for i in range(200):
        prerun = f"prerun of {i}"
        assert results[i] == (f"{prerun}|{prerun}|{prerun}", f"body of {i}")
    assert marker.get() == "unset"  # the loop task's own context is untouched
    assert seen_by_body.get() == "unset"


async def test_soft_limited_body_runs_in_the_callers_context(anyio_backend_name: str) -> None:
    from celery_anyio import _backends
    from celery_anyio.softlimit import await_with_soft_limit

    backend = _backends.load(anyio_backend_name)

    async def soft_limited(body: Any, context: contextvars.Context) -> Any:
        deadline = anyio.current_time() + 30
        return await await_with_soft_limit(body, context, deadline, 30, lambda: None, backend)

    result = await bridge.run_bridged(_tracer_like, "soft", awaiter=soft_limited)
    assert result == ("prerun of soft|prerun of soft|prerun of soft", "body of soft")
