"""The soft time limit raised inside an async body, on both backends."""

from __future__ import annotations

import contextvars
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from celery.exceptions import SoftTimeLimitExceeded

from celery_anyio import _backends
from celery_anyio.softlimit import await_with_soft_limit

pytestmark = pytest.mark.anyio


@pytest.fixture
def soft_limited(anyio_backend_name: str) -> Any:
    """``await soft_limited(body, seconds, expired)`` as the pool would do it."""
    backend = _backends.load(anyio_backend_name)

    async def run(body: Any, seconds: float, expired: list[float]) -> Any:
        return await await_with_soft_limit(
            body,
            contextvars.copy_context(),
            anyio.current_time() + seconds,
            seconds,
            lambda: expired.append(seconds),
            backend,
        )

    return run


async def test_body_catches_the_soft_limit_and_returns(soft_limited: Any) -> None:
    expired: list[float] = []
    cleaned: list[str] = []

    async def body() -> str:
        try:
            await anyio.sleep(10)
        except SoftTimeLimitExceeded:
            await anyio.sleep(0.05)  # async cleanup runs: nothing is cancelled any more
            cleaned.append("yes")
            return "cleaned up"
        return "slept"

    with anyio.fail_after(5):
        started = anyio.current_time()
        assert await soft_limited(body(), 0.1, expired) == "cleaned up"
    assert 0.1 <= anyio.current_time() - started < 3  # at the limit, not after the 10 s sleep
    assert cleaned == ["yes"]
    assert expired == [0.1]


async def test_unhandled_soft_limit_raises(soft_limited: Any) -> None:
    expired: list[float] = []
    with anyio.fail_after(5), pytest.raises(SoftTimeLimitExceeded):
        await soft_limited(anyio.sleep(10), 0.05, expired)
    assert expired == [0.05]


async def test_soft_limit_inside_own_task_group_unwinds_it(soft_limited: Any) -> None:
    expired: list[float] = []
    finished: list[str] = []

    async def child() -> None:
        try:
            await anyio.sleep(10)
        finally:
            finished.append("child")

    async def body() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(child)
            tg.start_soon(child)

    with anyio.fail_after(5), pytest.raises(SoftTimeLimitExceeded):
        await soft_limited(body(), 0.05, expired)
    assert finished == ["child", "child"]
    assert expired == [0.05]


async def test_shielded_block_is_not_interrupted(soft_limited: Any) -> None:
    expired: list[float] = []
    steps: list[str] = []

    async def body() -> str:
        with anyio.CancelScope(shield=True):
            await anyio.sleep(0.2)
            steps.append("shielded done")
        try:
            await anyio.sleep(10)
        except SoftTimeLimitExceeded:
            steps.append("soft")
        return "ok"

    with anyio.fail_after(5):
        assert await soft_limited(body(), 0.05, expired) == "ok"
    assert steps == ["shielded done", "soft"]


async def test_outer_cancellation_wins_over_a_soft_limit_handler(soft_limited: Any) -> None:
    expired: list[float] = []
    seen: list[str] = []

    async def body() -> str:
        try:
            await anyio.sleep(10)
        except SoftTimeLimitExceeded:
            seen.append("soft")
            await anyio.sleep(10)  # a handler that would outlive the hard limit
        return "masked"

    with anyio.move_on_after(1.5) as outer:
        await soft_limited(body(), 0.05, expired)
    assert outer.cancelled_caught
    assert seen == ["soft"]


async def test_soft_and_outer_expiring_together_do_not_hang(soft_limited: Any) -> None:
    expired: list[float] = []
    unwound: list[str] = []

    async def body() -> None:
        try:
            await anyio.sleep(10)
        finally:
            unwound.append("finally")

    with anyio.fail_after(5):
        with anyio.move_on_after(0.05) as outer:
            await soft_limited(body(), 0.05, expired)
    assert outer.cancel_called
    assert unwound == ["finally"]


async def test_values_and_errors_pass_through(soft_limited: Any) -> None:
    expired: list[float] = []

    async def fine() -> int:
        await anyio.lowlevel.checkpoint()
        return 7

    async def broken() -> None:
        await anyio.lowlevel.checkpoint()
        raise KeyError("x")

    assert await soft_limited(fine(), 5, expired) == 7
    with pytest.raises(KeyError):
        await soft_limited(broken(), 5, expired)
    assert expired == []


async def test_body_inside_its_own_scope_can_catch_it(soft_limited: Any) -> None:
    expired: list[float] = []

    async def body() -> str:
        try:
            with anyio.move_on_after(100):
                await anyio.sleep(10)
        except SoftTimeLimitExceeded:
            return "caught outside my scope"
        return "slept"

    with anyio.fail_after(5):
        assert await soft_limited(body(), 0.05, expired) == "caught outside my scope"


async def test_thread_wait_is_not_interrupted(soft_limited: Any) -> None:
    import time

    import anyio.to_thread

    expired: list[float] = []
    steps: list[str] = []

    def nap() -> str:
        time.sleep(0.2)
        return "thread done"

    async def body() -> str:
        steps.append(await anyio.to_thread.run_sync(nap))
        try:
            await anyio.sleep(10)
        except SoftTimeLimitExceeded:
            steps.append("soft")
        return "ok"

    with anyio.fail_after(5):
        assert await soft_limited(body(), 0.05, expired) == "ok"
    assert steps == ["thread done", "soft"]
