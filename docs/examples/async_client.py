"""Send Celery tasks and await their results from an asyncio or trio program.

Start a worker for ``tasks.py`` (beside this file), then run this script::

    cd docs/examples
    celery -A tasks worker -P celery_anyio:Pool --backend trio &
    python async_client.py trio        # or: python async_client.py asyncio

Broker and result backend: ``CELERY_BROKER_URL`` and ``CELERY_RESULT_BACKEND``
(both default to ``redis://127.0.0.1:6379/0``); queue: ``CELERY_QUEUE``.
"""

from __future__ import annotations

import sys
import time

import anyio
from celery import chain, chord, group
from celery.exceptions import TimeoutError
from tasks import add, app, sleepy, total


async def main() -> None:
    # Task.adelay / Task.aapply_async: publish without blocking the loop.
    result = await add.adelay(2, 3)
    print("add:", await result.aget(timeout=10))

    # Canvas: chain, group and chord are signatures, so they have them too.
    pipeline = await chain(add.s(1, 2), add.s(10)).aapply_async()
    print("chain:", await pipeline.aget(timeout=10))
    doubles = await group(add.s(i, i) for i in range(5)).aapply_async()
    print("group:", await doubles.aget(timeout=10))
    summed = await chord([add.s(i, i) for i in range(5)], total.s()).aapply_async()
    print("chord:", await summed.aget(timeout=10))

    # By name, like app.send_task; a task that awaits its own subtask.
    nested = await app.asend_task("tasks.add_twice", (1, 2))
    print("add_twice:", await nested.aget(timeout=10))

    # A timeout raises Celery's TimeoutError, as result.get(timeout=...) does.
    slow = await sleepy.adelay(2.0)
    try:
        await slow.aget(timeout=0.5)
    except TimeoutError:
        print("timeout: not ready after 0.5 s")

    # Cancellation ends the wait at once (the task itself goes on running).
    started = time.monotonic()
    with anyio.move_on_after(0.5):
        await slow.aget()
    print(f"cancelled: after {time.monotonic() - started:.1f} s")

    print("sleepy:", await slow.aget(timeout=10))


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
