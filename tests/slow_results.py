"""A Redis result backend as slow as a remote database, that says where it ran.

Used as ``result_backend = "tests.slow_results:SlowRedisBackend+redis://..."``:
each store of a task's final state takes ``STORE_SECONDS`` and records, in the
hash ``store-thread:<task id>``, the thread it ran in and which task
``current_task`` named there.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from celery import current_task, states
from celery.backends.redis import RedisBackend

STORE_SECONDS = 1.5


class SlowRedisBackend(RedisBackend):
    def _store_result(
        self, task_id: str, result: Any, state: str, *args: Any, **kwargs: Any
    ) -> Any:
        if state in states.READY_STATES:
            current = current_task.request.id if current_task else None
            self.client.hset(
                f"store-thread:{task_id}",
                mapping={"thread": threading.current_thread().name, "current": str(current)},
            )
            self.client.expire(f"store-thread:{task_id}", 600)
            time.sleep(STORE_SECONDS)
        return super()._store_result(task_id, result, state, *args, **kwargs)  # type: ignore[misc]  # no stub
