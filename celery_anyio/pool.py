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

from . import _backends, patches, worker_lifespan
from .consumer_thread import ConsumerThread
from .django_tasks import DjangoTasks
from .jobs import Job, JobRunner, describe_frame
from .loop import LoopThread
from .messages import PoolNotRunning
from .offload import BlockingCallThreads, offload_app_backends
from .receivers import WorkerLoop
from .settings import PoolSettings
from .tasks import is_async_task
from .watchdog import LoopMonitor

logger = logging.getLogger(__name__)

STOP_POLL_SECONDS = 0.5
TERMINATE_GRACE_SECONDS = 10.0


class Pool(BasePool):  # type: ignore[misc]
    """Runs ``async def`` tasks concurrently on one AnyIO event loop."""

    is_green = False  # keep the normal pidbox; we have no spawn_n
    uses_semaphore = False  # the loop's CapacityLimiter queues jobs
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
        self._consumer = ConsumerThread()
        self._django = DjangoTasks.of(self.app)
        if self._django is not None:
            self._django.check(self.app, self.backend, self.settings.result_threads)
        self._runner = JobRunner(
            self.limit,
            self.settings.threads_for(self.limit),
            _backends.load(self.backend),
            after_report=self._consumer.wake,
            wrap_body=(
                self._django.wrap_body
                if self._django is not None and self.backend == "asyncio"
                else None
            ),
        )
        self._monitor = LoopMonitor(self.settings.block_warning, describe_frame)
        self._result_threads = (
            BlockingCallThreads(
                self.settings.result_threads,
                self._runner.backend,
                "celery-anyio-results",
                after_call=self._django.after_blocking_call if self._django else None,
            )
            if self.settings.result_threads > 0
            else None
        )
        self._loop: LoopThread | None = None
        self._loop_name: str | None = None
        self._async_tasks: dict[str, bool] = {}
        self._shutdown_sent = False

    # -- start ----------------------------------------------------------------

    def on_start(self) -> None:
        # Before Consumer.update_strategies builds the tracers.
        patches.install_worker(self.app)
        # This process runs the tasks: what prefork's children announce, it does.
        signals.worker_process_init.send(sender=None)
        self._loop = LoopThread(
            self.backend,
            dict(self.settings.backend_options),
            on_loop_start=self._on_loop_start,
            services=[
                self._monitor.run,
                *([self._result_threads.serve] if self._result_threads else []),
            ],
            admit=self._runner.admit,
            lifespan=worker_lifespan.load(self.settings.lifespan, self.app),
        )
        self._runner.attach(self._loop)
        self._loop.start()
        logger.info(
            "celery_anyio: %s event loop running, concurrency %d, %d threads for sync tasks",
            self.backend,
            self.limit,
            self._runner.stats()["threads"],
        )

    def _on_loop_start(self) -> None:
        if self.app is not None:
            self.app.set_current()
            if self._result_threads is not None:
                offload_app_backends(self.app, self._result_threads)
        WorkerLoop.set(self.backend)
        self._loop_name = self._runner.backend.loop_name()

    def did_start_ok(self) -> bool:
        return self._loop is not None and self._loop.running

    def register_with_event_loop(self, hub: Any) -> None:
        """The consumer's hub: acks and rejects of our jobs run there."""
        self._consumer.register(hub)

    # -- work -----------------------------------------------------------------

    def on_apply(
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
        args = tuple(args or ())
        kwargs = dict(kwargs or {})
        if target is celery_trace.trace_task_ret and self.app is not None:
            kwargs.setdefault("app", self.app)
        # Celery passes the Request's bound methods as callbacks, never the Request.
        request = getattr(accept_callback, "__self__", None)
        self._consumer.route_acks(request)
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
        try:
            self._runner.submit(job)
        except Exception as exc:
            # Not the message's fault: let the worker fail (and be restarted).
            raise PoolNotRunning(f"celery_anyio could not take task {job.label}: {exc}") from exc
        return job

    def _runs_async(self, target: Any, args: tuple[Any, ...]) -> bool:
        if target not in (celery_trace.fast_trace_task, celery_trace.trace_task_ret):
            return False
        name = args[0]
        known = self._async_tasks.get(name)
        if known is None and self.app is not None:
            task = self.app.tasks.get(name)
            known = self._async_tasks[name] = task is not None and is_async_task(task)
            if known:
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
            hostname = (self.options.get("initargs") or (None, None))[1]
            task.__trace__ = celery_trace.build_tracer(
                name, task, self.app.loader, hostname, app=self.app
            )

    def terminate_job(self, pid: int, signal: Any = None) -> None:
        """Cancel the job Celery knows by ``pid`` (our job id), never a process."""
        self._runner.terminate(pid)

    def flush(self) -> None:
        """The consumer lost its connection (or stops consuming): drop queued jobs.

        Their messages can no longer be acked on that connection, and the broker
        delivers them again; jobs already running finish, as under prefork.
        """
        dropped = self._runner.flush()
        if dropped:
            logger.info(
                "celery_anyio: %d queued tasks not started: the broker delivers them again",
                dropped,
            )

    # -- stop -----------------------------------------------------------------

    def on_close(self) -> None:
        """Celery stops feeding us first; nothing to do until stop."""

    def on_stop(self) -> None:
        """Warm stop: wait for every job handed to us (cold: cancel them)."""
        loop = self._loop
        if loop is None:
            return
        if worker_state.should_terminate is not None:
            self._runner.cancel_all()
        else:
            loop.stop()
        # Short waits keep the main thread responsive to a second signal.
        while not loop.join(STOP_POLL_SECONDS):
            if worker_state.should_terminate is not None and not self._runner.discarding:
                self._runner.cancel_all()
        WorkerLoop.clear()
        logger.info("celery_anyio: event loop lag (ms, last minute): %s", self._monitor.stats())
        self._process_shutdown()

    def on_terminate(self) -> None:
        """Cold stop: cancel everything, report nothing, end the loop thread."""
        loop = self._loop
        if loop is None:
            return
        self._runner.cancel_all()
        if not loop.join(TERMINATE_GRACE_SECONDS):
            logger.warning("celery_anyio: event loop did not stop in %ss", TERMINATE_GRACE_SECONDS)
        self._process_shutdown()

    def _process_shutdown(self) -> None:
        if not self._shutdown_sent:
            self._shutdown_sent = True
            signals.worker_process_shutdown.send(sender=None, pid=os.getpid(), exitcode=0)

    # -- remote control -------------------------------------------------------

    def grow(self, n: int = 1) -> None:
        self._resize(self.limit + n)

    def shrink(self, n: int = 1) -> None:
        self._resize(max(1, self.limit - n))

    def _resize(self, limit: int) -> None:
        self.limit = limit
        self._runner.resize(limit, self.settings.threads_for(limit))

    @property
    def num_processes(self) -> int:
        return self.limit

    def _get_info(self) -> dict[str, Any]:
        info: dict[str, Any] = super()._get_info()
        info.update(
            {
                "backend": self.backend,
                "loop": self._loop_name,
                **self._runner.stats(),
                "result-threads": self._result_threads.threads if self._result_threads else 0,
                "timeouts": [self.default_soft_timeout, self.default_timeout],
                "processes": [os.getpid()],
                "loop-lag-ms": self._monitor.stats(),
            }
        )
        return info
