"""One Celery job on the loop: limits, cancel scopes and Celery's callbacks.

Celery hands the pool a tracer (``fast_trace_task``/``trace_task_ret``) and four
callbacks bound to the worker's ``Request``.  :class:`JobRunner` runs the tracer
in the bridge (async tasks) or a worker thread (sync tasks) inside cancel scopes
the pool owns, and reports the outcome exactly as billiard would:

* ``accept_callback(job_id, monotonic())`` when the job starts;
* ``callback((failed, retval, runtime))`` when the tracer returns;
* ``error_callback(ExceptionInfo)`` when something escapes the tracer;
* ``timeout_callback(soft, seconds)`` for time limits, and nothing else after a
  hard limit;
* nothing at all for a job cancelled through ``terminate_job`` (the ``Request``
  announces that itself) or by a cold shutdown.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from time import monotonic
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
from anyio import CancelScope, CapacityLimiter
from billiard.einfo import ExceptionInfo
from celery.exceptions import SoftTimeLimitExceeded
from celery.worker import state as worker_state

from . import bridge, outcomes
from ._backends import BackendModule
from .context import job_identity
from .softlimit import await_with_soft_limit
from .threads import ThreadInterrupted, ThreadSlot

logger = logging.getLogger(__name__)

_job_ids = itertools.count(1)

ADMIT_BATCH = 64  # jobs admitted between two checkpoints of the loop's main task

Callback = Callable[..., Any]


@dataclass(eq=False)
class Job:
    """What ``Pool.on_apply`` received, plus the scope that can cancel it."""

    target: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    is_async: bool
    callback: Callback | None = None
    accept_callback: Callback | None = None
    error_callback: Callback | None = None
    timeout_callback: Callback | None = None
    soft_timeout: float | None = None
    timeout: float | None = None
    correlation_id: str | None = None
    id: int = field(default_factory=lambda: next(_job_ids))
    accepted: bool = False
    terminated: bool = False
    stop_reason: str = "hit its hard time limit"
    scope: CancelScope | None = None
    thread: ThreadSlot | None = None

    @property
    def task_name(self) -> str:
        return str(self.args[0]) if self.args else repr(self.target)

    @property
    def label(self) -> str:
        """``name[id]``, as Celery's log lines name a task."""
        return f"{self.task_name}[{self.correlation_id}]"

    def terminate(self, signal: Any = None) -> None:
        """Celery's ``Request.terminate`` calls this on the apply result.

        ``Pool.terminate_job`` has already cancelled an accepted job; a job not
        yet accepted is left to ``Request``'s terminate-on-accept path.
        """


class JobRunner:
    """Runs jobs on the loop thread under the pool's limits."""

    def __init__(self, concurrency: int, thread_limit: int, backend: BackendModule) -> None:
        self.limiter = CapacityLimiter(concurrency)
        self.thread_limiter = CapacityLimiter(thread_limit)
        self.backend = backend
        self.jobs: dict[int, Job] = {}
        self.running = 0
        self.discarding = False
        self.after_callbacks: Callable[[], None] = lambda: None
        self._admitted_since_yield = 0

    async def admit(self, job: Job) -> None:
        """Wait for a free slot (``-c``); the loop admits jobs in arrival order.

        A free slot is taken without a checkpoint (a burst of arrivals would pay
        one per job); the loop yields every ``ADMIT_BATCH`` jobs instead.
        """
        try:
            self.limiter.acquire_on_behalf_of_nowait(job)
        except anyio.WouldBlock:
            await self.limiter.acquire_on_behalf_of(job)
            self._admitted_since_yield = 0
            return
        self._admitted_since_yield += 1
        if self._admitted_since_yield >= ADMIT_BATCH:
            self._admitted_since_yield = 0
            await anyio.lowlevel.checkpoint()

    async def run(self, job: Job) -> None:
        """Run an admitted job and give its slot back."""
        try:
            if job.terminated or self.discarding or await self._revoked_while_queued(job):
                return
            self.running += 1
            try:
                await self._run_accepted(job)
            finally:
                self.running -= 1
        finally:
            self.limiter.release_on_behalf_of(job)
            self.jobs.pop(job.id, None)

    async def _revoked_while_queued(self, job: Job) -> bool:
        """A revoke (or expiry) that came while the job waited for a slot.

        Celery checks before handing the job over; the pool's queue is a second
        place to wait, so check again: ``Request.revoked()`` announces it (in the
        bridge, for async ``task_revoked`` receivers).
        """
        request = getattr(job.accept_callback, "__self__", None)
        revoked = getattr(request, "revoked", None)
        if revoked is None:
            return False
        if not (
            job.correlation_id in worker_state.revoked
            or getattr(request, "expires", None)
            or getattr(request, "stamped_headers", None)
        ):
            return False  # what Request.revoked() would find, without its cost
        return bool(await bridge.run_bridged(revoked))

    async def _run_accepted(self, job: Job) -> None:
        job_identity.set(job)
        deadline = monotonic() + job.timeout if job.timeout else math.inf
        outcome: tuple[str, Any] = ("cancelled", None)
        scope = CancelScope(deadline=_anyio_deadline(deadline))
        try:
            with scope:
                job.scope = scope
                job.accepted = True
                await self._acall(job.accept_callback, job.id, monotonic())
                try:
                    outcome = ("done", await self._trace(job))
                except anyio.get_cancelled_exc_class():
                    raise
                except BaseException as exc:  # noqa: BLE001 - one job never tears down the root
                    outcome = ("error", _exception_info(exc))
        finally:
            # Also when a cold shutdown cancels the whole root task group.
            if job.thread is not None and not job.thread.finished:
                self._stop_thread(job, scope)
        if job.terminated or self.discarding:
            return  # Request announces terminate/cancel itself; cold shutdown: nothing
        if scope.cancel_called:
            logger.debug("job %s hit its hard time limit", job.id)
            await self._acall(job.timeout_callback, False, job.timeout)
        elif outcome[0] == "done":
            await self._acall(job.callback, outcome[1])
        elif outcome[0] == "error":
            await self._acall(job.error_callback, outcome[1])
        self.after_callbacks()

    async def _trace(self, job: Job) -> Any:
        if job.is_async:
            return await bridge.run_bridged(
                partial(job.target, **job.kwargs),
                *job.args,
                awaiter=partial(self._await_body, job),
            )
        return await self._trace_in_thread(job)

    async def _await_body(self, job: Job, body: Awaitable[Any]) -> Any:
        """Await the task body under the soft time limit; translate what it raises."""
        try:
            if not job.soft_timeout:
                return await body
            return await await_with_soft_limit(
                body,
                _anyio_deadline(monotonic() + job.soft_timeout),
                job.soft_timeout,
                partial(self._call, job.timeout_callback, True, job.soft_timeout),
                self.backend,
            )
        except BaseException as exc:
            translated = outcomes.translate(exc)
            if translated is exc:
                raise
            raise translated from translated.__cause__

    async def _trace_in_thread(self, job: Job) -> Any:
        """Run a sync job's tracer in a worker thread, soft limit included."""
        job.thread = slot = ThreadSlot()
        call = partial(
            anyio.to_thread.run_sync,
            slot.run,
            job.target,
            job.args,
            job.kwargs,
            abandon_on_cancel=True,  # a hard limit or revoke must not wait for the thread
            limiter=self.thread_limiter,
        )
        if not job.soft_timeout:
            return await call()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._soft_alarm, job, slot)
            result = await call()
            tg.cancel_scope.cancel()
        return result

    async def _soft_alarm(self, job: Job, slot: ThreadSlot) -> None:
        assert job.soft_timeout is not None
        await anyio.sleep(job.soft_timeout)
        self._call(job.timeout_callback, True, job.soft_timeout)
        slot.interrupt(SoftTimeLimitExceeded)

    def _stop_thread(self, job: Job, scope: CancelScope) -> None:
        """The job ended (hard limit, revoke, shutdown) while its thread runs on."""
        assert job.thread is not None
        if job.thread.interrupt(ThreadInterrupted):
            reason = job.stop_reason
            if not job.terminated and not scope.cancel_called:
                reason = "was cancelled by shutdown"
            logger.warning(
                "celery_anyio: sync task %s %s; its thread %s cannot be stopped while it "
                "is inside a blocking call: it is interrupted at its next Python "
                "instruction and its outcome is discarded",
                job.label,
                reason,
                job.thread.thread_name,
            )

    async def _acall(self, callback: Callback | None, *args: Any) -> None:
        """Call a Celery callback in the bridge, so async signal receivers it
        sends to (``task_failure`` on a hard limit, ...) are awaited on the loop."""
        if callback is not None:
            await bridge.run_bridged(self._call, callback, *args)

    def _call(self, callback: Callback | None, *args: Any) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except BaseException:
            logger.exception("celery_anyio: %r failed", callback)


def _exception_info(exc: BaseException) -> ExceptionInfo:
    """What escaped the tracer (``Reject``, ``MemoryError``, a sync body's exit)."""
    translated = outcomes.translate(exc)
    if translated is exc:
        return ExceptionInfo()
    return ExceptionInfo((type(translated), translated, exc.__traceback__))


def _anyio_deadline(monotonic_deadline: float) -> float:
    """Convert a ``time.monotonic`` deadline to the running loop's clock."""
    if math.isinf(monotonic_deadline):
        return math.inf
    return anyio.current_time() + (monotonic_deadline - monotonic())
