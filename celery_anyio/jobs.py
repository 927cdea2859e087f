"""Celery jobs on the loop: who owns them, their limits, cancel scopes and callbacks.

Celery hands the pool a tracer (``fast_trace_task``/``trace_task_ret``) and four
callbacks bound to the worker's ``Request``.  :class:`JobRunner` owns every job
from :meth:`~JobRunner.submit` until its outcome is reported: it runs the
tracer in the bridge (async tasks) or a worker thread (sync tasks) inside
cancel scopes it owns, and reports the outcome exactly as billiard would:

* ``accept_callback(job_id, monotonic())`` when the job starts;
* ``callback((failed, retval, runtime))`` when the tracer returns;
* ``error_callback(ExceptionInfo)`` when something escapes the tracer;
* ``timeout_callback(soft, seconds)`` for time limits, and nothing else after a
  hard limit;
* nothing at all for a job cancelled through :meth:`~JobRunner.terminate` (the
  ``Request`` announces that itself), by a cold shutdown, or dropped by
  :meth:`~JobRunner.flush` before it started (the broker delivers it again).

Nothing a task raises is ever raised into the runner's own coroutines: the
tracer's outcome comes back as an :mod:`outcome` value from its thread or
greenlet, so no ``BaseException`` of a task reaches the root task group.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
from collections.abc import Awaitable, Callable, Coroutine
from contextvars import Context
from dataclasses import dataclass, field
from functools import partial
from time import monotonic
from types import FrameType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import outcome
from anyio import CancelScope, CapacityLimiter
from billiard.einfo import ExceptionInfo
from celery.exceptions import SoftTimeLimitExceeded
from celery.worker import state as worker_state

from . import bridge, outcomes
from ._backends import BackendModule
from .context import job_identity
from .pacing import StartPacer
from .softlimit import await_with_soft_limit
from .threads import ThreadInterrupted, ThreadSlot

if TYPE_CHECKING:
    from .loop import LoopThread

logger = logging.getLogger(__name__)

_job_ids = itertools.count(1)

ADMIT_BATCH = 64  # jobs admitted between two checkpoints of the loop's main task

Callback = Callable[..., Any]

TERMINATED = "was terminated (revoke or cold shutdown)"
HARD_LIMIT = "hit its hard time limit"
SHUTDOWN = "was cancelled by shutdown"


@dataclass(eq=False)
class Job:
    """One ``Pool.on_apply`` call: the tracer, Celery's callbacks and the ``Request``.

    ``request`` is the ``celery.worker.request.Request`` the callbacks belong to
    (``None`` for a plain callable handed to the pool).
    """

    target: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    is_async: bool
    request: Any = None
    callback: Callback | None = None
    accept_callback: Callback | None = None
    error_callback: Callback | None = None
    timeout_callback: Callback | None = None
    soft_timeout: float | None = None
    timeout: float | None = None
    correlation_id: str | None = None
    #: The task id Celery deduplicates this job by (``acks_late`` tasks under
    #: ``worker_deduplicate_successful_tasks``), else None.
    dedupe_id: str | None = None
    #: The broker delivered the message again (a lost connection, a dead worker).
    redelivered: bool = False
    id: int = field(default_factory=lambda: next(_job_ids))
    #: Why the pool stopped the job, once it has (None: it runs its course).
    stop_reason: str | None = None
    started: bool = False
    dropped: bool = False
    holds_slot: bool = False
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
    """The one owner of the pool's jobs: admits, runs, stops and counts them.

    :meth:`submit`, :meth:`terminate`, :meth:`flush`, :meth:`cancel_all` and
    :meth:`resize` may be called from any thread (Celery calls them on the
    consumer's); the rest runs on the loop thread.
    """

    def __init__(
        self,
        concurrency: int,
        thread_limit: int,
        backend: BackendModule,
        *,
        after_report: Callable[[], None] = lambda: None,
        on_released: Callable[[Job], None] | None = None,
        wrap_body: Callable[[Coroutine[Any, Any, Any]], Coroutine[Any, Any, Any]] | None = None,
        pacer: StartPacer | None = None,
    ) -> None:
        """``after_report`` runs after each job's outcome is reported, ``on_released``
        when a job has given its slot back (however it ended, even unstarted);
        ``wrap_body`` wraps each async body before it is awaited (Django);
        ``pacer`` holds jobs back while the loop cannot keep up."""
        self.limiter = CapacityLimiter(concurrency)
        self.thread_limiter = CapacityLimiter(thread_limit)
        self.backend = backend
        self._after_report = after_report
        self._on_released = on_released
        self._wrap_body = wrap_body
        self._pacer = pacer
        self._jobs: dict[int, Job] = {}
        self._running = 0
        self._discarding = False
        # Orders a job's start against flush(): a job either starts or is dropped.
        self._start_lock = threading.Lock()
        self._loop: LoopThread | None = None
        self._admitted_since_yield = 0
        #: The job admitted under each dedupe id, and the event set when it has
        #: ended (loop thread only).
        self._deliveries: dict[str, tuple[Job, anyio.Event]] = {}

    def attach(self, loop: LoopThread) -> None:
        """The loop the jobs run on (its ``admit`` is :meth:`admit`)."""
        self._loop = loop

    # -- any thread ----------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Take ``job`` over and hand it to the loop, without waiting for it."""
        loop = self._loop
        if loop is None or not loop.running:
            raise RuntimeError("celery_anyio pool is not running")
        self._jobs[job.id] = job
        loop.spawn(self.run, job)

    def get(self, job_id: int) -> Job | None:
        return self._jobs.get(job_id)

    def terminate(self, job_id: int, reason: str = TERMINATED) -> bool:
        """Cancel a job; its outcome is not reported. False if it is not ours."""
        job = self._jobs.get(job_id)
        if job is None or self._loop is None:
            return False
        job.stop_reason = reason
        scope = job.scope
        if scope is not None:
            self._loop.call_soon(scope.cancel)
        return True

    def flush(self) -> list[int]:
        """Drop every job that has not started; return their ids.

        Celery calls this when the consumer's connection is gone (and when it
        stops consuming): those messages can no longer be acked, and the broker
        delivers them again, so running them would only run them twice.
        """
        dropped = []
        with self._start_lock:
            for job in list(self._jobs.values()):
                if not job.started and not job.dropped:
                    job.dropped = True
                    self._jobs.pop(job.id, None)
                    dropped.append(job.id)
        return dropped

    def cancel_all(self) -> None:
        """Cold stop: cancel every job and report nothing."""
        self._discarding = True
        if self._loop is not None:
            self._loop.cancel()

    @property
    def discarding(self) -> bool:
        return self._discarding

    def resize(self, concurrency: int, thread_limit: int) -> None:
        """New limits, applied on the loop thread."""
        if self._loop is not None:
            self._loop.call_soon(partial(self._set_limits, concurrency, thread_limit))

    def _set_limits(self, concurrency: int, thread_limit: int) -> None:
        self.limiter.total_tokens = concurrency
        self.thread_limiter.total_tokens = thread_limit

    def stats(self) -> dict[str, int]:
        running = self._running
        return {
            "running": running,
            "queued": max(0, len(self._jobs) - running),
            "threads": int(self.thread_limiter.total_tokens),
        }

    # -- loop thread ---------------------------------------------------------------

    async def admit(self, job: Job) -> None:
        """Wait for a free slot (``-c``); the loop admits jobs in arrival order.

        A free slot is taken without a checkpoint (a burst of arrivals would pay
        one per job); the loop yields every ``ADMIT_BATCH`` jobs instead.  While
        the loop cannot keep up, jobs wait for the pacer first
        (:mod:`celery_anyio.pacing`), unstarted.  A redelivered job whose first
        delivery is still here takes no slot yet
        (:meth:`_take_slot_after_first_delivery`).
        """
        if job.dedupe_id is not None and not self._track_delivery(job, job.dedupe_id):
            return
        if self._pacer is not None and not job.dropped:  # a dropped job only passes by
            await self._pacer.wait_turn()
        try:
            self.limiter.acquire_on_behalf_of_nowait(job)
        except anyio.WouldBlock:
            await self.limiter.acquire_on_behalf_of(job)
            self._admitted_since_yield = 0
            job.holds_slot = True
            return
        job.holds_slot = True
        self._admitted_since_yield += 1
        if self._admitted_since_yield >= ADMIT_BATCH:
            self._admitted_since_yield = 0
            await anyio.lowlevel.checkpoint()

    async def run(self, job: Job) -> None:
        """Run an admitted job and give its slot back."""
        try:
            if not job.holds_slot:
                await self._take_slot_after_first_delivery(job)
            if (
                job.stop_reason is not None
                or self._discarding
                or await self._revoked_while_queued(job)
                or not self._start(job)
            ):
                return
            self._running += 1
            try:
                await self._run_started(job)
            finally:
                self._running -= 1
        finally:
            if job.holds_slot:
                self.limiter.release_on_behalf_of(job)
            self._jobs.pop(job.id, None)
            self._end_delivery(job)
            if self._on_released is not None:
                self._on_released(job)

    def _track_delivery(self, job: Job, dedupe_id: str) -> bool:
        """Note the job under its dedupe id; False for a redelivered job that waits."""
        if dedupe_id not in self._deliveries:
            self._deliveries[dedupe_id] = (job, anyio.Event())
            return True
        return not job.redelivered  # the same id sent twice by a client runs twice, as in Celery

    def _end_delivery(self, job: Job) -> None:
        if job.dedupe_id is None:
            return
        tracked = self._deliveries.get(job.dedupe_id)
        if tracked is not None and tracked[0] is job:
            del self._deliveries[job.dedupe_id]
            tracked[1].set()

    async def _take_slot_after_first_delivery(self, job: Job) -> None:
        """Wait, without a slot, until the earlier delivery of this task has ended here.

        A connection lost while it ran took its ack along, so the broker delivers
        the message again; started now, the copy would run beside it.  Started once
        it has ended, the copy finds it in ``successful_requests`` and Celery's
        deduplication skips it (a failed one runs again, as Celery would).
        """
        dedupe_id = job.dedupe_id
        if dedupe_id is not None:
            while (tracked := self._deliveries.get(dedupe_id)) is not None:
                await tracked[1].wait()
            self._deliveries[dedupe_id] = (job, anyio.Event())
        await self.limiter.acquire_on_behalf_of(job)
        job.holds_slot = True

    def _start(self, job: Job) -> bool:
        with self._start_lock:
            if job.dropped:
                return False
            job.started = True
            return True

    async def _revoked_while_queued(self, job: Job) -> bool:
        """A revoke (or expiry) that came while the job waited for a slot.

        Celery checks before handing the job over; the pool's queue is a second
        place to wait, so check again: ``Request.revoked()`` announces it (in the
        bridge, for async ``task_revoked`` receivers).
        """
        request = job.request
        revoked = getattr(request, "revoked", None)
        if revoked is None:
            return False
        if not (
            job.correlation_id in worker_state.revoked
            or getattr(request, "expires", None)
            or getattr(request, "stamped_headers", None)
        ):
            return False  # what Request.revoked() would find, without its cost
        found = await bridge.run_bridged_outcome(revoked)
        if isinstance(found, outcome.Value):
            return bool(found.value)
        assert isinstance(found, outcome.Error)
        logger.error("celery_anyio: revoke check of %s failed", job.label, exc_info=found.error)
        return False

    async def _run_started(self, job: Job) -> None:
        job_identity.set(job)
        deadline = monotonic() + job.timeout if job.timeout else math.inf
        traced: outcome.Outcome[Any] | None = None
        scope = CancelScope(deadline=_anyio_deadline(deadline))
        try:
            with scope:
                job.scope = scope
                await self._report(job.accept_callback, job.id, monotonic())
                traced = await self._trace(job)
        finally:
            # Also when a cold shutdown cancels the whole root task group.
            if job.thread is not None and not job.thread.finished:
                self._stop_thread(job, scope)
        if job.stop_reason is not None or self._discarding:
            return  # Request announces terminate/cancel itself; cold shutdown: nothing
        if scope.cancel_called:
            logger.debug("job %s hit its hard time limit", job.id)
            await self._report(job.timeout_callback, False, job.timeout)
        elif isinstance(traced, outcome.Value):
            await self._report(job.callback, traced.value)
        elif isinstance(traced, outcome.Error):
            await self._report(job.error_callback, _exception_info(traced.error))
        self._after_report()

    async def _trace(self, job: Job) -> outcome.Outcome[Any]:
        if job.is_async:
            return await bridge.run_bridged_outcome(
                partial(job.target, **job.kwargs),
                *job.args,
                awaiter=partial(self._await_body, job),
            )
        return await self._trace_in_thread(job)

    async def _await_body(self, job: Job, body: Awaitable[Any], context: Context) -> Any:
        """Await the task body (in the tracer's context) under the soft time limit;
        translate what it raises."""
        if self._wrap_body is not None and isinstance(body, Coroutine):
            body = self._wrap_body(body)
        try:
            if not job.soft_timeout:
                return await bridge.await_in_context(body, context)
            return await await_with_soft_limit(
                body,
                context,
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

    async def _trace_in_thread(self, job: Job) -> outcome.Outcome[Any]:
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
            if reason is None:
                reason = HARD_LIMIT if scope.cancel_called and not self._discarding else SHUTDOWN
            logger.warning(
                "celery_anyio: sync task %s %s; its thread %s cannot be stopped while it "
                "is inside a blocking call: it is interrupted at its next Python "
                "instruction and its outcome is discarded",
                job.label,
                reason,
                job.thread.thread_name,
            )

    async def _report(self, callback: Callback | None, *args: Any) -> None:
        """Call a Celery callback in the bridge, so async signal receivers it
        sends to (``task_failure`` on a hard limit, ...) are awaited on the loop."""
        if callback is not None:
            await bridge.run_bridged_outcome(self._call, callback, *args)

    def _call(self, callback: Callback | None, *args: Any) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except BaseException:
            logger.exception("celery_anyio: %r failed", callback)


def describe_frame(frame: FrameType | None) -> str | None:
    """``task[id]`` of the job whose code runs in ``frame``'s stack, if any.

    For the watchdog, which samples the loop thread's stack from another
    thread: a job's tracer runs in a greenlet whose stack ends at the bridge,
    so the tracer's own frame names the task there; elsewhere the job's
    :meth:`JobRunner._run_started` frame does.
    """
    while frame is not None:
        code = frame.f_code
        if code is _RUN_STARTED_CODE:
            job = frame.f_locals.get("job")
            return job.label if isinstance(job, Job) else None
        if code.co_name == "trace_task" and "uuid" in frame.f_locals:
            task = frame.f_locals.get("task")
            return f"{getattr(task, 'name', '?')}[{frame.f_locals['uuid']}]"
        frame = frame.f_back
    return None


_RUN_STARTED_CODE = JobRunner._run_started.__code__


def _exception_info(exc: BaseException) -> ExceptionInfo:
    """What escaped the tracer (``Reject``, ``MemoryError``, a sync body's exit)."""
    translated = outcomes.translate(exc)
    traceback = translated.__traceback__ or exc.__traceback__
    if traceback is None:  # never raised: give Celery a traceback to show
        try:
            raise translated
        except BaseException:  # noqa: BLE001 - captured for Celery, never propagated
            return ExceptionInfo()
    return ExceptionInfo((type(translated), translated, traceback))


def _anyio_deadline(monotonic_deadline: float) -> float:
    """Convert a ``time.monotonic`` deadline to the running loop's clock."""
    if math.isinf(monotonic_deadline):
        return math.inf
    return anyio.current_time() + (monotonic_deadline - monotonic())
