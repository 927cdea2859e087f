"""Turn what a task body raised into what Celery's tracer understands.

AnyIO task groups always raise exception groups, and a body may raise
``SystemExit`` or ``KeyboardInterrupt``.  Celery's tracer knows neither: it
stores ``ExceptionGroup`` as a generic failure (losing ``Retry``, ``Reject`` and
``Ignore`` inside it) and re-raises every ``BaseException``.  The rules:

* a group that holds a cancellation is left alone: it is on its way to the
  cancel scope that owns it (a revoke, a time limit, a shutdown);
* ``Reject``, then ``Ignore``, then ``Retry`` inside a group win, as if raised
  alone;
* a group of one leaf becomes that leaf, with the group as its ``__cause__`` so
  the stored traceback still shows where the group came from;
* a group of several leaves becomes one :class:`TaskExceptionGroup` carrying
  every leaf's type, message and traceback;
* ``SystemExit``, ``KeyboardInterrupt`` and ``GeneratorExit`` become
  :class:`TaskExited`, so one task never stops the worker or its siblings.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Iterator

import anyio
from celery.exceptions import Ignore, Reject, Retry

from .errors import TaskExceptionGroup, TaskExited

if sys.version_info < (3, 11):  # pragma: no cover - exercised on 3.10
    from exceptiongroup import BaseExceptionGroup

# Checked in this order: the first control exception found in a group wins.
CONTROL_EXCEPTIONS: tuple[type[Exception], ...] = (Reject, Ignore, Retry)


def translate(exc: BaseException) -> BaseException:
    """The exception the tracer should see for ``exc`` raised by a task body."""
    if isinstance(exc, anyio.get_cancelled_exc_class()):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        return _translate_group(exc)
    if not isinstance(exc, Exception):
        return _exited(exc)
    return exc


def _translate_group(group: BaseExceptionGroup[BaseException]) -> BaseException:
    cancelled = anyio.get_cancelled_exc_class()
    leaves = list(_leaves(group))
    if any(isinstance(leaf, cancelled) for leaf in leaves):
        return group
    for control in CONTROL_EXCEPTIONS:
        for leaf in leaves:
            if isinstance(leaf, control):
                return leaf
    if len(leaves) == 1:
        (leaf,) = leaves
        translated = translate(leaf)
        if translated.__cause__ is None:
            translated.__cause__ = group
        return translated
    summary = "; ".join(_describe(leaf) for leaf in leaves)
    result = TaskExceptionGroup(
        f"{len(leaves)} exceptions from a task group: {summary}",
        [_leaf_info(leaf) for leaf in leaves],
    )
    result.__cause__ = group
    return result


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def _exited(exc: BaseException) -> TaskExited:
    exited = TaskExited(_type_name(exc), str(exc))
    exited.__cause__ = exc
    return exited


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def _describe(exc: BaseException) -> str:
    return f"{_type_name(exc)}({str(exc)!r})"


def _leaf_info(exc: BaseException) -> dict[str, str]:
    return {
        "type": _type_name(exc),
        "message": str(exc),
        "repr": repr(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    }
