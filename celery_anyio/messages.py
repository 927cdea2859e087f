"""Reject a malformed task message with a clear error instead of ending the worker.

Celery's consumer turns the message errors it expects (undecodable body,
content type not accepted, unknown task) into a logged, rejected message.
Anything else raised while it turns a message into a ``Request`` ends the
worker with "Unrecoverable error": a JSON body that is not ``[args, kwargs,
embed]``, a protocol-2 message without an ``id`` header, a protocol-1 body
without ``args``.  Anyone who can publish to the queue could stop every
worker that way.

:func:`guard_task_handler` wraps the consumer's message handler: such an error
is reported through Celery's own ``on_invalid_task`` (an ERROR log line with
the body, a reject without requeue, the ``task_rejected`` signal), with a
message that names the task id and what was wrong, and the task's result is
marked FAILURE when the message names an id, so a client waiting on it does not
wait forever.  Connection and channel errors still propagate (the consumer
reconnects on those), and so does a pool that is not running.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery.exceptions import InvalidTaskError
from celery.utils.collections import AttributeDict

logger = logging.getLogger(__name__)

_GUARDED = "__celery_anyio_guarded__"


class PoolNotRunning(RuntimeError):
    """The pool's event loop has stopped: no message can be handled any more."""


def guard_task_handler(consumer: Any, handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``handler`` (``Consumer.create_task_handler()``), rejecting malformed messages."""
    if getattr(handler, _GUARDED, False):
        return handler
    transport_errors = (*consumer.connection_errors, *consumer.channel_errors)

    def on_task_received(message: Any) -> Any:
        headers = getattr(message, "headers", None)
        if not (isinstance(headers, dict) and "task" in headers):
            # Not protocol 2: Celery would drop a message that is not protocol 1
            # either with a mere warning ("Wrong destination?!?").
            problem = protocol_problem(message)
            if problem is not None:
                reject_malformed(consumer, message, InvalidTaskError(problem))
                return None
        try:
            return handler(message)
        except PoolNotRunning:
            raise
        except Exception as exc:
            # kombu's Redis transport counts KeyError as a connection error: only
            # an error the message itself does not explain is the connection's.
            problem = protocol_problem(message)
            if isinstance(exc, transport_errors) and problem is None:
                raise
            reject_malformed(consumer, message, exc, problem)
            return None

    setattr(on_task_received, _GUARDED, True)
    return on_task_received


def protocol_problem(message: Any) -> str | None:
    """What makes ``message`` break Celery's task message protocol, if anything."""
    headers = getattr(message, "headers", None)
    try:
        body = message.payload
    except Exception as exc:  # noqa: BLE001 - an undecodable body is the problem
        return f"the body cannot be decoded ({type(exc).__name__}: {exc})"
    if isinstance(headers, dict) and "task" in headers:
        if not isinstance(headers.get("id"), str):
            return "protocol 2 needs a task id in the 'id' header"
        if not (
            isinstance(body, (list, tuple))
            and len(body) == 3
            and isinstance(body[0], (list, tuple))
            and isinstance(body[1], dict)
            and isinstance(body[2], (dict, type(None)))
        ):
            return "a protocol 2 body is [args, kwargs, embed]"
        return None
    if not isinstance(body, dict) or not isinstance(body.get("task"), str):
        return "no task name: neither a 'task' header (protocol 2) nor a protocol 1 body"
    if not isinstance(body.get("id"), str):
        return "a protocol 1 body needs a task 'id'"
    if not isinstance(body.get("args", ()), (list, tuple)) or not isinstance(
        body.get("kwargs", {}), dict
    ):
        return "protocol 1 args must be a list and kwargs a mapping"
    return None


def reject_malformed(
    consumer: Any, message: Any, exc: Exception, problem: str | None = None
) -> None:
    """Log and reject ``message`` the way Celery rejects an invalid task."""
    task_id, name = _identity(message)
    detail = str(exc) if isinstance(exc, InvalidTaskError) else f"{type(exc).__name__}: {exc}"
    error = InvalidTaskError(
        f"celery_anyio: task message {name or '?'}[{task_id or '?'}] is malformed: "
        f"{detail}" + (f" ({problem})" if problem else "")
    )
    try:
        consumer.on_invalid_task(None, message, error)
    except Exception:
        logger.exception("celery_anyio: could not reject malformed message %s", task_id)
        _reject_quietly(consumer, message)
    if isinstance(task_id, str) and task_id:
        _mark_failed(consumer, task_id, name, message, error)


def _identity(message: Any) -> tuple[str | None, str | None]:
    headers = getattr(message, "headers", None)
    if isinstance(headers, dict) and ("id" in headers or "task" in headers):
        return _text(headers.get("id")), _text(headers.get("task"))
    try:
        body = message.payload  # protocol 1 keeps both in the body
    except Exception:  # noqa: BLE001 - an undecodable body names nothing
        return None, None
    if isinstance(body, dict):
        return _text(body.get("id")), _text(body.get("task"))
    return None, None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None if value is None else repr(value)


def _mark_failed(
    consumer: Any, task_id: str, name: str | None, message: Any, problem: Exception
) -> None:
    properties = getattr(message, "properties", None) or {}
    request = AttributeDict(
        id=task_id,
        name=name,
        chord=None,
        root_id=None,
        correlation_id=properties.get("correlation_id", task_id),
        reply_to=properties.get("reply_to"),
        errbacks=None,
        ignore_result=False,
    )
    try:
        consumer.app.backend.mark_as_failure(task_id, problem, request=request)
    except Exception:
        logger.debug("celery_anyio: could not store the failure of %s", task_id, exc_info=True)


def _reject_quietly(consumer: Any, message: Any) -> None:
    try:
        message.reject_log_error(logger, consumer.connection_errors)
    except Exception:
        logger.debug("celery_anyio: reject failed", exc_info=True)
