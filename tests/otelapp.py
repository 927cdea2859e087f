"""The test worker app with OpenTelemetry's Celery instrumentation (``-A tests.otelapp``).

Set up as OpenTelemetry's documentation says, in ``worker_process_init``;
finished spans stay in an in-memory exporter that :func:`finished_spans` reads.
"""

from __future__ import annotations

from typing import Any

import anyio
from celery import signals
from opentelemetry import trace
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from .workerapp import app

__all__ = ["app"]

exporter = InMemorySpanExporter()
tracer = trace.get_tracer(__name__)
started_in: list[int] = []


@signals.worker_process_init.connect(weak=False)
def init_tracing(**_: Any) -> None:
    import os

    started_in.append(os.getpid())
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    # opentelemetry-instrumentation-celery ships no type hints.
    CeleryInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]


def _ids() -> dict[str, str]:
    context = trace.get_current_span().get_span_context()
    return {"trace": f"{context.trace_id:032x}", "span": f"{context.span_id:016x}"}


@app.task
async def traced_root(pause: float) -> dict[str, Any]:
    """Sees its own span, starts a manual child span and publishes a child task in it."""
    seen = _ids()
    with tracer.start_as_current_span("manual"):
        await anyio.sleep(pause)
        manual_ids = _ids()
        child = await traced_leaf.adelay(pause)  # type: ignore[attr-defined]  # install_aio() adds it
    await child.aget(timeout=60)
    return {"body": seen, "manual": manual_ids}


@app.task
async def traced_leaf(pause: float) -> dict[str, str]:
    await anyio.sleep(pause)
    return _ids()


def _describe(span: ReadableSpan) -> dict[str, Any]:
    context = span.get_span_context()
    assert context is not None
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace": f"{context.trace_id:032x}",
        "span": f"{context.span_id:016x}",
        "parent": f"{span.parent.span_id:016x}" if span.parent is not None else None,
    }


@app.task
async def finished_spans(hold: float = 0.0) -> dict[str, Any]:
    """This process's finished spans; ``hold`` keeps its slot, so that several sent at
    once reach every task process."""
    import os

    await anyio.sleep(hold)
    return {
        "pid": os.getpid(),
        "spans": [_describe(span) for span in exporter.get_finished_spans()],
        "initialised_in": started_in,
    }
