"""One AnyIO event loop in its own thread, around a root task group.

The consumer thread hands work over with :meth:`LoopThread.spawn`, which only
appends to a deque and, when the loop is not already due to look, schedules one
wake-up: it never waits for the loop.  The loop's main task drains the deque
into the root task group, so every job is a child of that one nursery.  An
optional ``admit`` coroutine runs before each spawn, in arrival order: the
pool's concurrency limit waits there, so jobs start in the order Celery handed
them over and only admitted jobs exist as tasks.
Services (the lag monitor) run in an enclosing task group, from before the
first job until after the last, and the worker lifespan encloses them all.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import TaskGroup

from . import _backends

logger = logging.getLogger(__name__)

Spawnable = Callable[..., Coroutine[Any, Any, Any]]


class LoopThread:
    """Owns the loop thread, its root task group, and the hand-over queue."""

    def __init__(
        self,
        backend: str,
        backend_options: dict[str, Any] | None = None,
        *,
        on_loop_start: Callable[[], None] | None = None,
        services: Sequence[Spawnable] = (),
        admit: Spawnable | None = None,
        lifespan: Callable[[], AbstractAsyncContextManager[Any]] | None = None,
        name: str = "celery-anyio-loop",
    ) -> None:
        self.backend = backend
        self._backend = _backends.load(backend)
        self._run_options = self._backend.run_options(backend_options or {})
        self._on_loop_start = on_loop_start
        self._services = tuple(services)
        self._admit = admit
        self._lifespan = lifespan
        self._name = name
        self._inbox: deque[tuple[Spawnable, tuple[Any, ...]]] = deque()
        self._wake_pending = False
        self._stop_requested = False
        self._started = threading.Event()
        self._finished = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._call_soon: Callable[[Callable[[], object]], None] | None = None
        self._root: TaskGroup | None = None
        self._wakeup: anyio.Event | None = None

    # -- life cycle (any thread) ----------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start the loop thread and wait until it accepts work."""
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise RuntimeError(f"the {self.backend} event loop did not start")
        if self._error is not None:
            raise RuntimeError(
                f"the {self.backend} event loop failed to start: {self._error!r}"
            ) from self._error

    @property
    def running(self) -> bool:
        return self._started.is_set() and not self._finished.is_set()

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def call_soon(self, callback: Callable[[], object]) -> None:
        """Run ``callback()`` on the loop thread; runs it at once if already there."""
        if self.in_loop_thread():
            callback()
        elif self._call_soon is not None and self.running:
            try:
                self._call_soon(callback)
            except RuntimeError:  # the loop closed between the check and the call
                logger.debug("loop gone; dropped %r", callback)

    def spawn(self, func: Spawnable, *args: Any) -> None:
        """Start ``func(*args)`` in the root task group, without waiting."""
        self._inbox.append((func, args))
        if not self._wake_pending:
            self._wake_pending = True
            self.call_soon(self._wake)

    def stop(self) -> None:
        """Take no more work; the thread ends once every spawned task has ended."""
        self._stop_requested = True
        self.call_soon(self._wake)

    def cancel(self) -> None:
        """Cancel every task in the root task group, then end the thread."""
        self._stop_requested = True
        self.call_soon(self._cancel_root)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the loop thread to end; True if it did."""
        return self._finished.wait(timeout)

    # -- loop thread -----------------------------------------------------------

    def _run(self) -> None:
        try:
            anyio.run(self._main, backend=self.backend, backend_options=self._run_options)
        except BaseException as exc:
            self._error = exc
            if self._started.is_set():
                logger.critical("celery_anyio event loop crashed", exc_info=True)
        finally:
            self._finished.set()
            self._started.set()

    async def _main(self) -> None:
        self._call_soon = self._backend.current_call_soon_threadsafe()
        self._wakeup = anyio.Event()
        if self._on_loop_start is not None:
            self._on_loop_start()
        async with self._enter_lifespan(), anyio.create_task_group() as services:
            for service in self._services:
                services.start_soon(service)
            async with anyio.create_task_group() as root:
                self._root = root
                self._started.set()
                while True:
                    await self._drain(root)
                    if self._stop_requested:
                        break
                    await self._wakeup.wait()
                    self._wakeup = anyio.Event()
                await self._drain(root)
            services.cancel_scope.cancel()  # services live as long as the jobs

    def _enter_lifespan(self) -> AbstractAsyncContextManager[Any]:
        if self._lifespan is None:
            return nullcontext()
        return _LifespanEntry(self._lifespan())

    async def _drain(self, root: TaskGroup) -> None:
        inbox = self._inbox
        admit = self._admit
        while inbox:
            func, args = inbox.popleft()
            if admit is not None:
                await admit(*args)  # in arrival order: trio starts tasks in random order
            root.start_soon(func, *args)

    def _wake(self) -> None:
        self._wake_pending = False
        if self._wakeup is not None:
            self._wakeup.set()

    def _cancel_root(self) -> None:
        self._inbox.clear()
        if self._root is not None:
            self._root.cancel_scope.cancel()
        self._wake()


class _LifespanEntry:
    """The user's lifespan, with a clear error if it fails to enter."""

    def __init__(self, manager: AbstractAsyncContextManager[Any]) -> None:
        self._manager = manager

    async def __aenter__(self) -> Any:
        try:
            return await self._manager.__aenter__()
        except Exception as exc:
            raise RuntimeError(f"the worker lifespan failed to start: {exc!r}") from exc

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        return await self._manager.__aexit__(exc_type, exc, tb)
