"""Every exception this package stores round-trips through Celery's result serializers."""

from __future__ import annotations

import pytest
from celery import Celery

from celery_anyio import NoLifespanError, TaskExceptionGroup, TaskExited, WrongPoolError

LEAVES = [{"type": "ValueError", "message": "bad", "repr": "ValueError('bad')", "traceback": "tb"}]
STORED = [
    WrongPoolError("proj.fetch"),
    TaskExited("SystemExit", "3"),
    TaskExited("KeyboardInterrupt"),
    TaskExceptionGroup("2 exceptions from a task group: ...", LEAVES * 2),
    NoLifespanError("no worker lifespan is running here"),
]


@pytest.mark.parametrize("serializer", ["json", "pickle"])
@pytest.mark.parametrize("exc", STORED, ids=lambda exc: type(exc).__name__)
def test_stored_exception_keeps_its_type_and_message(serializer: str, exc: Exception) -> None:
    app = Celery("errors", backend="cache+memory://", set_as_current=False)
    app.conf.update(result_serializer=serializer, accept_content=["json", "pickle"])
    backend = app.backend
    stored = backend.prepare_exception(exc, serializer)
    encoded = backend.decode(backend.encode(stored))
    rebuilt = backend.exception_to_python(encoded)
    assert type(rebuilt) is type(exc)
    assert str(rebuilt) == str(exc)
    assert rebuilt.args == exc.args
