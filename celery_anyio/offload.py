"""Run the result backend's blocking writes in worker threads, off the loop.

Celery's tracer stores every task's state itself (``backend.store_result``,
``on_chord_part_return``; ``get_task_meta`` for a redelivered task under
``worker_deduplicate_successful_tasks``), and for an async task it runs in a
bridge greenlet on the loop thread: a Redis result backend costs two round trips
there per task (a GET, then SET and PUBLISH), a database backend a transaction
(and Django's ORM refuses to run on a thread with a running event loop), and the
whole loop waits for each.  Wrapping those methods on the backends the tracer uses sends
each call made from a bridge greenlet to :class:`BlockingCallThreads`, and the
greenlet waits there while other tasks run.  Called from anywhere else (a sync
task's thread, the consumer), the methods run as before.  The wait is not
cancellable, like Celery's own: a task whose hard limit fires during the store
still has its state stored.

``anyio.to_thread.run_sync`` would do, but costs 110-160 µs of CPU per call here
(a thread wake-up and a loop wake-up each time); these threads take calls from
one queue and wake the loop once per batch of finished calls.
"""

from __future__ import annotations

import contextvars
import queue
import threading
from collections import deque
from collections.abc import Callable
from functools import partial, wraps
from typing import Any

import anyio
import outcome

from . import bridge
from ._backends import BackendModule

BLOCKING_METHODS = ("store_result", "on_chord_part_return", "get_task_meta")
_MARK = "__celery_anyio_offloaded__"


class _Call:
    """One blocking call handed to the threads, and its outcome once it ran."""

    __slots__ = ("context", "done", "func", "outcome")

    def __init__(self, func: Callable[[], Any]) -> None:
        self.func = func
        self.context = contextvars.copy_context()  # the job's identity, for current_task
        self.done = anyio.Event()
        self.outcome: outcome.Outcome[Any] | None = None

    def run(self) -> None:
        self.outcome = self.context.run(outcome.capture, self.func)


class BlockingCallThreads:
    """A few daemon threads running blocking calls for the loop's tasks.

    :meth:`serve` is a loop service: it starts the threads and stops them when
    cancelled (after the last job).  While it is not serving, :meth:`call`
    runs the function in the caller's thread.
    """

    def __init__(
        self,
        threads: int,
        backend: BackendModule,
        name: str,
        after_call: Callable[[], None] | None = None,
    ) -> None:
        """``after_call`` runs in the thread after each call (Django's connection care)."""
        self.threads = max(1, threads)
        self._after_call = after_call
        self._backend = backend
        self._name = name
        self._work: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._finished: deque[_Call] = deque()
        self._wake_pending = False
        self._call_soon: Callable[[Callable[[], object]], None] | None = None

    @property
    def serving(self) -> bool:
        return self._call_soon is not None

    async def serve(self) -> None:
        self._call_soon = self._backend.current_call_soon_threadsafe()
        for number in range(self.threads):
            threading.Thread(
                target=self._work_loop, name=f"{self._name}-{number}", daemon=True
            ).start()
        try:
            await anyio.sleep_forever()
        finally:
            self._call_soon = None
            for _ in range(self.threads):
                self._work.put(None)

    async def call(self, func: Callable[[], Any]) -> Any:
        """Run ``func()`` in one of the threads; not cancellable."""
        if self._call_soon is None:
            return func()
        call = _Call(func)
        self._work.put(call)
        with anyio.CancelScope(shield=True):
            await call.done.wait()
        result, call.outcome = call.outcome, None
        assert result is not None
        return result.unwrap()

    def _work_loop(self) -> None:
        work = self._work
        after_call = self._after_call
        while (call := work.get()) is not None:
            call.run()
            if after_call is not None:
                after_call()
            self._finished.append(call)
            if not self._wake_pending:
                self._wake_pending = True
                call_soon = self._call_soon
                if call_soon is not None:
                    try:
                        call_soon(self._wake_callers)
                    except RuntimeError:  # the loop closed: nobody is waiting any more
                        return

    def _wake_callers(self) -> None:
        """On the loop: wake every caller whose call has finished."""
        self._wake_pending = False  # before draining: a later finish schedules again
        finished = self._finished
        while finished:
            finished.popleft().done.set()


def offload_backend(backend: Any, threads: BlockingCallThreads) -> bool:
    """Wrap ``backend``'s blocking methods; False if it was wrapped already."""
    if backend is None or getattr(backend, _MARK, False):
        return False
    for name in BLOCKING_METHODS:
        method = getattr(backend, name, None)
        if method is not None:
            setattr(backend, name, _offloaded(method, threads))
    setattr(backend, _MARK, True)
    return True


def offload_app_backends(app: Any, threads: BlockingCallThreads) -> None:
    """The backend the calling thread's tracers use, and every task's own one."""
    offload_backend(app.backend, threads)
    for task in list(app.tasks.values()):
        own = getattr(task, "_backend", None)
        if own is not None:
            offload_backend(own, threads)


def _offloaded(method: Callable[..., Any], threads: BlockingCallThreads) -> Callable[..., Any]:
    @wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        if not (threads.serving and bridge.in_bridge()):
            return method(*args, **kwargs)
        return bridge.await_(threads.call(partial(method, *args, **kwargs)), as_body=False)

    return call
