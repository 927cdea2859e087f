"""Exceptions celery_anyio raises to users.

The two task outcomes here (:class:`TaskExceptionGroup`, :class:`TaskExited`)
are plain ``Exception`` subclasses whose ``args`` hold only strings, lists and
dicts, so Celery stores them through the JSON and pickle serializers alike and
``result.get()`` raises them on any client.
"""

from __future__ import annotations

from typing import Any


class WrongPoolError(RuntimeError):
    """An ``async def`` task was executed by a pool that cannot await it.

    ``args`` is only the task's name, so a client rebuilding it from a JSON
    result (``cls(*args)``) gets the same message back.
    """

    def __init__(self, task_name: str) -> None:
        super().__init__(task_name)
        self.task_name = task_name

    def __str__(self) -> str:
        return (
            f"celery_anyio: async task {self.task_name!r} was executed by a pool that "
            "cannot await coroutines, so its body would never run. Start the "
            "worker with -P celery_anyio:Pool (or set worker_pool = "
            "'celery_anyio:Pool')."
        )


class TaskExceptionGroup(Exception):
    """Several exceptions raised together by one task (e.g. from a task group).

    ``leaves`` holds one dict per leaf exception: ``type`` (dotted name),
    ``message`` (``str(exc)``), ``repr`` and ``traceback`` (formatted text).
    The original group is kept as ``__cause__`` in the worker, so the stored
    traceback shows every leaf.
    """

    def __init__(self, message: str, leaves: list[dict[str, Any]]) -> None:
        super().__init__(message, leaves)
        self.message = message
        self.leaves = leaves

    @property
    def types(self) -> list[str]:
        """The dotted type name of every leaf, in order."""
        return [str(leaf.get("type")) for leaf in self.leaves]

    def __str__(self) -> str:
        return self.message


class TaskExited(Exception):
    """A task body raised ``SystemExit``, ``KeyboardInterrupt`` or ``GeneratorExit``.

    One task's exit request must not stop the worker or its other tasks, so it
    becomes this ordinary failure, naming the original exception.
    """

    def __init__(self, exc_type: str, message: str = "") -> None:
        super().__init__(exc_type, message)
        self.exc_type = exc_type
        self.message = message

    def __str__(self) -> str:
        detail = f": {self.message}" if self.message else ""
        return f"the task body raised {self.exc_type}{detail}"
