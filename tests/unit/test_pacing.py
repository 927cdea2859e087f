"""Start pacing: jobs wait unstarted while the loop is behind, and only then."""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import pytest

from celery_anyio import _backends
from celery_anyio.jobs import JobRunner
from celery_anyio.loop import LoopThread
from celery_anyio.pacing import StartPacer
from celery_anyio.settings import PoolSettings, SettingError
from celery_anyio.watchdog import LoopMonitor

from .test_runner import Record, _await_sleep, _job

_NEVER_DUE = float("inf")  # the next tick, for the tests that tick by hand


@pytest.mark.anyio
async def test_a_pacer_nobody_ticks_holds_nothing_back(anyio_backend: Any) -> None:
    pacer = StartPacer(0.02, starts_per_tick=2)
    with anyio.fail_after(5):
        for _ in range(100):
            await pacer.wait_turn()
    assert pacer.stats() == {"held": 0, "late-ticks": 0}


@pytest.mark.anyio
async def test_after_a_late_tick_starts_wait_for_one_on_time(anyio_backend: Any) -> None:
    pacer = StartPacer(0.02, starts_per_tick=3)
    pacer.on_tick(0.5, _NEVER_DUE)
    started: list[int] = []

    async def start(number: int) -> None:
        await pacer.wait_turn()
        started.append(number)

    async with anyio.create_task_group() as group:
        for number in range(7):
            group.start_soon(start, number)
        await anyio.wait_all_tasks_blocked()
        assert started == []
        pacer.on_tick(0.001, _NEVER_DUE)  # on time: a batch of three may start
        await anyio.wait_all_tasks_blocked()
        assert len(started) == 3
        pacer.on_tick(0.3, _NEVER_DUE)  # late again: nobody else
        await anyio.wait_all_tasks_blocked()
        assert len(started) == 3
        pacer.on_tick(0.0, _NEVER_DUE)
        await anyio.wait_all_tasks_blocked()
        assert len(started) == 6
        pacer.stop()  # the monitor ended: nothing is held any more
    assert sorted(started) == list(range(7))
    assert pacer.stats()["late-ticks"] == 2


@pytest.mark.anyio
async def test_an_overdue_tick_holds_starts_before_it_comes(anyio_backend: Any) -> None:
    """The loop was held up just now: what arrived meanwhile waits for the tick."""
    pacer = StartPacer(0.02, starts_per_tick=10)
    pacer.on_tick(0.0, time.monotonic() - 1.0)  # on time then, but the next is late
    started = anyio.Event()

    async def start() -> None:
        await pacer.wait_turn()
        started.set()

    async with anyio.create_task_group() as group:
        group.start_soon(start)
        await anyio.wait_all_tasks_blocked()
        assert not started.is_set()
        pacer.on_tick(0.001, _NEVER_DUE)
    assert pacer.stats() == {"held": 1, "late-ticks": 0}


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_jobs_held_by_a_busy_loop_are_not_started_and_flush_drops_them(backend: str) -> None:
    """The point of pacing: what waits unstarted at a lost connection runs once."""
    record = Record()
    pacer = StartPacer(0.02, starts_per_tick=1)
    runner = JobRunner(10, 2, _backends.load(backend), on_released=record.release, pacer=pacer)
    loop = LoopThread(backend, admit=runner.admit)
    runner.attach(loop)
    loop.start()
    try:
        loop.call_soon(lambda: pacer.on_tick(0.5, _NEVER_DUE))  # the loop has fallen behind
        jobs = [_job(record, _await_sleep, 0.01) for _ in range(5)]
        for job in jobs:
            runner.submit(job)
        _wait_for(lambda: pacer.held == 1)  # the first waits for a tick, the rest behind it
        assert not any(job.started for job in jobs)
        assert sorted(runner.flush()) == sorted(job.id for job in jobs)
        loop.call_soon(lambda: pacer.on_tick(0.0, _NEVER_DUE))
        record.wait(lambda: len(record.released) == 5)
        assert all(record.of(job) == [] for job in jobs)  # none ran
    finally:
        runner.cancel_all()
        loop.join(10)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_blocked_loop_holds_the_next_jobs_until_it_has_caught_up(backend: str) -> None:
    """With the real monitor: jobs that arrive while a job blocks the loop wait."""
    record = Record()
    pacer = StartPacer(0.02, starts_per_tick=1)
    runner = JobRunner(10, 2, _backends.load(backend), on_released=record.release, pacer=pacer)
    monitor = LoopMonitor(0, lambda frame: None, pacer)
    loop = LoopThread(backend, admit=runner.admit, services=[monitor.run])
    runner.attach(loop)
    loop.start()
    try:
        _wait_for(lambda: pacer.enabled)  # the monitor has ticked
        blocking = threading.Event()
        blocker = _job(record, _block_the_loop, blocking, 0.3)
        runner.submit(blocker)
        assert blocking.wait(10)
        later = [_job(record, _await_sleep, 0.01) for _ in range(3)]
        for job in later:
            runner.submit(job)
        record.wait(lambda: len(record.released) == 4)
        assert all(record.of(job) == ["accepted", "done"] for job in [blocker, *later])
        assert pacer.stats()["late-ticks"] >= 1
        assert pacer.stats()["held"] >= 1
    finally:
        runner.cancel_all()
        loop.join(10)


def _block_the_loop(blocking: threading.Event, seconds: float) -> str:
    blocking.set()
    time.sleep(seconds)  # holds the loop thread, as a CPU-bound stretch would
    return "blocked"


def _wait_for(predicate: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_the_setting_turns_pacing_off_or_moves_its_threshold() -> None:
    assert PoolSettings.from_conf({}).start_pacing == 0.02
    assert PoolSettings.from_conf({"worker_anyio_start_pacing": 0}).start_pacing == 0
    assert PoolSettings.from_conf({"worker_anyio_start_pacing": "0.05"}).start_pacing == 0.05
    with pytest.raises(SettingError, match="worker_anyio_start_pacing"):
        PoolSettings.from_conf({"worker_anyio_start_pacing": -1})
