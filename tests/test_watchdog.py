"""The blocked-loop warning's verdict from the watchdog's stack samples."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from time import monotonic
from types import FrameType

import anyio
import pytest

from celery_anyio.watchdog import LoopMonitor

BLOCKER = "tests.blocker[1]"
OTHER = "tests.other[2]"


def _verdict(caplog: pytest.LogCaptureFixture, culprits: Sequence[tuple[str | None, str]]) -> str:
    monitor = LoopMonitor(0.1, _task_in_stack)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="celery_anyio.watchdog"):
        monitor._report(0.6, list(culprits))
    (record,) = caplog.records
    return f"{record.levelname}: {record.getMessage()}"


def test_one_task_in_every_sample_is_named(caplog: pytest.LogCaptureFixture) -> None:
    verdict = _verdict(caplog, [(BLOCKER, "app.py:3 in blocker")] * 20)
    assert verdict.startswith("WARNING")
    assert f"blocked for 0.60s by task {BLOCKER} (at app.py:3 in blocker)" in verdict


def test_a_sample_in_the_loops_own_code_does_not_hide_the_task(
    caplog: pytest.LogCaptureFixture,
) -> None:
    culprits = [(BLOCKER, "app.py:3 in blocker")] * 20 + [(None, "trio/_run.py:1 in run")]
    verdict = _verdict(caplog, culprits)
    assert verdict.startswith("WARNING")
    assert f"by task {BLOCKER} (at app.py:3 in blocker)" in verdict


def test_other_tasks_seen_before_a_long_block_do_not_hide_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A busy loop is late before the block starts: its first samples name others."""
    culprits = [(OTHER, "app.py:9 in other")] * 3 + [(BLOCKER, "app.py:3 in blocker")] * 200
    verdict = _verdict(caplog, [*culprits, (None, "asyncio/events.py:1 in _run")])
    assert verdict.startswith("WARNING")
    assert f"by task {BLOCKER} (at app.py:3 in blocker)" in verdict


@pytest.mark.parametrize(
    "culprits",
    [
        [(BLOCKER, "app.py:3 in blocker")] * 10 + [(OTHER, "app.py:9 in other")] * 10,
        [(None, "selectors.py:1 in select")] * 10 + [(BLOCKER, "app.py:3 in blocker")] * 2,
        [(None, "selectors.py:1 in select")] * 5,
        [],
    ],
    ids=["two tasks", "task now and then", "no task", "no sample"],
)
def test_lag_without_one_culprit_is_only_debug(
    caplog: pytest.LogCaptureFixture, culprits: list[tuple[str | None, str]]
) -> None:
    assert _verdict(caplog, culprits).startswith("DEBUG: celery_anyio: the event loop lagged")


@dataclass
class _Job:
    label: str


async def _run_job(job: _Job, seconds: float, monitor: LoopMonitor) -> int:
    """Block the loop as a job would; return how many samples the watchdog took."""
    time.sleep(seconds)  # noqa: ASYNC251 - the blocking call the watchdog is for
    return len(monitor._samples)


def _task_in_stack(frame: FrameType | None) -> str | None:
    """What jobs.describe_frame does for the pool's jobs, for :func:`_run_job`."""
    while frame is not None:
        if frame.f_code is _run_job.__code__:
            return str(frame.f_locals["job"].label)
        frame = frame.f_back
    return None


async def _tick_while_blocked(monitor: LoopMonitor, job: _Job, lag: float) -> int:
    """One tick of the monitor, late by about ``lag`` because ``job`` blocks."""
    sampled = 0

    async def block() -> None:
        nonlocal sampled
        await anyio.sleep(0.01)  # the tick is asleep (trio starts tasks in any order)
        sampled = await _run_job(job, lag + 0.04, monitor)

    monitor._last_tick = monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(monitor.tick)
        tg.start_soon(block)
    return sampled


@pytest.mark.anyio
async def test_a_lag_too_short_to_report_leaves_no_samples_to_the_next(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Samples start at half the threshold (0.6 s) and come every 0.3 s: a lag of
    # 1 s is sampled, not reported (0.2 s to spare on a busy machine). Its samples
    # name another task, so left over they would turn the next warning into a
    # "several tasks" debug line.
    monitor = LoopMonitor(1.2, _task_in_stack)
    monitor._loop_thread = threading.get_ident()
    watchdog = threading.Thread(target=monitor._watch, daemon=True)
    watchdog.start()
    try:
        with caplog.at_level(logging.DEBUG, logger="celery_anyio.watchdog"):
            assert await _tick_while_blocked(monitor, _Job(OTHER), 1.0) >= 1
            assert not caplog.records
            await _tick_while_blocked(monitor, _Job(BLOCKER), 1.8)
    finally:
        monitor._stopped.set()
        watchdog.join()
    (record,) = caplog.records
    assert record.levelname == "WARNING"
    assert f"by task {BLOCKER} (at " in record.getMessage()


@pytest.mark.anyio
async def test_a_failed_sample_does_not_end_the_watchdog() -> None:
    monitor = LoopMonitor(0.4, _task_in_stack)
    monitor._loop_thread = threading.get_ident()
    attempts = 0

    def broken(frame: object) -> tuple[str | None, str]:
        nonlocal attempts
        attempts += 1
        raise RuntimeError("the frame changed under the walk")

    monitor._describe = broken  # type: ignore[method-assign]
    watchdog = threading.Thread(target=monitor._watch, daemon=True)
    watchdog.start()
    try:
        await _tick_while_blocked(monitor, _Job(BLOCKER), 0.7)
        assert attempts >= 2  # samples every 0.1 s from 0.2 s late on
        assert watchdog.is_alive()
    finally:
        monitor._stopped.set()
        watchdog.join()
