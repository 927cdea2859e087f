"""``--processes N``: the worker's main process supervises N task processes.

Prefork's shape: Celery's consumer, remote control, acks and events stay in the
main process; each child (:mod:`celery_anyio.child`) runs its own event loop and
root task group, stores results itself, and reports back what Celery's
``Request`` callbacks are called with, which then run here, on the consumer's
thread, as under prefork.

The main process holds the queue: a job goes to the child with the most free
slots of its share of ``-c``, and waits here while every share is taken, so no
child sits idle while another has a queue, and ``-c`` bounds the whole worker.

A child that dies is replaced; its running jobs fail with ``WorkerLostError``
(Celery's ``Request`` then rejects ``reject_on_worker_lost`` tasks back to the
queue), jobs it had not started go to another child.  ``--max-tasks-per-child``
and ``--max-memory-per-child`` retire a child gracefully: it takes no new job,
finishes its own and exits, and a fresh one takes its share at once.

Children are forked from the main process, which runs no thread of this pool
(with kombu's hub, everything here runs on the consumer's thread; without one,
a reader thread is started after the children).  I/O on the sockets never
blocks the consumer: writes that do not fit wait in the hub's writer.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import os
import select
import signal
import socket
import threading
from collections import deque
from collections.abc import Callable
from time import monotonic
from typing import Any

import billiard
from billiard.common import human_status
from billiard.einfo import ExceptionInfo
from celery.exceptions import WorkerLostError
from celery.worker import state as worker_state

from .child import run_child, target_name
from .ipc import READ_SIZE, Frames, frame
from .jobs import Job
from .settings import PoolSettings

logger = logging.getLogger(__name__)

READY_TIMEOUT_SECONDS = 60.0
CANCEL_GRACE_SECONDS = 10.0
PUMP_SECONDS = 0.2
STATS_TIMEOUT_SECONDS = 2.0


class _Child:
    """The main process's handle on one task process."""

    def __init__(self, index: int, share: int) -> None:
        self.index = index
        self.share = share
        self.process: Any = None
        self.sock: socket.socket | None = None
        # The same socket under a second file number, for the hub's writer: kombu's
        # hub polls one set of events per file number, and registering the reader's
        # number again for writing is silently ignored (a job larger than the
        # socket's buffer would then never be sent in full).
        self.wsock: socket.socket | None = None
        self.frames = Frames()
        self.outbox = bytearray()
        self.writing = False  # a writer is registered with the hub
        self.jobs: dict[int, Job] = {}  # handed over, not yet released
        self.accepted: set[int] = set()
        self.reported: set[int] = set()
        self.completed = 0
        self.assigned = 0  # jobs handed to this process in its life
        self.retiring = False
        self.ready = False
        self.gone = False
        self.pid: int | None = None
        self.stats: dict[str, Any] = {}
        self.stats_round = 0

    @property
    def free(self) -> int:
        return self.share - len(self.jobs)


class ProcessGroup:
    """Forks, feeds, watches and replaces the task processes of one worker."""

    def __init__(
        self,
        app: Any,
        settings: PoolSettings,
        processes: int,
        concurrency: int,
        hostname: str | None,
        *,
        max_tasks_per_child: int | None = None,
        max_memory_per_child: int | None = None,
        after_callbacks: Callable[[], None] = lambda: None,
    ) -> None:
        """``after_callbacks`` runs after Celery's callbacks ran for the children's
        messages (they queued acks on the hub: it wakes the hub to send them)."""
        self.app = app
        self.settings = settings
        self.hostname = hostname
        self.limit = concurrency
        self.max_tasks_per_child = max_tasks_per_child or 0
        self.max_memory_per_child = max_memory_per_child or None
        self._after_callbacks = after_callbacks
        self._children: list[_Child] = [
            _Child(index, share) for index, share in enumerate(_shares(concurrency, processes))
        ]
        self._queue: deque[Job] = deque()
        self._lock = threading.RLock()  # only contended without a hub (reader thread)
        self._hub: Any = None
        self._reader: threading.Thread | None = None
        self._stopping = False
        self._cold = False
        self._starting = False
        self._start_failure: str | None = None
        self._stats_round = 0
        self._revoked: Callable[[Job], bool] = lambda job: False
        self._handling = False  # Celery's callbacks for the children's reports are running
        #: How many jobs handed to the children run under each dedupe id.
        self._dedupe_ids: dict[str, int] = {}
        #: Redelivered jobs waiting for their first delivery, which runs in one of
        #: the children, to end (as in JobRunner._take_slot_after_first_delivery).
        self._held: dict[str, list[Job]] = {}

    # -- start ---------------------------------------------------------------------

    def start(self, revoked: Callable[[Job], bool]) -> None:
        """Fork every child and wait until each is ready for jobs."""
        self._revoked = revoked
        self._starting = True
        # A child's pages stay shared with this process only while neither writes
        # to them, and a garbage collection writes to every object it visits. The
        # heap as it is now (modules, the app, the worker) lives as long as the
        # worker: freeze it, so that no collection on either side visits it.
        gc.collect()
        gc.freeze()
        for child in self._children:
            self._fork(child)
        deadline = monotonic() + READY_TIMEOUT_SECONDS
        while True:
            # A child that exits is removed from the list: check for that first, or
            # all children failing in one pump would look like all of them ready.
            if self._start_failure:
                self.cancel()
                raise RuntimeError(self._start_failure)
            if all(child.ready for child in self._children):
                break
            if monotonic() > deadline:
                self.cancel()
                raise RuntimeError(
                    f"celery_anyio: task processes not ready in {READY_TIMEOUT_SECONDS}s"
                )
            self._pump(PUMP_SECONDS)
        self._starting = False

    def _fork(self, child: _Child) -> None:
        ours, theirs = socket.socketpair()
        siblings = [
            sock
            for c in self._children
            if c is not child
            for sock in (c.sock, c.wsock)
            if sock is not None
        ]
        context = billiard.get_context("fork")
        process = context.Process(  # type: ignore[attr-defined]  # billiard-stubs: BaseContext
            target=_child_entry,
            args=(
                self.app,
                self.hostname,
                theirs,
                [ours, *siblings],
                self.settings,
                child.share,
                self.max_memory_per_child,
            ),
            name=f"celery-anyio-{child.index}",
            daemon=True,
        )
        process.start()
        theirs.close()
        ours.setblocking(False)
        child.process, child.sock, child.wsock, child.pid = process, ours, ours.dup(), process.pid
        child.frames, child.outbox, child.writing = Frames(), bytearray(), False
        child.ready = child.gone = child.retiring = False
        child.completed = child.assigned = 0
        child.jobs, child.accepted, child.reported = {}, set(), set()
        if self._hub is not None:
            self._hub.add_reader(ours.fileno(), self._on_readable, child)

    # -- I/O -------------------------------------------------------------------------

    def register(self, hub: Any) -> None:
        """Read the children from kombu's hub, on the consumer's thread."""
        self._hub = hub
        for child in self._children:
            if child.sock is not None and not child.gone:
                hub.add_reader(child.sock.fileno(), self._on_readable, child)

    def _ensure_reader(self) -> None:
        """No hub (a transport without an event loop): read in a thread of our own."""
        if self._hub is None and self._reader is None:
            self._reader = threading.Thread(
                target=self._read_forever, name="celery-anyio-processes", daemon=True
            )
            self._reader.start()

    def _read_forever(self) -> None:
        while not self._all_gone():
            self._pump(PUMP_SECONDS)

    def _pump(self, timeout: float) -> None:
        """Read (and write) the children's sockets once, outside the hub."""
        with self._lock:
            readers = [c.sock for c in self._children if c.sock is not None and not c.gone]
            writers = [c.wsock for c in self._children if c.outbox and not c.gone and c.wsock]
            by_sock = {sock: c for c in self._children for sock in (c.sock, c.wsock)}
        if not readers:
            return
        try:
            readable, writable, _ = select.select(readers, writers, [], timeout)
        except (OSError, ValueError):  # a socket closed under us: the next pump sees it
            return
        for sock in writable:
            self._on_writable(by_sock[sock])
        for sock in readable:
            self._on_readable(by_sock[sock])

    def _on_readable(self, child: _Child) -> None:
        with self._lock:
            if child.gone or child.sock is None:
                return
            try:
                data = child.sock.recv(READ_SIZE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._child_gone(child)
                return
            self._handle_all(child, data)
        self._after_callbacks()

    def take_reports(self) -> None:
        """Handle what the children have reported so far, without waiting.

        The consumer calls this before it hands over each new message: under load
        the hub reads a long batch of messages before it polls the children's
        sockets again, and the acks of jobs that ended meanwhile would wait for
        it.  An ended child is left to the hub's reader.
        """
        if self._hub is None:
            return  # the reader thread reads as soon as anything comes
        with self._lock:
            if self._handling:
                return  # called from inside a callback: the reports are being handled
            for child in list(self._children):
                if child.gone or child.sock is None:
                    continue
                try:
                    data = child.sock.recv(READ_SIZE)
                except OSError:  # BlockingIOError: nothing yet
                    continue
                self._handle_all(child, data)

    def _handle_all(self, child: _Child, data: bytes) -> None:
        """Handle every whole message in ``data``; Celery's callbacks run here."""
        self._handling = True
        try:
            for message in child.frames.feed(data):
                self._handle(child, message)
        finally:
            self._handling = False

    def _on_writable(self, child: _Child) -> None:
        with self._lock:
            self._flush_outbox(child)

    def _send(self, child: _Child, *message: Any) -> None:
        if child.gone or child.sock is None:
            return
        child.outbox += frame(message)
        self._flush_outbox(child)

    def _flush_outbox(self, child: _Child) -> None:
        sock = child.wsock
        if sock is None or child.gone or not child.outbox:
            return
        try:
            sent = sock.send(child.outbox)
        except BlockingIOError:
            sent = 0
        except OSError:
            return  # the child is gone: its reader sees that
        del child.outbox[:sent]
        hub = self._hub
        if hub is None:
            return
        if child.outbox and not child.writing:
            child.writing = True
            hub.add_writer(sock.fileno(), self._on_writable, child)
        elif not child.outbox and child.writing:
            child.writing = False
            hub.remove_writer(sock.fileno())

    # -- jobs -------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        target_name(job.target)  # only Celery's tracers can cross
        with self._lock:
            if self._stopping:
                raise RuntimeError("celery_anyio: the worker is stopping")
            self._ensure_reader()
            self._queue.append(job)
            self._dispatch()

    def _dispatch(self) -> None:
        while self._queue and self._outstanding() < self.limit:
            child = self._pick()
            if child is None:
                return
            job = self._queue.popleft()
            if job.stop_reason is not None or self._revoked(job):
                continue
            dedupe_id = job.dedupe_id
            if dedupe_id is not None:
                if job.redelivered and dedupe_id in self._dedupe_ids:
                    self._held.setdefault(dedupe_id, []).append(job)
                    continue
                self._dedupe_ids[dedupe_id] = self._dedupe_ids.get(dedupe_id, 0) + 1
            child.jobs[job.id] = job
            self._send(
                child,
                "job",
                job.id,
                target_name(job.target),
                job.args,
                job.is_async,
                job.soft_timeout,
                job.timeout,
                job.correlation_id,
                # Succeeded in this worker: the child's own deduplication finds it.
                job.redelivered and job.correlation_id in worker_state.successful_requests,
            )
            child.assigned += 1
            if self.max_tasks_per_child and child.assigned >= self.max_tasks_per_child:
                # It finishes these and exits; a fresh process takes its share now.
                self._retire(child, f"it took {child.assigned} tasks (--max-tasks-per-child)")

    def _pick(self) -> _Child | None:
        open_children = [
            c for c in self._children if c.ready and not c.retiring and not c.gone and c.free > 0
        ]
        return max(open_children, key=lambda c: c.free, default=None)

    def _released(self, job: Job) -> None:
        """``job`` left its child: redelivered copies held for it may go now."""
        dedupe_id = job.dedupe_id
        if dedupe_id is None:
            return
        left = self._dedupe_ids.pop(dedupe_id) - 1
        if left:
            self._dedupe_ids[dedupe_id] = left
        else:
            self._queue.extendleft(reversed(self._held.pop(dedupe_id, [])))

    def _drop_held(self) -> int:
        dropped = sum(len(jobs) for jobs in self._held.values())
        self._held.clear()
        return dropped

    def _outstanding(self) -> int:
        return sum(len(child.jobs) for child in self._children)

    def terminate(self, job_id: int) -> None:
        with self._lock:
            for child in self._children:
                job = child.jobs.get(job_id)
                if job is not None:
                    job.stop_reason = "terminated"
                    self._send(child, "terminate", job_id)
                    return
            for job in itertools.chain(self._queue, *self._held.values()):
                if job.id == job_id:
                    job.stop_reason = "terminated"

    def flush(self) -> int:
        """Drop the jobs no child has started (the broker delivers them again)."""
        with self._lock:
            dropped = len(self._queue) + self._drop_held()
            self._queue.clear()
            for child in self._children:
                waiting = [i for i in child.jobs if i not in child.accepted]
                dropped += len(waiting)
                self._send(child, "flush")
            return dropped

    def resize(self, concurrency: int) -> None:
        with self._lock:
            self.limit = concurrency
            for child, share in zip(
                self._children, _shares(concurrency, len(self._children)), strict=True
            ):
                child.share = share
                self._send(child, "limits", share, self.settings.threads_for(share))
            self._dispatch()

    # -- what the children say ----------------------------------------------------------

    def _handle(self, child: _Child, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "stats":
            child.stats_round, child.stats = message[1], message[2]
            return
        if kind == "ready":
            child.ready = True
            child.pid = message[1]
            self._dispatch()
            return
        if kind == "retiring":
            self._retire(child, "its memory passed --max-memory-per-child")
            return
        job = child.jobs.get(message[1])
        if job is None:
            return
        if kind == "accepted":
            child.accepted.add(job.id)
            _call(job.accept_callback, job.id, message[2])
        elif kind == "done":
            self._reported(child, job)
            _call(job.callback, message[2])
        elif kind == "error":
            self._reported(child, job)
            _call(job.error_callback, message[2])
        elif kind == "timeout":
            if not message[2]:  # the hard limit: the job has ended
                self._reported(child, job)
            _call(job.timeout_callback, message[2], message[3])
        elif kind == "released":
            del child.jobs[job.id]
            self._released(job)
            child.accepted.discard(job.id)
            child.reported.discard(job.id)
            self._dispatch()

    def _reported(self, child: _Child, job: Job) -> None:
        child.reported.add(job.id)
        child.completed += 1

    def _retire(self, child: _Child, why: str) -> None:
        """No new job for ``child``; it finishes its own, exits, and is replaced."""
        if child.retiring or self._stopping:
            return
        child.retiring = True
        logger.info(
            "celery_anyio: task process %s (pid %s) retires: %s", child.index, child.pid, why
        )
        self._send(child, "stop")
        replacement = _Child(child.index, child.share)
        self._children.append(replacement)
        self._fork(replacement)

    def _child_gone(self, child: _Child) -> None:
        child.gone = True
        for sock in (child.sock, child.wsock):
            if sock is None:
                continue
            if self._hub is not None:
                with contextlib.suppress(Exception):
                    self._hub.remove(sock.fileno())
            sock.close()
        child.sock = child.wsock = None
        child.writing = False
        process = child.process
        process.join(CANCEL_GRACE_SECONDS)
        exitcode = process.exitcode
        lost = [job for job in child.jobs.values() if job.id not in child.reported]
        started = [job for job in lost if job.id in child.accepted]
        unstarted = [job for job in lost if job.id not in child.accepted]
        for job in child.jobs.values():
            self._released(job)
        child.jobs.clear()
        self._children.remove(child)
        if self._starting:  # the worker fails to start
            self._start_failure = (
                f"celery_anyio: task process {child.index} exited while starting "
                f"({human_status(exitcode)}); see its log above"
            )
            return
        if not (child.retiring or self._stopping) or lost:
            logger.error(
                "celery_anyio: task process %s (pid %s) exited with %s; %d running tasks lost%s",
                child.index,
                child.pid,
                human_status(exitcode),
                len(started),
                "" if self._stopping else ", starting a new process",
            )
        for job in started:
            _call(job.error_callback, _worker_lost(exitcode, job))
        if self._stopping:
            return
        if not child.retiring:  # a retiring child's replacement is already there
            replacement = _Child(child.index, child.share)
            self._children.append(replacement)
            self._fork(replacement)
        # Never started: another child runs them, first.
        self._queue.extendleft(reversed(unstarted))
        self._dispatch()

    # -- stop ----------------------------------------------------------------------

    def stop(self, cold: Callable[[], bool]) -> None:
        """Warm: each child finishes what it was handed and exits; cold once ``cold()``."""
        with self._lock:
            self._stopping = True
            self._queue.clear()
            self._drop_held()
            for child in self._children:
                self._send(child, "stop")
        while not self._all_gone():
            if cold() and not self._cold:
                self.cancel()
                return
            self._wait(PUMP_SECONDS)

    def cancel(self, grace: float = CANCEL_GRACE_SECONDS) -> bool:
        """Cold: every child cancels its jobs and exits; one that does not is killed."""
        with self._lock:
            self._stopping = self._cold = True
            self._queue.clear()
            self._drop_held()
            for child in self._children:
                self._send(child, "cancel")
        deadline = monotonic() + grace
        while not self._all_gone() and monotonic() < deadline:
            self._wait(PUMP_SECONDS)
        stuck = [c for c in self._children if not c.gone]
        for child in stuck:
            logger.warning(
                "celery_anyio: task process %s (pid %s) did not stop in %ss: killed",
                child.index,
                child.pid,
                grace,
            )
            with contextlib.suppress(OSError):
                os.kill(child.pid or child.process.pid, signal.SIGKILL)
        while not self._all_gone():
            self._wait(PUMP_SECONDS)
        return not stuck

    def _wait(self, timeout: float) -> None:
        if self._reader is not None:
            self._reader.join(timeout)
        else:
            self._pump(timeout)

    def _all_gone(self) -> bool:
        with self._lock:
            return all(child.gone for child in self._children)

    # -- what inspect stats shows ----------------------------------------------------

    @property
    def ready(self) -> bool:
        serving = [child for child in self._children if not child.retiring]
        return bool(serving) and all(child.ready for child in serving)

    def _refresh_stats(self, timeout: float = STATS_TIMEOUT_SECONDS) -> None:
        """Ask every child for its numbers and wait (briefly) for the answers."""
        with self._lock:
            self._stats_round += 1
            wanted = self._stats_round
            asked = [c for c in self._children if c.ready and not c.gone]
            for child in asked:
                self._send(child, "stats", wanted)
        deadline = monotonic() + timeout
        while any(c.stats_round < wanted and not c.gone for c in asked):
            left = deadline - monotonic()
            if left <= 0:
                return
            if self._reader is not None:
                self._reader.join(min(left, 0.01))
            else:
                self._pump(min(left, PUMP_SECONDS))

    def info(self) -> dict[str, Any]:
        self._refresh_stats()
        with self._lock:
            live = [c for c in self._children if not c.gone]
            stats = [c.stats for c in live if c.stats]
            lags = [s.get("loop-lag-ms") or {} for s in stats]
            return {
                "backend": self.settings.backend,
                "loop": next((s.get("loop") for s in stats), None),
                "running": sum(len(c.accepted - c.reported) for c in live),
                "queued": len(self._queue) + sum(len(c.jobs) - len(c.accepted) for c in live),
                "threads": sum(self.settings.threads_for(c.share) for c in live),
                "result-threads": self.settings.result_threads * len(live),
                "processes": [c.pid for c in live if c.pid is not None],
                "max-tasks-per-child": self.max_tasks_per_child or "N/A",
                "max-memory-per-child": self.max_memory_per_child or "N/A",
                "loop-lag-ms": {
                    key: max((float(lag.get(key, 0.0)) for lag in lags), default=0.0)
                    for key in ("last", "p50", "p99", "max")
                },
                "children": [
                    {
                        "pid": c.pid,
                        "share": c.share,
                        "jobs": len(c.jobs),
                        "completed": c.completed,
                        "retiring": c.retiring,
                        "loop-lag-ms": (c.stats or {}).get("loop-lag-ms"),
                        "start-pacing": (c.stats or {}).get("start-pacing"),
                    }
                    for c in live
                ],
            }


def _child_entry(*args: Any) -> None:
    """billiard's process target: the child's life, then its exit code."""
    # Everything inherited, out of reach of the child's collections (a replacement
    # is forked from a main process whose heap is not frozen).
    gc.freeze()
    raise SystemExit(run_child(*args))


def _shares(concurrency: int, processes: int) -> list[int]:
    """``-c`` split over the processes as evenly as it goes, each at least 1."""
    base, extra = divmod(max(concurrency, processes), processes)
    return [base + (1 if index < extra else 0) for index in range(processes)]


def _worker_lost(exitcode: int | None, job: Job) -> ExceptionInfo:
    """What prefork reports for a job whose process died under it."""
    try:
        status = human_status(exitcode)  # type: ignore[arg-type]  # celery-types: None is fine
        raise WorkerLostError(f"Worker exited prematurely: {status} Job: {job.id}.")
    except WorkerLostError:
        return ExceptionInfo()


def _call(callback: Callable[..., Any] | None, *args: Any) -> None:
    if callback is None:
        return
    try:
        callback(*args)
    except Exception:
        logger.exception("celery_anyio: %r failed", callback)
