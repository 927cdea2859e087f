"""How an ``async def`` task's ``run`` behaves depending on who calls it.

The wrapper installed on each async task decides, from the request on the
task's own stack:

* called directly (``await my_task(x)``, ``my_task(x)``): return the coroutine;
* called by the tracer inside this pool's bridge: await it on the worker loop;
* called by the tracer in eager mode (``apply()``, ``task_always_eager``): run
  it to completion on a fresh event loop and return its value;
* called by the tracer of any other pool: raise :class:`WrongPoolError`
  instead of "succeeding" with an unawaited coroutine.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Coroutine
from typing import Any

from . import bridge, settings
from .context import job_identity
from .errors import WrongPoolError
from .ownloop import run_on_own_loop

_WRAPPED = "__celery_anyio_run__"


def _body_attr(task: Any) -> str:
    # ``autoretry_for`` moves the body to ``_orig_run`` behind a sync wrapper
    # that catches its exceptions; our dispatcher goes beneath that wrapper so
    # Celery's own autoretry logic sees the awaited body's exceptions.
    return "_orig_run" if getattr(task, "_orig_run", None) is not None else "run"


def original_run(task: Any) -> Callable[..., Any]:
    run = getattr(task, _body_attr(task))
    if getattr(run, _WRAPPED, False):
        return run.__wrapped__  # type: ignore[no-any-return]
    return run  # type: ignore[no-any-return]


def is_async_task(task: Any) -> bool:
    return inspect.iscoroutinefunction(original_run(task))


def wrap_run(task: Any) -> bool:
    """Install the dispatching body on ``task``; False if not async or done."""
    attr = _body_attr(task)
    run = getattr(task, attr)
    if getattr(run, _WRAPPED, False) or not inspect.iscoroutinefunction(run):
        return False

    @functools.wraps(run)
    def run_dispatch(*args: Any, **kwargs: Any) -> Any:
        request = task.request_stack.top
        if request is None or request.called_directly:
            return run(*args, **kwargs)
        if bridge.in_bridge():
            return bridge.await_(run(*args, **kwargs))
        if request.is_eager:
            return run_eagerly(task, functools.partial(run, *args, **kwargs))
        raise WrongPoolError(task.name)

    setattr(run_dispatch, _WRAPPED, True)
    setattr(task, attr, run_dispatch)
    return True


def run_eagerly(task: Any, make_coro: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run an async task body for eager mode, on its own short-lived loop.

    Inside a running event loop (an eager call from async code) the body runs on
    a helper thread, which keeps the caller's request stack visible to it.
    """
    backend = settings.backend_of(task.app.conf)
    identity = task.request_stack.__ident_func__()
    return run_on_own_loop(make_coro, backend, before=lambda: job_identity.set(identity))
