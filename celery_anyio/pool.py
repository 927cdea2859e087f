"""The Celery-facing pool: ``celery worker -P celery_anyio:Pool``.

Every method here is called by Celery on the consumer (main) thread, the
stop methods also from inside signal handlers.  None of them waits on the
event loop per task: work crosses to the loop thread through
:class:`~celery_anyio.loop.LoopThread`, and Celery's callbacks run on the loop
thread, where acks are handed back to the consumer through the kombu hub.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from functools import partial
from typing import Any

from celery.app import trace as celery_trace
from celery.concurrency.base import BasePool
from celery.worker import state as worker_state

from . import _backends, patches, worker_lifespan
from .jobs import Job, JobRunner
from .loop import LoopThread
from .offload import BlockingCallThreads, offload_app_backends
from .receivers import WorkerLoop
from .tasks import is_async_task
from .watchdog import LoopMonitor

logger = logging.getLogger(__name__)

DEFAULT_BACKEND = "asyncio"
THREAD_LIMIT_SETTING = "worker_anyio_thread_limit"
BACKEND_OPTIONS_SETTING = "worker_anyio_backend_options"
BLOCK_WARNING_SETTING = "worker_anyio_block_warning"
DEFAULT_THREAD_LIMIT = 40
DEFAULT_BLOCK_WARNING = 0.1
RESULT_THREADS_SETTING = "worker_anyio_result_threads"
DEFAULT_RESULT_THREADS = 1  # measured best: more threads only contend for the GIL
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
        conf = self.app.conf if self.app is not None else {}
        self.backend = resolve_backend(conf)
        self.limit: int = int(self.limit or 1)
        self.thread_limit = int(
            conf.get(THREAD_LIMIT_SETTING) or min(self.limit, DEFAULT_THREAD_LIMIT)
        )
        self.backend_options = dict(conf.get(BACKEND_OPTIONS_SETTING) or {})
        self.default_soft_timeout = self.options.get("soft_timeout")
        self.default_timeout = self.options.get("timeout")
        self._runner = JobRunner(self.limit, self.thread_limit, _backends.load(self.backend))
        block_warning = conf.get(BLOCK_WARNING_SETTING)
        self._monitor = LoopMonitor(
            DEFAULT_BLOCK_WARNING if block_warning is None else float(block_warning),
            JobRunner._run_accepted.__code__,
        )
        result_threads = conf.get(RESULT_THREADS_SETTING)
        if result_threads is None:
            result_threads = DEFAULT_RESULT_THREADS
        self._result_threads = (
            BlockingCallThreads(int(result_threads), self._runner.backend, "celery-anyio-results")
            if int(result_threads) > 0
            else None
        )
        self._loop: LoopThread | None = None
        self._loop_name: str | None = None
        self._async_tasks: dict[str, bool] = {}
        self._consumer_waker: socket.socket | None = None

    # -- start ----------------------------------------------------------------

    def on_start(self) -> None:
        if self.app is not None:
            # Before Consumer.update_strategies builds the tracers.
            patches.wrap_async_tasks(self.app)
            patches.patch_request_stacks(self.app)
        patches.lock_event_dispatcher()  # before the consumer creates its dispatcher
        self._loop = LoopThread(
            self.backend,
            self.backend_options,
            on_loop_start=self._on_loop_start,
            services=[
                self._monitor.run,
                *([self._result_threads.serve] if self._result_threads else []),
            ],
            admit=self._runner.admit,
            lifespan=worker_lifespan.load(self.app),
        )
        self._loop.start()
        logger.info(
            "celery_anyio: %s event loop running, concurrency %d, %d threads for sync tasks",
            self.backend,
            self.limit,
            self.thread_limit,
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
        """Wake the hub after our callbacks queued acks (kombu < 5.7 does not)."""
        if hasattr(hub, "_create_waker"):
            return
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)

        def drain(*_: Any) -> None:
            try:
                while reader.recv(4096):
                    pass
            except BlockingIOError:
                pass

        hub.add_reader(reader, drain)
        self._consumer_waker = writer
        self._runner.after_callbacks = self._wake_consumer

    def _wake_consumer(self) -> None:
        waker = self._consumer_waker
        if waker is not None:
            # BlockingIOError: already due to wake up; OSError: closing.
            with contextlib.suppress(OSError):
                waker.send(b"\0")

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
        job = Job(
            target=target,
            args=args,
            kwargs=kwargs,
            is_async=self._runs_async(target, args),
            callback=callback,
            accept_callback=accept_callback,
            error_callback=error_callback,
            timeout_callback=timeout_callback,
            soft_timeout=soft_timeout or self.default_soft_timeout,
            timeout=timeout or self.default_timeout,
            correlation_id=correlation_id,
        )
        loop = self._loop
        if loop is None or not loop.running:
            raise RuntimeError("celery_anyio pool is not running")
        self._runner.jobs[job.id] = job
        loop.spawn(self._runner.run, job)
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
        if getattr(task, "__trace__", None) is not None:
            hostname = (self.options.get("initargs") or (None, None))[1]
            task.__trace__ = celery_trace.build_tracer(
                name, task, self.app.loader, hostname, app=self.app
            )

    def terminate_job(self, pid: int, signal: Any = None) -> None:
        """Cancel the job Celery knows by ``pid`` (our job id), never a process."""
        job = self._runner.jobs.get(pid)
        if job is None or self._loop is None:
            return
        job.terminated = True
        job.stop_reason = "was terminated (revoke or cold shutdown)"
        scope = job.scope
        if scope is not None:
            self._loop.call_soon(scope.cancel)

    # -- stop -----------------------------------------------------------------

    def on_close(self) -> None:
        """Celery stops feeding us first; nothing to do until stop."""

    def on_stop(self) -> None:
        """Warm stop: wait for every job handed to us (cold: cancel them)."""
        loop = self._loop
        if loop is None:
            return
        if worker_state.should_terminate is not None:
            self._cancel_all(loop)
        else:
            loop.stop()
        # Short waits keep the main thread responsive to a second signal.
        while not loop.join(STOP_POLL_SECONDS):
            if worker_state.should_terminate is not None and not self._runner.discarding:
                self._cancel_all(loop)
        WorkerLoop.clear()
        logger.info("celery_anyio: event loop lag (ms, last minute): %s", self._monitor.stats())

    def on_terminate(self) -> None:
        """Cold stop: cancel everything, report nothing, end the loop thread."""
        loop = self._loop
        if loop is None:
            return
        self._cancel_all(loop)
        if not loop.join(TERMINATE_GRACE_SECONDS):
            logger.warning("celery_anyio: event loop did not stop in %ss", TERMINATE_GRACE_SECONDS)

    def _cancel_all(self, loop: LoopThread) -> None:
        self._runner.discarding = True
        loop.cancel()

    # -- remote control -------------------------------------------------------

    def grow(self, n: int = 1) -> None:
        self._resize(self.limit + n)

    def shrink(self, n: int = 1) -> None:
        self._resize(max(1, self.limit - n))

    def _resize(self, limit: int) -> None:
        self.limit = limit
        if self._loop is not None:
            self._loop.call_soon(partial(setattr, self._runner.limiter, "total_tokens", limit))

    @property
    def num_processes(self) -> int:
        return self.limit

    def _get_info(self) -> dict[str, Any]:
        info: dict[str, Any] = super()._get_info()
        info.update(
            {
                "backend": self.backend,
                "loop": self._loop_name,
                "running": self._runner.running,
                "queued": max(0, len(self._runner.jobs) - self._runner.running),
                "threads": self.thread_limit,
                "result-threads": self._result_threads.threads if self._result_threads else 0,
                "timeouts": [self.default_soft_timeout, self.default_timeout],
                "processes": [os.getpid()],
                "loop-lag-ms": self._monitor.stats(),
            }
        )
        return info


def resolve_backend(conf: Any) -> str:
    """The backend from config (the CLI option writes it there), else asyncio."""
    backend = conf.get(patches.BACKEND_SETTING) or DEFAULT_BACKEND
    _backends.load(backend)  # raises a clear LookupError for unknown names
    return str(backend)
