"""Exceptions celery_anyio raises to users."""

from __future__ import annotations


class WrongPoolError(RuntimeError):
    """An ``async def`` task was executed by a pool that cannot await it."""

    def __init__(self, task_name: str) -> None:
        super().__init__(
            f"celery_anyio: async task {task_name!r} was executed by a pool that "
            "cannot await coroutines, so its body would never run. Start the "
            "worker with -P celery_anyio:Pool (or set worker_pool = "
            "'celery_anyio:Pool')."
        )
        self.task_name = task_name

    def __reduce__(self) -> tuple[type[WrongPoolError], tuple[str]]:
        return type(self), (self.task_name,)
