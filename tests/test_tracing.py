"""OpenTelemetry's own Celery instrumentation on this pool: one trace per task tree."""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.propagate import inject
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from .harness import Client, Namespace, PoolBackend, Worker, node_stats, pool_args

pytestmark = pytest.mark.worker

ROOTS = 200
ROOT = "tests.otelapp.traced_root"
LEAF = "tests.otelapp.traced_leaf"


@pytest.fixture
def traced(namespace: Namespace, pool_backend: PoolBackend) -> Iterator[tuple[Client, Worker]]:
    queue = namespace.queue(f"otel-{pool_backend.tag}-{time.monotonic_ns()}")
    args = [*pool_args(pool_backend), "-c", "500"]
    with Worker(namespace, queue, args, app_module="tests.otelapp") as worker:
        client = namespace.client(queue)
        try:
            yield client, worker
        finally:
            client.close()


def _publish_roots(client: Client) -> tuple[list[Any], list[tuple[str, str]]]:
    """Each root task sent inside a producer span of this process, as a client app would."""
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer(__name__)
    results, producers = [], []
    for _ in range(ROOTS):
        with tracer.start_as_current_span("client", kind=trace.SpanKind.PRODUCER) as span:
            headers: dict[str, str] = {}
            inject(headers)
            sig = client.app.signature(ROOT, args=(random.random() / 10,))
            results.append(sig.apply_async(headers=headers))
            ids = span.get_span_context()
            producers.append((f"{ids.trace_id:032x}", f"{ids.span_id:016x}"))
    return results, producers


def _all_spans(client: Client, worker: Worker) -> tuple[list[dict[str, Any]], list[int]]:
    """Every task process's finished spans (each has its own exporter)."""
    pids = set(node_stats(client.app, worker.node)["pool"]["processes"])
    finished = client.app.signature("tests.otelapp.finished_spans", args=(0.3,))
    dumps: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + 30
    while set(dumps) != pids:  # concurrent dumps spread over the processes
        assert time.monotonic() < deadline, (pids, set(dumps))
        for result in [finished.delay() for _ in pids]:
            dump = result.get(timeout=30)
            dumps[dump["pid"]] = dump
    spans = [span for dump in dumps.values() for span in dump["spans"]]
    return spans, [len(dump["initialised_in"]) for dump in dumps.values()]


def test_one_trace_per_task_tree(traced: tuple[Client, Worker]) -> None:
    client, worker = traced
    results, producers = _publish_roots(client)
    bodies = [r.get(timeout=120) for r in results]
    deadline = time.monotonic() + 30
    while True:  # a leaf's span ends in its task_postrun, just after its result
        spans, initialised = _all_spans(client, worker)
        by_trace: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for span in spans:
            by_trace[span["trace"]].append(span)
        if len(spans) >= 4 * ROOTS:
            break
        assert time.monotonic() < deadline, f"{len(spans)} spans"
        time.sleep(0.2)
    assert set(initialised) == {1}  # worker_process_init: once in each task process
    assert len(by_trace) == ROOTS  # nothing started a trace of its own
    for (trace_id, producer), body in zip(producers, bodies, strict=True):
        tree = {(s["kind"], s["name"]): s for s in by_trace[trace_id]}
        assert len(tree) == 4, by_trace[trace_id]
        run = tree["CONSUMER", f"run/{ROOT}"]
        manual = tree["INTERNAL", "manual"]
        publish = tree["PRODUCER", f"apply_async/{LEAF}"]
        leaf = tree["CONSUMER", f"run/{LEAF}"]
        assert run["parent"] == producer  # the client's span
        assert body["body"] == {"trace": trace_id, "span": run["span"]}  # current in the body
        assert body["manual"] == {"trace": trace_id, "span": manual["span"]}
        assert manual["parent"] == run["span"]
        assert publish["parent"] == manual["span"]  # published inside the manual span
        assert leaf["parent"] == publish["span"]


@pytest.mark.parametrize("broker", ["redis"], scope="session")
def test_the_tracing_example_exports_its_spans_at_shutdown(
    namespace: Namespace, pool_backend: PoolBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = namespace.queue(f"otel-example-{pool_backend.tag}-{time.monotonic_ns()}")
    monkeypatch.setenv("CELERY_BROKER_URL", namespace.broker_url)  # as the example reads
    monkeypatch.setenv("CELERY_RESULT_BACKEND", namespace.results_url)
    monkeypatch.setenv("CELERY_QUEUE", queue)
    worker = Worker(
        namespace, queue, [*pool_args(pool_backend)], app_module="docs.examples.tracing"
    ).start()
    client = namespace.client(queue)
    try:
        result = client.app.signature("docs.examples.tracing.fetch_page", args=(7,)).delay()
        assert result.get(timeout=30) == 7
        store = client.app.signature("docs.examples.tracing.store_page", args=(0,))
        assert store.delay().get(timeout=30) == 0
    finally:
        worker.stop()
        client.close()
    log = worker.log()  # the console exporter's JSON, flushed by worker_process_shutdown
    for name in (
        "run/docs.examples.tracing.fetch_page",
        "fetch",
        "run/docs.examples.tracing.store_page",
    ):
        assert f'"name": "{name}"' in log, name
