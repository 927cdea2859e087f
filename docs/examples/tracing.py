"""OpenTelemetry tracing of async tasks on this pool, set up the documented way.

    celery -A docs.examples.tracing worker -P celery_anyio:Pool --backend trio

Spans go to stdout (``ConsoleSpanExporter``); point an OTLP exporter at your
collector instead. ``worker_process_init`` is sent once in every process that runs
tasks (the worker process itself with this pool), so the same setup serves prefork.
Broker and results: ``CELERY_BROKER_URL`` / ``CELERY_RESULT_BACKEND`` (default
``redis://127.0.0.1:6379/0``), queue ``CELERY_QUEUE`` (default ``celery``).
"""

from __future__ import annotations

import os
from typing import Any

import anyio
from celery import Celery, signals
from opentelemetry import trace
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

REDIS = "redis://127.0.0.1:6379/0"
app = Celery(
    "tracing",
    broker=os.environ.get("CELERY_BROKER_URL", REDIS),
    backend=os.environ.get("CELERY_RESULT_BACKEND", REDIS),
)
app.conf.task_default_queue = os.environ.get("CELERY_QUEUE", "celery")
tracer = trace.get_tracer(__name__)


@signals.worker_process_init.connect(weak=False)
def init_tracing(**_: Any) -> None:
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)
    CeleryInstrumentor().instrument()


@signals.worker_process_shutdown.connect(weak=False)
def flush_spans(**_: Any) -> None:
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()  # flushes the batch processor before the process exits


@app.task
async def fetch_page(n: int) -> int:
    # The task's span (started by the instrumentation in task_prerun) is current
    # here: this span is its child, and so is the span of the task sent below.
    with tracer.start_as_current_span("fetch"):
        await anyio.sleep(0.05)
        await store_page.adelay(n)
    return n


@app.task
async def store_page(n: int) -> int:
    await anyio.sleep(0.01)
    return n
