"""Start jobs only as fast as the event loop keeps up with them.

``-c`` says how many tasks may run at once; it cannot say how many the loop can
serve at once.  Past that point more started bodies add nothing: the loop runs
the same tasks per second, each body waits longer in its queue of ready work,
and each is *running* for longer.  A running ``acks_late`` task is what a lost
connection runs twice (its ack goes with the connection), and what a worker's
memory holds.  A job not yet started costs none of that: ``Pool.flush`` drops
it at a lost connection and the broker delivers it once.

So jobs start at the pace of the loop: :class:`StartPacer` lets a batch start per
tick of the loop monitor (:mod:`celery_anyio.watchdog`) that came on time, and
none after a tick that came late, or while the next tick is overdue (the loop was
just held up: what arrived meanwhile must not all start at once).  The loop's lag
is the signal because it is what a started body would wait: a loop whose tasks
are all waiting (sleeping, awaiting I/O, blocked on each other) ticks on time, so
tasks that only wait are not held back, however many there are: a batch per tick
(1,280 starts a second) is more than the worker's consumer hands one process.
"""

from __future__ import annotations

from time import monotonic

import anyio

#: Jobs that may start per tick that came on time.
STARTS_PER_TICK = 64


class StartPacer:
    """The budget of job starts, refilled by each on-time tick (loop thread only).

    Without ticks (no monitor running) it holds nothing back: see ``enabled``.
    """

    def __init__(self, busy_lag: float, starts_per_tick: int = STARTS_PER_TICK) -> None:
        """``busy_lag``: a tick later than this means the loop has a queue of ready work."""
        self.busy_lag = busy_lag
        self.starts_per_tick = starts_per_tick
        self._budget = starts_per_tick
        self._next_tick_due = 0.0
        self._refilled: anyio.Event | None = None
        #: Set by the first tick: a pacer nobody ticks never holds a job back.
        self.enabled = False
        #: Jobs that waited for a tick, and ticks that came late (``inspect stats``).
        self.held = 0
        self.late_ticks = 0

    def on_tick(self, lag: float, next_tick_due: float) -> None:
        """The loop monitor's tick came ``lag`` seconds late; the next is due then
        (``time.monotonic()``)."""
        self.enabled = True
        self._next_tick_due = next_tick_due
        if lag >= self.busy_lag:
            self._budget = 0
            self.late_ticks += 1
            return
        self._budget = self.starts_per_tick
        if self._refilled is not None:
            self._refilled.set()
            self._refilled = None

    def stop(self) -> None:
        """No more ticks will come (the monitor stopped): hold nothing back."""
        self.enabled = False
        if self._refilled is not None:
            self._refilled.set()
            self._refilled = None

    async def wait_turn(self) -> None:
        """Return when a job may start; wait for an on-time tick if the budget is
        spent or the next tick is already late."""
        if not self.enabled:
            return
        if self._budget > 0 and monotonic() - self._next_tick_due >= self.busy_lag:
            self._budget = 0
        if self._budget <= 0:
            self.held += 1
            while self._budget <= 0 and self.enabled:
                if self._refilled is None:
                    self._refilled = anyio.Event()
                await self._refilled.wait()
        self._budget -= 1

    def stats(self) -> dict[str, int]:
        return {"held": self.held, "late-ticks": self.late_ticks}
