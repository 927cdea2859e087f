"""Every change celery_anyio makes to Celery's own objects: when, and each switchable.

Only the ``cli`` patch is applied when the package is imported (by the
``celery`` command's plugin entry point, so that ``celery worker`` accepts
``-P celery_anyio:Pool --backend``).  The rest is applied:

* when this pool starts, in its worker: :func:`install_worker`;
* by the pytest fixture, which starts such a worker;
* where you ask for it, in any other process (a web app, a script, tests):
  :func:`install` (eager mode and ``async def`` signal receivers for async
  tasks) and :func:`install_aio` (the async client methods).

Celery's other pools, and apps that never use this pool, run unchanged, except
for one thing: a worker started with the stock ``celery`` command wraps its
``async def`` tasks at ``worker_init`` (sync tasks are untouched), so that under
prefork, threads or solo they fail with ``WrongPoolError`` instead of
"succeeding" without running.

Set ``CELERY_ANYIO_DISABLE_PATCHES`` to a comma-separated list of these names
to switch patches off (``all`` switches off every one); an unknown name stops
the pool from starting:

``stacks``
    Key ``task.request_stack`` and ``celery._state._task_stack`` by the running
    job (see :mod:`celery_anyio.context`) instead of by thread or greenlet.
    Without it ``self.request`` and ``current_task`` mix up concurrent tasks.
``tasks``
    Wrap each ``async def`` task's ``run`` (see :mod:`celery_anyio.tasks`) so the
    tracer awaits it, eager mode runs it, and other pools fail loudly: when an app
    is finalized, when a worker starts, and in ``Task.apply`` (eager mode).
``cli``
    Teach ``celery worker`` ``-P module:Class`` and ``--backend/--anyio-backend``.
``aio``
    Add the async client methods (see :mod:`celery_anyio.aio`): ``Task.adelay``,
    ``Task.aapply_async``, ``Signature.adelay``, ``Signature.aapply_async``,
    ``Celery.asend_task``, ``AsyncResult.aget`` and ``ResultSet.aget``.  Only
    adds them: a name Celery already has is left alone.
``events``
    On Celery < 5.7 only: make the worker's event dispatcher thread-safe (one
    re-entrant lock around ``send`` and ``flush``).  The pool's callbacks send
    ``task-started``/``task-succeeded`` from the loop thread while the consumer
    thread flushes the buffer, and Celery < 5.7 clears that buffer whole, losing
    events appended meanwhile (celery#10434 for the threads pool; fixed in 5.7).
``messages``
    Reject a malformed task message with a clear error instead of letting it
    end the worker (see :mod:`celery_anyio.messages`): wraps the handler
    ``Consumer.create_task_handler`` returns, in a worker running this pool.
``acks``
    Hand the acks and rejects of this pool's jobs (``Consumer.call_soon_ack``;
    ``call_soon`` before Celery 5.7) to the pool's consumer thread, which sends
    them before it takes each new message as well as on the hub's next pass
    (see :mod:`celery_anyio.consumer_thread`).  Without it they wait for the
    hub's next pass, behind a batch of received messages.
``prefetch``
    Run ``Consumer._restore_prefetch_count_after_connection_restart``, which
    Celery chains onto the acks after a reconnect (a ``basic_qos`` on the
    consumer's channel), on the consumer's thread when it is called from
    another (see :mod:`celery_anyio.consumer_thread`).
``reconnect``
    Let the consumer reconnect when kombu's Redis transport raises
    ``AttributeError`` while Celery closes the lost connection (kombu#582):
    ``Connection.maybe_close_channel`` treats it as a connection error, and so do
    ``Message.ack_log_error``/``reject_log_error`` for a message of a closed channel.
``signals``
    Let ``async def`` receivers of Celery's signals be awaited (see
    :mod:`celery_anyio.receivers`): ``Signal._live_receivers`` hands ``send`` a
    synchronous stand-in for each of them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from celery import _state

from . import settings
from .context import make_ident_func

PATCHES = (
    "stacks",
    "tasks",
    "cli",
    "aio",
    "events",
    "messages",
    "acks",
    "prefetch",
    "reconnect",
    "signals",
)
DISABLE_ENV = "CELERY_ANYIO_DISABLE_PATCHES"


def disabled() -> frozenset[str]:
    """The patch names switched off in ``CELERY_ANYIO_DISABLE_PATCHES``."""
    names = frozenset(
        part.strip() for part in os.environ.get(DISABLE_ENV, "").split(",") if part.strip()
    )
    return frozenset(PATCHES) if "all" in names else names


def check_disabled() -> None:
    """Refuse a name in ``CELERY_ANYIO_DISABLE_PATCHES`` that names no patch."""
    raw = {part.strip() for part in os.environ.get(DISABLE_ENV, "").split(",") if part.strip()}
    unknown = sorted(raw - {*PATCHES, "all"})
    if unknown:
        raise settings.SettingError(
            f"{DISABLE_ENV}: unknown patch name(s) {', '.join(map(repr, unknown))}: "
            f"choose from {', '.join(PATCHES)} or all"
        )


def enabled(name: str) -> bool:
    if name not in PATCHES:
        raise ValueError(f"no patch is named {name!r}")
    return name not in disabled()


# -- when ----------------------------------------------------------------------


def install(app: Any = None) -> None:
    """What a process needs to run async tasks outside this pool's worker.

    Eager mode (``task.apply()``, ``task_always_eager``) runs async bodies to
    completion, for every app (and ``app``'s tasks at once); ``async def``
    receivers of Celery's signals are awaited.  Idempotent.
    """
    check_disabled()
    install_app_hooks()
    install_async_receivers()
    if app is not None:
        _prepare_for_eager(app)


def install_aio() -> None:
    """Give Celery's classes the async client methods (``await task.adelay()``, ...)."""
    check_disabled()
    install_aio_methods()


def install_worker(app: Any) -> None:
    """Everything this pool needs, in the worker that runs it (at its start)."""
    install(app)
    install_aio_methods()
    patch_request_stacks(app)
    lock_event_dispatcher()  # before the consumer creates its dispatcher
    guard_task_messages()  # before the consumer's loop builds its handler
    route_acks()  # ... and binds call_soon_ack into it
    guard_prefetch_restore()  # ... and chains the restore onto its acks
    tolerate_closing_a_lost_channel()


# -- stacks ------------------------------------------------------------------


def patch_request_stacks(app: Any) -> None:
    """Make the task stack and every task's request stack job-aware."""
    if not enabled("stacks"):
        return
    stacks: list[Any] = [_state._task_stack]  # type: ignore[attr-defined]  # private: no stub
    stacks.extend(task.request_stack for task in app.tasks.values())
    for stack in stacks:
        _patch_stack(stack)


def _patch_stack(stack: Any) -> None:
    if not isinstance(type(stack).__dict__.get("__ident_func__"), property):
        raise RuntimeError(  # noqa: TRY004 - a configuration problem, not a type error
            "celery_anyio needs Celery's LocalStack; unset USE_FAST_LOCALS "
            f"(got {type(stack).__name__})"
        )
    current = stack.__ident_func__
    if not getattr(current, "__celery_anyio__", False):
        stack.__ident_func__ = make_ident_func(current)


# -- tasks -------------------------------------------------------------------


def wrap_async_tasks(app: Any, only_new: bool = False) -> list[str]:
    """Wrap every registered ``async def`` task of ``app``; return their names.

    With ``only_new``, return only the names of tasks wrapped by this call.
    """
    from .tasks import is_async_task, wrap_run

    if not enabled("tasks"):
        return []
    names = []
    for name, task in app.tasks.items():
        if is_async_task(task) and (wrap_run(task) or not only_new):
            names.append(name)
    return names


def install_app_hooks() -> None:
    """Wrap async tasks of every app once it is finalized, and before any eager run."""
    if not enabled("tasks"):
        return
    for app in list(_state._get_active_apps()):  # type: ignore[attr-defined]  # private: no stub
        if app.finalized:
            _prepare_for_eager(app)
        else:
            _wrap_after_finalize(app)
    # Called inside app.finalize(), before pending tasks are evaluated.
    _state.connect_on_app_finalize(_wrap_after_finalize)
    _wrap_before_eager_apply()


def _wrap_before_eager_apply() -> None:
    """``task.apply()`` may run before the app is finalized (a lazy task proxy)."""
    from celery.app.task import Task

    from .tasks import wrap_run

    stock = Task.apply
    if getattr(stock, "_celery_anyio_patched", False):
        return

    def apply(self: Any, *args: Any, **kwargs: Any) -> Any:
        if wrap_run(self) and enabled("stacks"):
            _patch_stack(_state._task_stack)  # type: ignore[attr-defined]  # private: no stub
            _patch_stack(self.request_stack)
        return stock(self, *args, **kwargs)

    apply._celery_anyio_patched = True  # type: ignore[attr-defined]
    Task.apply = apply  # type: ignore[method-assign]  # the patch


def _wrap_after_finalize(app: Any) -> None:
    app.on_after_finalize.connect(_on_after_finalize, weak=False)


def _on_after_finalize(sender: Any, **_: Any) -> None:
    _prepare_for_eager(sender)


def _prepare_for_eager(app: Any) -> None:
    """Async tasks wrapped, and request stacks that a helper thread's loop can share
    (eager calls from inside a running loop run there, as the caller's job)."""
    if wrap_async_tasks(app):
        patch_request_stacks(app)


# -- cli ---------------------------------------------------------------------


def patch_worker_cli(backends: Iterable[str]) -> None:
    """Accept ``-P module:Class`` and add ``--backend`` to ``celery worker``."""
    if not enabled("cli"):
        return
    import click
    from celery import concurrency
    from celery.bin import worker as worker_cli
    from celery.bin.base import CeleryOption

    pool_type = worker_cli.WorkersPool
    if getattr(pool_type, "_celery_anyio_patched", False):
        return
    stock_convert = pool_type.convert

    def convert(self: Any, value: Any, param: Any, ctx: Any) -> Any:
        if isinstance(value, str) and ":" in value:
            value = _import_pool(value, lambda message: self.fail(message, param, ctx))
        return stock_convert(self, value, param, ctx)

    pool_type.convert = convert  # type: ignore[method-assign]  # the patch
    pool_type._celery_anyio_patched = True  # type: ignore[attr-defined]  # our own mark
    concurrency.ALIASES.setdefault("anyio", "celery_anyio:Pool")  # type: ignore[attr-defined]  # no stub
    choices = list(worker_cli.WORKERS_POOL.choices)
    if "anyio" not in choices:
        worker_cli.WORKERS_POOL.choices = (*choices, "anyio")

    def store_backend(ctx: Any, param: Any, value: str | None) -> None:
        if value is not None:
            ctx.obj.app.conf[settings.BACKEND] = value

    def store_processes(ctx: Any, param: Any, value: str | None) -> None:
        if value is not None:
            try:
                settings.processes_of(value)
            except settings.SettingError:
                raise click.BadParameter(
                    f"{value!r} is not a number of processes or 'auto'"
                ) from None
            ctx.obj.app.conf[settings.PROCESSES] = value

    worker_cli.worker.params.append(
        CeleryOption(
            ["--backend", "--anyio-backend"],
            type=click.Choice(list(backends)),
            default=None,
            expose_value=False,
            callback=store_backend,
            help_group="Pool Options",
            help=(
                "Event loop for -P celery_anyio:Pool (default: the "
                f"{settings.BACKEND} setting, else asyncio)."
            ),
        )
    )
    worker_cli.worker.params.append(
        CeleryOption(
            ["--processes", "--anyio-processes"],
            default=None,
            expose_value=False,
            callback=store_processes,
            help_group="Pool Options",
            help=(
                "Task processes of -P celery_anyio:Pool, each with its own event loop "
                "(a number, or auto for the machine's cores; default: the "
                f"{settings.PROCESSES} setting, else 1: the tasks run in the worker "
                "process). -c is the total over all of them."
            ),
        )
    )


def _import_pool(path: str, fail: Any) -> Any:
    from celery.concurrency.base import BasePool
    from kombu.utils.imports import symbol_by_name

    try:
        pool = symbol_by_name(path)
    except Exception as exc:  # noqa: BLE001 - reported as a usage error
        fail(f"cannot import pool {path!r}: {exc!r}")
    if not (isinstance(pool, type) and issubclass(pool, BasePool)):
        fail(f"{path!r} is not a celery.concurrency.base.BasePool subclass")
    return pool


# -- aio ---------------------------------------------------------------------


def install_aio_methods() -> None:
    """Give Celery's classes the async client methods, under the names users guess."""
    if not enabled("aio"):
        return
    from celery.app.base import Celery
    from celery.app.task import Task
    from celery.canvas import Signature
    from celery.result import AsyncResult, ResultSet

    methods: list[tuple[type, Any]] = [
        (Task, adelay),
        (Task, aapply_async),
        (Signature, adelay),  # chain, group and chord are Signatures too
        (Signature, aapply_async),
        (Celery, asend_task),
        (AsyncResult, aget),
        (ResultSet, aget),  # and GroupResult
    ]
    for cls, method in methods:
        # Never replace: a Celery that ships its own method of that name wins.
        if not hasattr(cls, method.__name__):
            setattr(cls, method.__name__, method)


# Thin methods: `import celery_anyio` must not import anyio (the CLI plugin
# imports it for every `celery` command); celery_anyio.aio does, on first use.


async def adelay(self: Any, /, *args: Any, **kwargs: Any) -> Any:
    """Like ``delay()``, awaited. See :func:`celery_anyio.aio.adelay`."""
    from . import aio

    return await aio.adelay(self, *args, **kwargs)


async def aapply_async(self: Any, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
    """Like ``apply_async()``, awaited. See :func:`celery_anyio.aio.aapply_async`."""
    from . import aio

    return await aio.aapply_async(self, args, kwargs, **options)


async def asend_task(
    self: Any, name: str, args: Any = None, kwargs: Any = None, **options: Any
) -> Any:
    """Like ``send_task()``, awaited. See :func:`celery_anyio.aio.asend_task`."""
    from . import aio

    return await aio.asend_task(self, name, args, kwargs, **options)


async def aget(
    self: Any,
    timeout: float | None = None,
    propagate: bool = True,
    interval: float = 0.5,
    *,
    follow_parents: bool = True,
) -> Any:
    """Like ``get()``, awaited without blocking the loop. See :func:`celery_anyio.aio.aget`."""
    from . import aio

    return await aio.aget(self, timeout, propagate, interval, follow_parents=follow_parents)


# -- signals -----------------------------------------------------------------


def install_async_receivers() -> None:
    """Make Celery's signals run ``async def`` receivers to completion, in order."""
    if not enabled("signals"):
        return
    from celery.utils.dispatch.signal import Signal

    stock = Signal._live_receivers  # type: ignore[attr-defined]  # private: no stub
    if getattr(stock, "_celery_anyio_patched", False):
        return

    def _live_receivers(self: Any, sender: Any) -> list[Any]:
        from .receivers import is_async_receiver, sync_stand_in

        receivers: list[Any] = stock(self, sender)
        if not any(is_async_receiver(r) for r in receivers):
            return receivers
        return [sync_stand_in(r) if is_async_receiver(r) else r for r in receivers]

    _live_receivers._celery_anyio_patched = True  # type: ignore[attr-defined]
    Signal._live_receivers = _live_receivers  # type: ignore[attr-defined]  # private: no stub


# -- messages ----------------------------------------------------------------


def guard_task_messages() -> None:
    """Make the worker's consumer reject malformed task messages (see messages.py)."""
    if not enabled("messages"):
        return
    from celery.worker.consumer.consumer import Consumer

    from .messages import guard_task_handler

    stock = Consumer.create_task_handler
    if getattr(stock, "_celery_anyio_patched", False):
        return

    def create_task_handler(self: Any, *args: Any, **kwargs: Any) -> Any:
        return guard_task_handler(self, stock(self, *args, **kwargs))

    create_task_handler._celery_anyio_patched = True  # type: ignore[attr-defined]
    Consumer.create_task_handler = create_task_handler  # type: ignore[method-assign]  # the patch


# -- prefetch ----------------------------------------------------------------


def route_acks() -> None:
    """Send this pool's acks from the consumer's thread between messages, too."""
    if not enabled("acks"):
        return
    from celery.worker.consumer.consumer import Consumer

    from .consumer_thread import route_acks as route

    route(Consumer)


def guard_prefetch_restore() -> None:
    """Run Celery's prefetch restore after a reconnect on the consumer's thread."""
    if not enabled("prefetch"):
        return
    from celery.worker.consumer.consumer import Consumer

    from .consumer_thread import guard_prefetch_restore as guard

    guard(Consumer)


# -- reconnect ---------------------------------------------------------------


def tolerate_closing_a_lost_channel() -> None:
    """Let the consumer reconnect when closing its lost Redis channel fails.

    After a lost connection Celery closes it (``ignore_errors(connection,
    connection.close)``); kombu's Redis channel then tries to restore its
    unacked messages through a transport that has already let go of its
    connection, and raises ``AttributeError`` (kombu#582, #970), which neither
    ``ignore_errors`` nor ``Connection.maybe_close_channel`` expects: the worker
    ends with "Unrecoverable error". Treated like the connection errors that
    call already ignores, the consumer reconnects instead; the messages stay in
    Redis's unacked set, restored after the visibility timeout as after a crash.
    """
    if not enabled("reconnect"):
        return
    from kombu.connection import Connection

    stock = Connection.maybe_close_channel
    if getattr(stock, "_celery_anyio_patched", False):
        return

    def maybe_close_channel(self: Any, channel: Any) -> None:
        try:
            stock(self, channel)
        except AttributeError:
            import logging

            logging.getLogger(__name__).warning(
                "celery_anyio: closing a channel of a lost connection failed inside kombu "
                "(AttributeError, kombu#582); its unacknowledged messages are restored "
                "after the visibility timeout",
                exc_info=True,
            )

    maybe_close_channel._celery_anyio_patched = True  # type: ignore[attr-defined]
    Connection.maybe_close_channel = maybe_close_channel  # type: ignore[method-assign]  # the patch
    _acks_of_a_lost_channel_are_connection_errors()


def _acks_of_a_lost_channel_are_connection_errors() -> None:
    """An ack (or reject) that reaches a closed channel after the connection was lost
    fails the same way inside kombu's Redis transport; Celery's ``ack_log_error``
    logs connection errors ("Couldn't ack") and goes on: so does this."""
    from kombu.message import Message

    for name in ("ack_log_error", "reject_log_error"):
        stock = getattr(Message, name)
        if getattr(stock, "_celery_anyio_patched", False):
            continue

        def logged(self: Any, logger: Any, errors: Any, *args: Any, _stock: Any = stock) -> Any:
            closed = getattr(getattr(self, "channel", None), "closed", False)
            return _stock(self, logger, (*errors, AttributeError) if closed else errors, *args)

        logged.__name__ = name
        logged._celery_anyio_patched = True  # type: ignore[attr-defined]
        setattr(Message, name, logged)


# -- events ------------------------------------------------------------------


def lock_event_dispatcher() -> None:
    """On Celery < 5.7, serialise ``EventDispatcher.send`` and ``flush``."""
    import celery

    if not enabled("events") or tuple(celery.VERSION[:2]) >= (5, 7):
        return
    import threading

    from celery.events.dispatcher import EventDispatcher

    if getattr(EventDispatcher.send, "_celery_anyio_patched", False):
        return
    stock_init, stock_send, stock_flush = (
        EventDispatcher.__init__,
        EventDispatcher.send,
        EventDispatcher.flush,
    )

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        stock_init(self, *args, **kwargs)
        # Re-entrant (send() may flush()); Celery's own mutex stays as it is.
        self._celery_anyio_lock = threading.RLock()

    def send(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._celery_anyio_lock:
            return stock_send(self, *args, **kwargs)

    def flush(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._celery_anyio_lock:
            return stock_flush(self, *args, **kwargs)

    send._celery_anyio_patched = True  # type: ignore[attr-defined]
    EventDispatcher.__init__ = __init__  # type: ignore[method-assign]  # the patch
    EventDispatcher.send = send  # type: ignore[method-assign]  # the patch
    EventDispatcher.flush = flush  # type: ignore[method-assign]  # the patch
