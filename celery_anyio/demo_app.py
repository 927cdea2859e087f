"""The app behind ``celery anyio demo``: one async task that sleeps and reports."""

from __future__ import annotations

import os
import random

import anyio
from celery import Celery

_folder = os.environ.get("CELERY_ANYIO_DEMO_DIR", ".celery-anyio-demo")
_broker = os.environ.get("CELERY_ANYIO_DEMO_BROKER") or "filesystem://"
_results = (
    os.environ.get("CELERY_ANYIO_DEMO_RESULTS") or f"file://{os.path.abspath(_folder)}/results"
)

app = Celery("celery_anyio_demo", broker=_broker, backend=_results)
app.conf.update(
    broker_transport_options={
        "data_folder_in": os.path.join(_folder, "queue"),
        "data_folder_out": os.path.join(_folder, "queue"),
        "processed_folder": os.path.join(_folder, "processed"),
        # kombu's default is "control" in the working directory.
        "control_folder": os.path.join(_folder, "control"),
        "store_processed": False,
        "polling_interval": 0.01,
    },
    task_default_queue=os.environ.get("CELERY_ANYIO_DEMO_QUEUE", "celery-anyio-demo"),
    broker_connection_retry_on_startup=True,
)


@app.task(bind=True)
async def fetch(self: object, n: int, seconds: float) -> dict[str, object]:
    """Stand-in for an HTTP call: wait on the event loop, then report who we were."""
    await anyio.sleep(seconds * (0.5 + random.random()))
    return {"n": n, "task_id": self.request.id}  # type: ignore[attr-defined]
