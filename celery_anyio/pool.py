"""The Celery-facing pool: ``celery worker -P celery_anyio:Pool``.

Every method here is called by Celery on the consumer (main) thread, the
stop methods also from inside signal handlers.  None of them waits on the
event loop per task: work crosses to the loop thread through
:class:`~celery_anyio.loop.LoopThread`, and Celery's callbacks run on the loop
thread, where acks are handed back to the consumer through the kombu hub.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import signals
from celery.app import trace as celery_trace
from celery.concurrency.base import BasePool
from celery.worker import state as worker_state

from . import patches
from .consumer_thread import ConsumerThread
from .django_tasks import DjangoTasks
from .jobs import Job
from .messages import PoolNotRunning
from .processes import ProcessGroup
from .runtime import TaskRuntime
from .settings import PoolSettings
from .tasks import is_async_task

logger = logging.getLogger(__name__)

TERMINATE_GRACE_SECONDS = 10.0


class Pool(BasePool):
    """Runs ``async def`` tasks concurrently on AnyIO event loops.

    One loop in the worker process (``--processes 1``, the default), or one in
    each of N task processes (:mod:`celery_anyio.processes`).
    """

    is_green = False  # keep the normal pidbox; we have no spawn_n
    uses_semaphore = False  # the pool queues jobs itself
    task_join_will_block = True  # a blocking result.get() would freeze the loop
    signal_safe = False
    body_can_be_buffer = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings = PoolSettings.from_conf(self.app.conf if self.app is not None else None)
        self.backend = self.settings.backend
        self.limit: int = int(self.limit or 1)
        self.default_soft_timeout = self.options.get("soft_timeout")
        self.default_timeout = self.options.get("timeout")
        self.hostname: str | None = (self.options.get("initargs") or (None, None))[1]
        django = DjangoTasks.of(self.app)
        if django is not None:  # in the worker process, before any task process starts
            django.check(self.app, self.backend, self.settings.result_threads)
        self.consumer_thread = ConsumerThread()
        self._runtime: TaskRuntime | None = None
        self._group: ProcessGroup | None = None
        if self.settings.processes > 1:
            self._group = ProcessGroup(
                self.app,
                self.settings,
                self.settings.processes,
                self.limit,
                self.hostname,
                max_tasks_per_child=self.options.get("maxtasksperchild"),
                max_memory_per_child=self.options.get("max_memory_per_child"),
                after_callbacks=self.consumer_thread.send_acks,
            )
        else:
            self._runtime = TaskRuntime(
                self.app, self.settings, self.limit, after_report=self.consumer_thread.wake
            )
        self._async_tasks: dict[str, bool] = {}
        self._shutdown_sent = False
        conf = self.app.conf if self.app is not None else None
        self._deduplicates = bool(conf and conf.worker_deduplicate_successful_tasks)

    # -- start ----------------------------------------------------------------

    def on_start(self) -> None:
        # Before Consumer.update_strategies builds the tracers, and before any fork.
        patches.install_worker(self.app)
        if self._group is not None:
            self._group.start(revoked=_revoked_while_queued)
            logger.info(
                "celery_anyio: %d task processes on %s, concurrency %d in all",
                self.settings.processes,
                self.backend,
                self.limit,
            )
            return
        assert self._runtime is not None
        # This process runs the tasks: what prefork's children announce, it does.
        signals.worker_process_init.send(sender=self.hostname)
        self._runtime.start()
        for ignored in ("maxtasksperchild", "max_memory_per_child"):
            if self.options.get(ignored):
                logger.warning(
                    "celery_anyio: --max-%s needs --processes 2 or more: ignored",
                    "tasks-per-child" if ignored == "maxtasksperchild" else "memory-per-child",
                )
        logger.info(
            "celery_anyio: %s event loop running, concurrency %d, %d threads for sync tasks",
            self.backend,
            self.limit,
            self._runtime.runner.stats()["threads"],
        )

    def did_start_ok(self) -> bool:
        if self._group is not None:
            return self._group.ready
        return self._runtime is not None and self._runtime.running

    def register_with_event_loop(self, hub: Any) -> None:
        """The consumer's hub: acks and rejects of our jobs run there."""
        self.consumer_thread.register(hub)
        if self._group is not None:
            self._group.register(hub)

    # -- work -----------------------------------------------------------------

    # celery-types declares on_apply(*args, **kwargs); Celery passes apply_async's keywords.
    def on_apply(  # type: ignore[override]
        self,
        target: Any,
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        callback: Any = None,
        accept_callback: Any = None,
        error_callback: Any = None,
        timeout_callback: Any = None,
        soft_timeout: float | None = None,
        timeout: float | None = None,
        correlation_id: str | None = None,
        **_: Any,
    ) -> Job:
        self._send_acks()
        args = tuple(args or ())
        kwargs = dict(kwargs or {})
        if target is celery_trace.trace_task_ret and self._runtime is not None:
            kwargs.setdefault("app", self.app)
        # Celery passes the Request's bound methods as callbacks, never the Request.
        request = getattr(accept_callback, "__self__", None)
        job = Job(
            target=target,
            args=args,
            kwargs=kwargs,
            is_async=self._runs_async(target, args),
            request=request,
            callback=callback,
            accept_callback=accept_callback,
            error_callback=error_callback,
            timeout_callback=timeout_callback,
            soft_timeout=soft_timeout or self.default_soft_timeout,
            timeout=timeout or self.default_timeout,
            correlation_id=correlation_id,
        )
        if self._deduplicates and request is not None:
            job.redelivered = bool(request.delivery_info.get("redelivered"))
            if request.task.acks_late or self.app.conf.task_acks_late:  # the tracer's rule
                job.dedupe_id = correlation_id
        try:
            if self._group is not None:
                self._group.submit(job)
            else:
                assert self._runtime is not None
                self._runtime.runner.submit(job)
        except Exception as exc:
            # Not the message's fault: let the worker fail (and be restarted).
            raise PoolNotRunning(f"celery_anyio could not take task {job.label}: {exc}") from exc
        return job

    def _send_acks(self) -> None:
        """Send the acks of finished jobs before taking another message (see
        :mod:`celery_anyio.consumer_thread`): this is the consumer's thread, inside
        the consumer's read of that message."""
        consumer_thread = self.consumer_thread
        if not consumer_thread.has_hub or consumer_thread.taking_message:
            return  # a message handed over while Celery waited for a reply to a call
        consumer_thread.taking_message = True
        try:
            if self._group is not None:
                self._group.take_reports()  # what the children finished: acks queued
            consumer_thread.send_acks()
        except Exception:  # Celery's ack_log_error logged it; the hub sends the rest
            logger.debug("celery_anyio: an ack failed before a new message", exc_info=True)
        finally:
            consumer_thread.taking_message = False

    def _runs_async(self, target: Any, args: tuple[Any, ...]) -> bool:
        if target not in (celery_trace.fast_trace_task, celery_trace.trace_task_ret):
            return False
        name = args[0]
        known = self._async_tasks.get(name)
        if known is None and self.app is not None:
            task = self.app.tasks.get(name)
            known = self._async_tasks[name] = task is not None and is_async_task(task)
            if known and self._runtime is not None:
                self._wrap_late_task(name, task)
        return bool(known)

    def _wrap_late_task(self, name: str, task: Any) -> None:
        """An async task registered after start (``worker.reload()``, a late import).

        Its tracer was built around the bare coroutine function: wrap the task and
        build the tracer again, as ``Consumer.update_strategies`` does.
        """
        if name not in patches.wrap_async_tasks(self.app, only_new=True):
            return
        patches.patch_request_stacks(self.app)
        if getattr(task, "__trace__", None) is not None:
            task.__trace__ = celery_trace.build_tracer(
                name, task, self.app.loader, self.hostname, app=self.app
            )

    def terminate_job(self, pid: int, signal: Any = None) -> None:
        """Cancel the job Celery knows by ``pid`` (our job id), never a process."""
        if self._group is not None:
            self._group.terminate(pid)
        elif self._runtime is not None:
            self._runtime.runner.terminate(pid)

    def flush(self) -> None:
        """The consumer lost its connection (or stops consuming): drop queued jobs.

        Their messages can no longer be acked on that connection, and the broker
        delivers them again; jobs already running finish, as under prefork.
        """
        if self._group is not None:
            dropped = self._group.flush()
        else:
            assert self._runtime is not None
            dropped = len(self._runtime.runner.flush())
        if dropped:
            logger.info(
                "celery_anyio: %d queued tasks not started: the broker delivers them again",
                dropped,
            )

    # -- stop -----------------------------------------------------------------

    def on_close(self) -> None:
        """Celery stops feeding us first; nothing to do until stop."""

    def on_stop(self) -> None:
        """Warm stop: wait for every job handed over (cold, once asked: cancel them)."""
        if self._group is not None:
            self._group.stop(cold=_cold_requested)
            return
        if self._runtime is not None:
            self._runtime.stop(cold=_cold_requested)
            self._process_shutdown()

    def on_terminate(self) -> None:
        """Cold stop: cancel everything, report nothing."""
        if self._group is not None:
            self._group.cancel(TERMINATE_GRACE_SECONDS)
            return
        if self._runtime is not None:
            if not self._runtime.cancel(TERMINATE_GRACE_SECONDS):
                logger.warning(
                    "celery_anyio: event loop did not stop in %ss", TERMINATE_GRACE_SECONDS
                )
            self._process_shutdown()

    def _process_shutdown(self) -> None:
        if not self._shutdown_sent:
            self._shutdown_sent = True
            signals.worker_process_shutdown.send(sender=self.hostname, pid=os.getpid(), exitcode=0)

    # -- remote control -------------------------------------------------------

    def grow(self, n: int = 1) -> None:
        self._resize(self.limit + n)

    def shrink(self, n: int = 1) -> None:
        self._resize(max(1, self.limit - n))

    def _resize(self, limit: int) -> None:
        self.limit = limit
        if self._group is not None:
            self._group.resize(limit)
        elif self._runtime is not None:
            self._runtime.runner.resize(limit, self.settings.threads_for(limit))

    @property
    def num_processes(self) -> int:
        """What Celery sizes the prefetch by: the tasks running at once, in all."""
        return self.limit

    def _get_info(self) -> dict[str, Any]:
        info: dict[str, Any] = super()._get_info()  # type: ignore[misc]  # no stub
        info["timeouts"] = [self.default_soft_timeout, self.default_timeout]
        if self._group is not None:
            info.update(self._group.info())
        elif self._runtime is not None:
            info.update(self._runtime.info())
            info["processes"] = [os.getpid()]
        return info


def _cold_requested() -> bool:
    return worker_state.should_terminate is not None


def _revoked_while_queued(job: Job) -> bool:
    """A revoke (or expiry) that came while the job waited in the main process."""
    request = job.request
    if request is None or not (
        job.correlation_id in worker_state.revoked
        or getattr(request, "expires", None)
        or getattr(request, "stamped_headers", None)
    ):
        return False
    return bool(request.revoked())
