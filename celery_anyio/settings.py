"""The pool's ``worker_anyio_*`` settings: names, defaults and checks, in one place.

Read once, when the pool is built (or when eager mode needs the backend); a
wrong type or an unknown backend is an error at start, naming the setting.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, overload

BACKENDS = ("asyncio", "trio")

BACKEND = "worker_anyio_backend"
BACKEND_OPTIONS = "worker_anyio_backend_options"
THREAD_LIMIT = "worker_anyio_thread_limit"
BLOCK_WARNING = "worker_anyio_block_warning"
RESULT_THREADS = "worker_anyio_result_threads"
LIFESPAN = "worker_anyio_lifespan"
PROCESSES = "worker_anyio_processes"
START_PACING = "worker_anyio_start_pacing"

DEFAULT_BACKEND = "asyncio"
# Sync tasks' threads follow -c up to this many: more threads than that only
# contend for the GIL with the loop.
THREAD_CAP = 40
DEFAULT_BLOCK_WARNING = 0.1
# One store at a time is a queue that every async task's ack waits in when the
# consumer keeps the GIL busy (RabbitMQ); idle threads cost nothing.
DEFAULT_RESULT_THREADS = 4
# Loop lag (seconds) past which no new task starts until the loop has caught up:
# well above the lag of a loop that only contends for the GIL (its switch interval).
DEFAULT_START_PACING = 0.02


class SettingError(ValueError):
    """A ``worker_anyio_*`` setting has a value the pool cannot use."""


@dataclass(frozen=True)
class PoolSettings:
    """What the pool reads from the app's configuration."""

    backend: str = DEFAULT_BACKEND
    backend_options: Mapping[str, Any] = field(default_factory=dict)
    #: Threads for sync tasks; ``None`` follows the concurrency (up to THREAD_CAP).
    thread_limit: int | None = None
    block_warning: float = DEFAULT_BLOCK_WARNING
    result_threads: int = DEFAULT_RESULT_THREADS
    lifespan: Any = None
    #: Task processes; 1 runs the tasks in the worker process itself.
    processes: int = 1
    #: Loop lag that holds new tasks back (:mod:`celery_anyio.pacing`); 0: never.
    start_pacing: float = DEFAULT_START_PACING

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any] | None) -> PoolSettings:
        conf = conf if conf is not None else {}
        return cls(
            backend=backend_of(conf),
            backend_options=_mapping(conf, BACKEND_OPTIONS),
            thread_limit=_count(conf, THREAD_LIMIT, minimum=1),
            block_warning=_seconds(conf, BLOCK_WARNING, DEFAULT_BLOCK_WARNING),
            result_threads=_count(conf, RESULT_THREADS, minimum=0, default=DEFAULT_RESULT_THREADS),
            lifespan=conf.get(LIFESPAN) or None,
            processes=processes_of(conf.get(PROCESSES)),
            start_pacing=_seconds(conf, START_PACING, DEFAULT_START_PACING),
        )

    def threads_for(self, concurrency: int) -> int:
        """Threads for sync tasks at this concurrency."""
        if self.thread_limit is not None:
            return self.thread_limit
        return max(1, min(concurrency, THREAD_CAP))


def backend_of(conf: Mapping[str, Any]) -> str:
    """The configured AnyIO backend (the CLI option writes it there), else asyncio."""
    backend = conf.get(BACKEND) or DEFAULT_BACKEND
    if backend not in BACKENDS:
        raise SettingError(
            f"{BACKEND}: unknown AnyIO backend {backend!r}: choose one of {', '.join(BACKENDS)}"
        )
    return str(backend)


def processes_of(value: Any) -> int:
    """``worker_anyio_processes``: a number, or ``auto`` for the machine's cores."""
    if value is None or value == "":
        return 1
    if value == "auto":
        return os.cpu_count() or 1
    count = _count({PROCESSES: value}, PROCESSES, minimum=1)
    assert count is not None
    return count


def _mapping(conf: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = conf.get(name) or {}
    if not isinstance(value, Mapping):
        raise SettingError(f"{name} must be a mapping, got {value!r}")
    return dict(value)


@overload
def _count(conf: Mapping[str, Any], name: str, *, minimum: int) -> int | None: ...
@overload
def _count(conf: Mapping[str, Any], name: str, *, minimum: int, default: int) -> int: ...
def _count(
    conf: Mapping[str, Any], name: str, *, minimum: int, default: int | None = None
) -> int | None:
    value = conf.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SettingError(f"{name} must be a whole number, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise SettingError(f"{name} must be a whole number, got {value!r}") from None
    if number < minimum:
        raise SettingError(f"{name} must be at least {minimum}, got {number}")
    return number


def _seconds(conf: Mapping[str, Any], name: str, default: float) -> float:
    value = conf.get(name)
    if value is None:
        return default
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise SettingError(f"{name} must be a number of seconds, got {value!r}") from None
    if seconds < 0:
        raise SettingError(f"{name} must not be negative, got {seconds}")
    return seconds
