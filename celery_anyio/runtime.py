"""What runs jobs in one process: the loop thread and everything around it.

The worker process itself when it runs alone (``--processes 1``), each child
process otherwise: the same machinery either way, fed by Celery's consumer or
by the main process over a socket.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from . import _backends, worker_lifespan
from .django_tasks import DjangoTasks
from .jobs import Job, JobRunner, describe_frame
from .loop import LoopThread
from .offload import BlockingCallThreads, offload_app_backends
from .pacing import StartPacer
from .receivers import WorkerLoop
from .settings import PoolSettings
from .watchdog import LoopMonitor

logger = logging.getLogger(__name__)

STOP_POLL_SECONDS = 0.5


class TaskRuntime:
    """The loop thread, its root task group, the job runner, the lag monitor,
    the result threads and the worker lifespan of one process."""

    def __init__(
        self,
        app: Any,
        settings: PoolSettings,
        concurrency: int,
        *,
        after_report: Callable[[], None] = lambda: None,
        on_released: Callable[[Job], None] | None = None,
    ) -> None:
        self.app = app
        self.settings = settings
        self.backend = settings.backend
        django = DjangoTasks.of(app)
        self.pacer = pacer = (
            StartPacer(settings.start_pacing) if settings.start_pacing > 0 else None
        )
        self.runner = JobRunner(
            concurrency,
            settings.threads_for(concurrency),
            _backends.load(self.backend),
            after_report=after_report,
            on_released=on_released,
            wrap_body=django.wrap_body
            if django is not None and self.backend == "asyncio"
            else None,
            pacer=pacer,
        )
        self.monitor = LoopMonitor(settings.block_warning, describe_frame, pacer)
        self.result_threads = (
            BlockingCallThreads(
                settings.result_threads,
                self.runner.backend,
                "celery-anyio-results",
                after_call=django.after_blocking_call if django is not None else None,
            )
            if settings.result_threads > 0
            else None
        )
        self.loop: LoopThread | None = None
        self.loop_name: str | None = None

    def start(self) -> None:
        self.loop = LoopThread(
            self.backend,
            dict(self.settings.backend_options),
            on_loop_start=self._on_loop_start,
            services=[
                self.monitor.run,
                *([self.result_threads.serve] if self.result_threads else []),
            ],
            admit=self.runner.admit,
            lifespan=worker_lifespan.load(self.settings.lifespan, self.app),
        )
        self.runner.attach(self.loop)
        self.loop.start()

    def _on_loop_start(self) -> None:
        if self.app is not None:
            self.app.set_current()
            if self.result_threads is not None:
                offload_app_backends(self.app, self.result_threads)
        WorkerLoop.set(self.backend)
        self.loop_name = self.runner.backend.loop_name()

    @property
    def running(self) -> bool:
        return self.loop is not None and self.loop.running

    def stop(self, cold: Callable[[], bool] = lambda: False) -> None:
        """Warm stop: wait for every job taken over; cancel them once ``cold()``.

        Waits in short steps, so a caller in a signal handler stays responsive.
        """
        loop = self.loop
        if loop is None:
            return
        if cold():
            self.runner.cancel_all()
        else:
            loop.stop()
        while not loop.join(STOP_POLL_SECONDS):
            if cold() and not self.runner.discarding:
                self.runner.cancel_all()
        WorkerLoop.clear()
        logger.info("celery_anyio: event loop lag (ms, last minute): %s", self.monitor.stats())

    def cancel(self, grace: float) -> bool:
        """Cold stop: cancel every job, report nothing; True if the loop ended in time."""
        loop = self.loop
        if loop is None:
            return True
        self.runner.cancel_all()
        ended = loop.join(grace)
        WorkerLoop.clear()  # signals sent from now on must not wait for this loop
        return ended

    def info(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "loop": self.loop_name,
            **self.runner.stats(),
            "result-threads": self.result_threads.threads if self.result_threads else 0,
            "loop-lag-ms": self.monitor.stats(),
            "start-pacing": self.pacer.stats() if self.pacer is not None else "off",
        }
