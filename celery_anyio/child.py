"""A task process of a ``--processes N`` worker: one loop, one root task group.

The main process forks it (before it starts any thread of its own) and hands
it jobs over a socket; the child runs them exactly as a single-process worker
does (:class:`~celery_anyio.runtime.TaskRuntime`) and sends back what Celery's
``Request`` callbacks would have been called with.  Results are stored here, by
Celery's tracer, as in a prefork child.  The child starts and ends the way a
prefork child does (Celery's ``process_initializer``/``process_destructor``:
signals, logging, tracers, ``worker_process_init``/``worker_process_shutdown``).

Messages from the main process: ``job``, ``terminate``, ``limits``, ``flush``,
``stop`` (finish what was handed over, then exit) and ``cancel`` (cold).
Messages to it: ``ready``, ``accepted``, ``done``, ``error``, ``timeout``,
``released`` (the job gave its slot back, however it ended), ``stats`` and
``retiring`` (``--max-memory-per-child`` reached).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import sys
from collections.abc import Callable, Iterable
from typing import Any

from billiard.compat import mem_rss
from billiard.einfo import ExceptionInfo
from celery.app import trace as celery_trace
from celery.concurrency.prefork import process_destructor, process_initializer
from celery.worker import state as worker_state

from .ipc import READ_SIZE, BlockingSender, Frames
from .jobs import Job
from .runtime import TaskRuntime
from .settings import PoolSettings

logger = logging.getLogger(__name__)

TARGETS: dict[str, Callable[..., Any]] = {
    "fast_trace_task": celery_trace.fast_trace_task,
    "trace_task_ret": celery_trace.trace_task_ret,
}
POLL_SECONDS = 1.0
CANCEL_GRACE_SECONDS = 10.0


def target_name(target: Any) -> str:
    """How the main process names a tracer to a child."""
    for name, known in TARGETS.items():
        if target is known:
            return name
    raise TypeError(f"celery_anyio task processes run Celery's tracers only, not {target!r}")


def run_child(
    app: Any,
    hostname: str | None,
    sock: socket.socket,
    siblings: Iterable[socket.socket],
    settings: PoolSettings,
    concurrency: int,
    max_memory_per_child: int | None,
) -> int:
    """The child's whole life; returns its exit code."""
    for other in siblings:  # the main process's ends of the other children's sockets
        other.close()
    process_initializer(app, hostname)  # type: ignore[arg-type]  # celery-types: None is fine
    child = _Child(app, sock, settings, concurrency, max_memory_per_child)
    exitcode = 0
    try:
        child.serve()
    except BaseException:
        logger.exception("celery_anyio: task process %d failed", os.getpid())
        exitcode = 1
    process_destructor(os.getpid(), exitcode)
    return exitcode


class _Child:
    def __init__(
        self,
        app: Any,
        sock: socket.socket,
        settings: PoolSettings,
        concurrency: int,
        max_memory_per_child: int | None,
    ) -> None:
        self.app = app
        self.sock = sock
        self.link = BlockingSender(sock, picklable=_picklable)
        self.max_memory = max_memory_per_child or 0
        self.retiring = False
        self.runtime = TaskRuntime(app, settings, concurrency, on_released=self._released)
        self._stopping = False
        self._cold = False

    def serve(self) -> None:
        self.runtime.start()
        self.link.send("ready", os.getpid())
        frames = Frames()
        loop = self.runtime.loop
        assert loop is not None
        while loop.running:
            readable, _, _ = select.select([self.sock], [], [], POLL_SECONDS)
            if readable:
                data = self.sock.recv(READ_SIZE)
                if not data:  # the main process is gone: nothing can be reported
                    self._cold = True
                    self.runtime.runner.cancel_all()
                    break
                for message in frames.feed(data):
                    self._handle(message)
        if self._cold:
            self.runtime.cancel(CANCEL_GRACE_SECONDS)
        else:
            self.runtime.stop()

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "job":
            self._job(*message[1:])
        elif kind == "terminate":
            self.runtime.runner.terminate(message[1])
        elif kind == "limits":
            self.runtime.runner.resize(message[1], message[2])
        elif kind == "stats":
            self.link.send("stats", message[1], self.runtime.info())
        elif kind == "flush":
            self.runtime.runner.flush()
        elif kind == "stop":
            self._stop()
        elif kind == "cancel":
            self._cold = True
            self.runtime.runner.cancel_all()
        else:
            logger.error("celery_anyio: task process got an unknown message %r", kind)

    def _stop(self) -> None:
        if not self._stopping and self.runtime.loop is not None:
            self._stopping = True
            self.runtime.loop.stop()

    def _job(
        self,
        job_id: int,
        target: str,
        args: tuple[Any, ...],
        is_async: bool,
        soft_timeout: float | None,
        timeout: float | None,
        correlation_id: str | None,
        succeeded_here: bool,
    ) -> None:
        kwargs = {"app": self.app} if target == "trace_task_ret" else {}
        if succeeded_here:  # a redelivered message the main process saw succeed
            worker_state.successful_requests.add(correlation_id)
        args = _with_shared_keys(args)
        send = self.link.send
        job = Job(
            target=TARGETS[target],
            args=args,
            kwargs=kwargs,
            is_async=is_async,
            accept_callback=lambda _, started: send("accepted", job_id, started),
            callback=lambda result: send("done", job_id, result),
            error_callback=lambda einfo: send("error", job_id, einfo),
            timeout_callback=lambda soft, seconds: send("timeout", job_id, soft, seconds),
            soft_timeout=soft_timeout,
            timeout=timeout,
            correlation_id=correlation_id,
            id=job_id,
        )
        self.runtime.runner.submit(job)

    def _released(self, job: Job) -> None:
        self.link.send("released", job.id)
        if self.max_memory and not self.retiring and mem_rss() > self.max_memory:
            self.retiring = True
            logger.warning(
                "celery_anyio: task process %d uses more than %d KiB "
                "(--max-memory-per-child): it takes no more tasks, finishes its own and "
                "is replaced",
                os.getpid(),
                self.max_memory,
            )
            self.link.send("retiring")


def _with_shared_keys(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The tracer's arguments, the request's keys shared with every other job's.

    Unpickling makes new strings for the ~30 keys of each job's request dict (and
    of Celery's dicts in it: ``delivery_info``, ...), which a job keeps for as
    long as it runs: interned, all jobs of the process hold one copy of each.
    The task's own ``kwargs`` are passed as they are: they are the caller's data,
    of any size and depth.
    """
    if len(args) > 2 and type(args[2]) is dict:
        name = sys.intern(args[0]) if type(args[0]) is str else args[0]
        request = {
            _interned(key): (
                {_interned(k): v for k, v in value.items()}
                if type(value) is dict and key != "kwargs"
                else value
            )
            for key, value in args[2].items()
        }
        return (name, args[1], request, *args[3:])
    return args


def _interned(key: Any) -> Any:
    return sys.intern(key) if type(key) is str else key


def _picklable(message: tuple[Any, ...]) -> tuple[Any, ...]:
    """``message`` with each task exception in it made picklable, as prefork's are."""
    return tuple(_picklable_part(part) for part in message)


def _picklable_part(part: Any) -> Any:
    if isinstance(part, tuple):
        return tuple(_picklable_part(item) for item in part)
    if isinstance(part, ExceptionInfo):
        from celery.utils.serialization import get_pickleable_exception

        exception = getattr(part.exception, "exc", part.exception)
        try:
            raise get_pickleable_exception(exception)  # type: ignore[arg-type]  # takes any
        except BaseException:  # noqa: BLE001 - captured again, picklable this time
            safe = ExceptionInfo(internal=part.internal)
        safe.traceback = part.traceback  # the original's, as text
        return safe
    return part
