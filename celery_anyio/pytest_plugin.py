"""pytest fixtures that run an embedded worker on this pool, on asyncio and trio.

Installed as a ``pytest11`` plugin: the fixtures exist in every test session of
an environment with celery-anyio and do nothing until a test asks for one.

* ``celery_anyio_worker`` starts a worker for the app of your ``celery_app``
  fixture (yours, or ``celery.contrib.pytest``'s) and stops it after the test;
* ``celery_anyio_backend`` is the AnyIO backend of that worker, ``"asyncio"`` then
  ``"trio"``, so every test using the worker runs on both;
* ``celery_anyio_worker_parameters`` holds further worker options.

The worker is Celery's own embedded test worker
(:func:`celery.contrib.testing.worker.start_worker`: a ``WorkController`` in a
thread of the test process) with ``pool=celery_anyio.Pool``; see
:func:`start_anyio_worker` for the few things changed around it, and
``docs/testing.md``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import Any, cast

import pytest
from celery import _state
from celery.contrib.testing.worker import TestWorkController, start_worker
from celery.worker import state as worker_state
from kombu.utils.url import maybe_sanitize_url

from . import _backends
from . import settings as pool_settings

__all__ = ["WorkerStartError", "start_anyio_worker"]

DEFAULT_CONCURRENCY = 10
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
DEFAULT_STARTUP_TIMEOUT = 30.0
# kombu's in-memory transport polls its queues once a second by default.
MEMORY_POLLING_INTERVAL = 0.01


class WorkerStartError(RuntimeError):
    """The embedded worker never got to consume tasks."""


# -- fixtures ------------------------------------------------------------------


@pytest.fixture(params=_backends.BACKENDS)
def celery_anyio_backend(request: pytest.FixtureRequest) -> str:
    """The worker's AnyIO backend; each test using the worker runs once per backend.

    Override it to pin one backend: ``return "trio"``.
    """
    return str(request.param)


@pytest.fixture(scope="session")
def celery_anyio_worker_parameters() -> Mapping[str, Any]:
    """Override to pass options to the worker, e.g. ``{"concurrency": 100}``.

    Any argument of :func:`start_anyio_worker`: ``concurrency``, ``queues``,
    ``loglevel``, ``shutdown_timeout``, ``perform_ping_check``, ...
    """
    return {}


@pytest.fixture
def celery_anyio_worker(
    celery_app: Any,
    celery_anyio_backend: str,
    celery_anyio_worker_parameters: Mapping[str, Any],
) -> Iterator[Any]:
    """An embedded worker for ``celery_app`` on this pool, stopped after the test."""
    with start_anyio_worker(
        celery_app, anyio_backend=celery_anyio_backend, **celery_anyio_worker_parameters
    ) as worker:
        yield worker


# -- the worker ----------------------------------------------------------------


@contextlib.contextmanager
def start_anyio_worker(
    app: Any,
    anyio_backend: str = "asyncio",
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
    **kwargs: Any,
) -> Iterator[Any]:
    """Run Celery's embedded test worker for ``app`` on ``celery_anyio.Pool``.

    Other keyword arguments go to :func:`celery.contrib.testing.worker.start_worker`
    and the ``WorkController``.  Around it, this:

    * sets ``worker_anyio_backend`` (and, while the worker runs,
      ``worker_hijack_root_logger = False`` so pytest's log handlers stay; a
      10 ms ``polling_interval`` for ``memory://`` unless you set one) and puts
      back the app's settings, the current and default app and the root
      logger's level afterwards;
    * pings the worker only if ``celery.ping`` is registered, and checks the
      app's broker at start, not ``$TEST_BROKER``;
    * raises :class:`WorkerStartError` when the worker cannot start, where
      ``start_worker`` alone would wait forever for a pool that failed in the
      worker's thread;
    * wakes the worker to stop at once: ``start_worker`` only sets a flag, which
      the consumer sees after its next poll (up to 10 s on RabbitMQ, 4 s on
      ``memory://``).  The stop is still Celery's cold one: tasks still running
      are cancelled and report nothing.
    """
    if "pool" in kwargs:
        raise TypeError("start_anyio_worker always runs celery_anyio.Pool")
    from .pool import Pool

    app.finalize()
    if app.conf.task_always_eager:
        raise WorkerStartError(
            f"app {app.main!r} has task_always_eager set: tasks would run in the caller "
            "and never reach the worker"
        )
    kwargs.setdefault("perform_ping_check", "celery.ping" in app.tasks)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_app_state_restored())
        stack.enter_context(_root_logger_level_restored())
        stack.enter_context(_settings(app.conf, _worker_settings(app, anyio_backend)))
        # After start_worker's own stop, which leaves it set if the join timed out.
        stack.callback(_clear_stop_flag)
        try:
            with _environ_without("TEST_BROKER"):  # start_worker would check that broker
                worker = stack.enter_context(
                    start_worker(
                        app,
                        pool=Pool,  # type: ignore[arg-type]  # celery-types: a name or a class
                        concurrency=concurrency,
                        shutdown_timeout=shutdown_timeout,
                        WorkController=_WorkController,
                        startup_timeout=startup_timeout,
                        **kwargs,
                    )
                )
        except Exception as exc:
            raise WorkerStartError(
                f"the celery_anyio worker for app {app.main!r} on {anyio_backend!r} "
                f"(broker {_broker_uri(app)}) did not start: {exc!r}"
            ) from exc
        stack.callback(_wake_for_stop, app, cast("_WorkController", worker))
        yield worker


class _WorkController(TestWorkController):
    """Celery's test worker, failing instead of waiting forever to be ready."""

    # Set by Celery's WorkController and TestWorkController; not in celery-types.
    hostname: str
    _on_started: threading.Event

    def __init__(
        self, *args: Any, startup_timeout: float = DEFAULT_STARTUP_TIMEOUT, **kwargs: Any
    ) -> None:
        self.startup_timeout = startup_timeout
        self.ready = False
        self.start_error: BaseException | None = None
        self.thread: threading.Thread | None = None
        super().__init__(*args, **kwargs)

    def start(self) -> None:
        self.thread = threading.current_thread()
        try:
            super().start()
        finally:
            self._on_started.set()  # ensure_started: this worker will never be ready

    def on_consumer_ready(self, consumer: Any) -> None:
        self.ready = True
        super().on_consumer_ready(consumer)

    def stop(self, in_sighandler: bool = False, exitcode: int | None = None) -> None:
        # WorkController.start() logs a failing bootstep (e.g. our pool's on_start)
        # and calls stop() from its ``except`` block: the error is still current.
        if not self.ready and self.start_error is None:
            self.start_error = sys.exc_info()[1]
        super().stop(in_sighandler=in_sighandler, exitcode=exitcode)

    def ensure_started(self) -> None:
        if not self._on_started.wait(self.startup_timeout):
            self._abandon()
            raise TimeoutError(f"the worker was not ready after {self.startup_timeout}s")
        if not self.ready:
            if isinstance(self.start_error, Exception):
                raise self.start_error
            # No error, or SystemExit/KeyboardInterrupt: not for the test process.
            raise RuntimeError(f"the worker stopped before it was ready ({self.start_error!r})")

    def _abandon(self) -> None:
        worker_state.should_terminate = 0  # type: ignore[assignment]  # celery-types: None only
        if self.thread is not None:
            self.thread.join(DEFAULT_SHUTDOWN_TIMEOUT)
        worker_state.should_terminate = None


def _wake_for_stop(app: Any, worker: _WorkController) -> None:
    """Make the consumer see the stop now, not after its next poll times out.

    A ``shutdown`` broadcast to this worker's node name arrives on the consumer's
    own connection, so it wakes any transport's loop and raises ``WorkerShutdown``
    in the worker's thread at once.  ``should_terminate`` (what ``start_worker``
    sets next anyway) makes the pool cancel running tasks, not wait for them.
    """
    worker_state.should_terminate = 0  # type: ignore[assignment]  # celery-types: None only
    if worker.thread is None or not worker.thread.is_alive():
        return
    if not app.conf.worker_enable_remote_control:
        return
    with contextlib.suppress(Exception):  # then the stop takes one poll longer
        app.control.shutdown(destination=[worker.hostname])


def _clear_stop_flag() -> None:
    worker_state.should_terminate = None


def _worker_settings(app: Any, anyio_backend: str) -> dict[str, Any]:
    conf = app.conf
    settings: dict[str, Any] = {pool_settings.BACKEND: anyio_backend}
    if conf.worker_hijack_root_logger:
        settings["worker_hijack_root_logger"] = False
    transport_options = dict(conf.broker_transport_options or {})
    if "polling_interval" not in transport_options and _transport(app) == "memory":
        transport_options["polling_interval"] = MEMORY_POLLING_INTERVAL
        settings["broker_transport_options"] = transport_options
    return settings


def _transport(app: Any) -> str:
    with app.connection_for_read() as conn:  # parses the URL, does not connect
        return str(conn.transport_cls)


def _broker_uri(app: Any) -> str:
    url = app.conf.broker_url
    if not isinstance(url, str):
        with app.connection_for_write() as conn:
            url = conn.as_uri()
    return str(maybe_sanitize_url(url))


@contextlib.contextmanager
def _settings(conf: Any, values: Mapping[str, Any]) -> Iterator[None]:
    saved = {key: conf.get(key) for key in values}
    conf.update(values)
    try:
        yield
    finally:
        conf.update(saved)


@contextlib.contextmanager
def _app_state_restored() -> Iterator[None]:
    """``start_worker`` makes the app current and default: undo that after."""
    # Private parts of celery._state: not in celery-types.
    default_app, current_app = _state.default_app, _state._tls.current_app  # type: ignore[attr-defined]
    try:
        yield
    finally:
        _state.set_default_app(default_app)
        _state._set_current_app(current_app)  # type: ignore[attr-defined]  # private: no stub


@contextlib.contextmanager
def _root_logger_level_restored() -> Iterator[None]:
    """The worker sets the root logger to its loglevel (ERROR): not for later tests."""
    root = logging.getLogger()
    level = root.level
    try:
        yield
    finally:
        root.setLevel(level)


@contextlib.contextmanager
def _environ_without(name: str) -> Iterator[None]:
    value = os.environ.pop(name, None)
    try:
        yield
    finally:
        if value is not None:
            os.environ[name] = value
