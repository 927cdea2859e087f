"""What a case is: a workload (the tasks) and a config (the worker that runs them)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

ANYIO_POOL = "celery_anyio:Pool"
# What a worker learns of its case from the environment (every app reads these).
BROKER_ENV = "CELERY_ANYIO_BENCH_BROKER"
RESULTS_ENV = "CELERY_ANYIO_BENCH_RESULTS"
QUEUE_ENV = "CELERY_ANYIO_BENCH_QUEUE"
CONCURRENCY_ENV = "CELERY_ANYIO_BENCH_CONCURRENCY"
BACKEND_OPTIONS_ENV = "CELERY_ANYIO_BENCH_BACKEND_OPTIONS"  # JSON, worker_anyio_backend_options
START_PACING_ENV = "CELERY_ANYIO_BENCH_START_PACING"  # worker_anyio_start_pacing
READY_MARKER = "celery-anyio-bench: worker ready. ts="  # then the worker's time.time()
PEERS = ("taskiq", "saq")  # other task queues on the same Redis, for reference

Task = tuple[str, dict[str, Any]]  # kind (noop, io, cpu, hold, reserved) and its arguments


@dataclass(frozen=True)
class Workload:
    """``n`` tasks of one kind; ``task_seconds`` is the mean time one takes."""

    name: str
    n: int
    io_seconds: float = 0.0
    hold: bool = False  # every task waits until all of its process's tasks have started
    reserve: bool = False  # every task waits until the worker has received all ``n``
    cpu_ms: float = 0.0
    cpu_every: int = 0  # every k-th task burns ``cpu_ms`` of CPU instead

    @property
    def waits_for_all(self) -> bool:
        """No paced latency phase and no cap on ``n`` for these: the tasks wait for each other."""
        return self.hold or self.reserve

    @property
    def task_seconds(self) -> float:
        if not self.cpu_every:
            return self.io_seconds
        share = 1 / self.cpu_every
        return (1 - share) * self.io_seconds + share * self.cpu_ms / 1000

    def tasks(self, n: int, processes: int = 1) -> list[Task]:
        """``n`` tasks; a held task waits for the ``n / processes`` of its own process."""
        out: list[Task] = []
        for i in range(n):
            if self.cpu_every and i % self.cpu_every == self.cpu_every - 1:
                out.append(("cpu", {"ms": self.cpu_ms}))
            elif self.reserve:
                out.append(("reserved", {"n": n}))
            elif self.hold:
                out.append(("hold", {"seconds": self.io_seconds, "n": n // processes}))
            elif self.io_seconds:
                out.append(("io", {"seconds": self.io_seconds}))
            else:
                out.append(("noop", {}))
        return out


@dataclass(frozen=True)
class Config:
    """A worker command line, and how many of it drain the same queue together.

    ``processes`` is celery_anyio's ``--processes`` (and taskiq's and saq's
    ``--workers``); ``workers`` is the number of independent workers started
    on the queue. ``backend`` is ``asyncio``, ``uvloop`` (asyncio with
    ``use_uvloop``) or ``trio`` for celery_anyio.
    """

    pool: str
    concurrency: int
    backend: str | None = None
    processes: int = 1
    workers: int = 1
    prefetch: int | None = None  # the prefetch multiplier, when not the default
    #: celery_anyio's ``worker_anyio_start_pacing``, when not the default (0: off).
    start_pacing: float | None = None

    @property
    def system(self) -> str:
        return self.pool if self.pool in PEERS else "celery"

    @property
    def is_anyio(self) -> bool:
        return self.pool == ANYIO_POOL

    @property
    def variant(self) -> str:
        """The backend for celery_anyio, else the pool's name."""
        return str(self.backend) if self.is_anyio else self.pool

    @property
    def label(self) -> str:
        if self.is_anyio:
            text = f"anyio-{self.backend} -c {self.concurrency}"
            if self.processes > 1:
                text += f" --processes {self.processes}"
            if self.start_pacing is not None:
                text += f" (start pacing {self.start_pacing:g})"
        elif self.system != "celery":
            per = "--max-async-tasks" if self.pool == "taskiq" else "concurrency"
            text = f"{self.pool} --workers {self.processes} ({per} {self.concurrency})"
        elif self.pool == "solo":
            text = "solo"
        else:
            text = f"{self.pool} -c {self.concurrency}"
            if self.prefetch is not None:
                text += f" (prefetch {self.prefetch})"
        return f"{self.workers} x {text}" if self.workers > 1 else text

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.label.lower()).strip("-")

    @property
    def ready_lines(self) -> int:
        """How many ready lines one worker logs: taskiq and saq, one per process."""
        return 1 if self.system == "celery" else self.processes

    @property
    def prefetch_multiplier(self) -> int:
        if self.prefetch is not None:
            return self.prefetch
        # Enough to keep every slot busy, without prefetching 4 x 10,000 messages.
        return 1 if self.concurrency >= 1000 else 4

    def celery_args(self) -> list[str]:
        args = ["-P", self.pool, "-c", str(self.concurrency)]
        if self.is_anyio:
            args.append(f"--backend={'asyncio' if self.backend == 'uvloop' else self.backend}")
            if self.processes > 1:
                args += ["--processes", str(self.processes)]
        return [*args, "--prefetch-multiplier", str(self.prefetch_multiplier)]


def anyio(
    backend: str,
    concurrency: int,
    processes: int = 1,
    workers: int = 1,
    start_pacing: float | None = None,
) -> Config:
    return Config(
        ANYIO_POOL,
        concurrency,
        backend,
        processes=processes,
        workers=workers,
        start_pacing=start_pacing,
    )
