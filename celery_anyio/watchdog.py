"""Measure event-loop lag and name the task that blocks the loop.

Every task on the worker shares one event loop, so one ``time.sleep(1)`` (or a
blocking client, or a CPU-bound loop) in an ``async def`` task stalls all of
them.  Two parts catch that:

* :meth:`LoopMonitor.tick` runs on the loop: it sleeps ``interval`` and records
  how late it woke up (the loop lag), which ``inspect stats`` reports;
* a watchdog thread looks at the loop thread's stack while the loop is late,
  so that when the loop recovers the warning can say which task held it and
  where, not only for how long.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import Counter, deque
from collections.abc import Callable
from time import monotonic
from types import FrameType

import anyio

from .pacing import StartPacer

logger = logging.getLogger(__name__)

TICK_SECONDS = 0.05
SAMPLES = 1200  # one minute of ticks


class LoopMonitor:
    """Loop lag statistics and the blocked-loop warning."""

    def __init__(
        self,
        block_warning: float,
        task_in_stack: Callable[[FrameType], str | None],
        pacer: StartPacer | None = None,
    ) -> None:
        """``task_in_stack(frame)`` names the task whose code runs in that stack;
        ``pacer`` hears each tick's lag."""
        self.block_warning = block_warning
        self._pacer = pacer
        self._task_in_stack = task_in_stack
        self._lags: deque[float] = deque(maxlen=SAMPLES)
        self.max_lag = 0.0
        self._last_tick = monotonic()
        self._loop_thread: int | None = None
        # (the tick the sample was late for, task on the stack, where)
        self._samples: list[tuple[float, str | None, str]] = []
        self._stopped = threading.Event()

    # -- on the loop ---------------------------------------------------------

    async def run(self) -> None:
        """Tick until cancelled; start the watchdog thread alongside."""
        self._loop_thread = threading.get_ident()
        self._last_tick = monotonic()
        if self.block_warning > 0:
            threading.Thread(target=self._watch, name="celery-anyio-watchdog", daemon=True).start()
        try:
            while True:
                await self.tick()
        finally:
            self._stopped.set()
            if self._pacer is not None:
                self._pacer.stop()

    async def tick(self) -> None:
        started = monotonic()
        previous_tick = self._last_tick
        await anyio.sleep(TICK_SECONDS)
        now = monotonic()
        lag = max(0.0, now - started - TICK_SECONDS)
        self._last_tick = now
        self._lags.append(lag)
        self.max_lag = max(self.max_lag, lag)
        if self._pacer is not None:
            self._pacer.on_tick(lag, now + TICK_SECONDS)
        # Every tick takes the samples: a lag too short to report must not leave
        # its samples (of another task, perhaps) to the next one that is.
        samples, self._samples = self._samples, []
        if self.block_warning > 0 and lag >= self.block_warning:
            self._report(
                lag, [(task, where) for tick, task, where in samples if tick == previous_tick]
            )

    def _report(self, lag: float, culprits: list[tuple[str | None, str]]) -> None:
        task = _main_task(culprits)
        if task is not None:
            where = [seen for named, seen in culprits if named == task][-1]
            logger.warning(
                "celery_anyio: the event loop was blocked for %.2fs by task %s (at %s); "
                "every other task on this worker waited. Await async calls, or move "
                "blocking work to anyio.to_thread.run_sync.",
                lag,
                task,
                where,
            )
        else:
            # No task held the loop: it waited for the GIL (another thread was
            # busy) or for the OS. That is lag, not a blocking task.
            where = culprits[-1][1] if culprits else "unknown"
            logger.debug("celery_anyio: the event loop lagged %.2fs (last seen at %s)", lag, where)

    # -- stats (any thread) -----------------------------------------------------

    def stats(self) -> dict[str, float]:
        """Lag over the last minute, in milliseconds."""
        lags = sorted(self._lags)
        if not lags:
            return {"last": 0.0, "p50": 0.0, "p99": 0.0, "max": 0.0}
        return {
            "last": _ms(self._lags[-1]),
            "p50": _ms(_percentile(lags, 0.50)),
            "p99": _ms(_percentile(lags, 0.99)),
            "max": _ms(self.max_lag),
        }

    # -- watchdog thread --------------------------------------------------------

    def _watch(self) -> None:
        period = max(self.block_warning / 4, 0.005)
        while not self._stopped.wait(period):
            tick = self._last_tick
            if monotonic() - tick - TICK_SECONDS < self.block_warning / 2:
                continue
            try:
                frame = sys._current_frames().get(self._loop_thread or 0)
                if frame is not None:
                    self._samples.append((tick, *self._describe(frame)))
            except Exception:  # a frame changing under the walk: the thread must live on
                logger.debug("celery_anyio: watchdog sample failed", exc_info=True)

    def _describe(self, frame: FrameType) -> tuple[str | None, str]:
        """(``task[id]`` on the stack, if any; ``file:line in function``)."""
        where = f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"
        return self._task_in_stack(frame), where


def _main_task(culprits: list[tuple[str | None, str]]) -> str | None:
    """The task seen on the loop's stack in most of the samples, if any.

    Sampling starts at half the threshold, so on a busy loop the first samples
    of a long block may name other tasks that ran just before it, and samples
    without a task come from the loop's own code: neither may hide the task that
    held the loop for most of the lag.  A task seen only now and then while the
    loop waited (for the GIL, or the OS) is not the culprit; nor is any task
    when none holds most of the samples.
    """
    seen = Counter(task for task, _ in culprits if task is not None)
    if not seen:
        return None
    task, hits = seen.most_common(1)[0]
    return task if hits * 2 > len(culprits) else None


def _percentile(ordered: list[float], fraction: float) -> float:
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)
