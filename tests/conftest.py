"""Fixtures: real brokers, a per-run namespace, and `celery worker` subprocesses."""

from __future__ import annotations

import importlib.util
import logging
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from .harness import (
    BACKENDS,
    BACKENDS_ENV,
    BROKERS,
    Client,
    Namespace,
    PoolBackend,
    Worker,
    broker_available,
    pool_args,
    selected_backends,
)

POOL_BACKENDS = BACKENDS
PROCESSES = ("1", "2")

# The in-process AnyIO tests' event loops, as AnyIO's own suite has them: asyncio in
# debug mode (a coroutine never awaited, a callback from the wrong thread, an
# exception nobody retrieved), also on uvloop, and trio. ``CELERY_ANYIO_BACKENDS``
# picks backends by name, as it does for the worker tests ("asyncio": both loops).
_UVLOOP_MARKS = (
    [] if importlib.util.find_spec("uvloop") else [pytest.mark.skip(reason="uvloop not installed")]
)
ANYIO_BACKENDS = {
    "asyncio": [
        pytest.param(("asyncio", {"debug": True}), id="asyncio"),
        pytest.param(
            ("asyncio", {"debug": True, "use_uvloop": True}),
            id="asyncio+uvloop",
            marks=_UVLOOP_MARKS,
        ),
    ],
    "trio": [pytest.param(("trio", {}), id="trio")],
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--broker",
        action="append",
        choices=sorted(BROKERS),
        help="run worker tests on this broker only (repeatable; default: all)",
    )
    parser.addoption(
        "--pool-backend",
        action="append",
        choices=POOL_BACKENDS,
        help="run worker tests on this AnyIO backend only (repeatable; default: all)",
    )
    parser.addoption(
        "--processes",
        action="append",
        help="run worker tests with this --processes only (repeatable; default: 1 and 2)",
    )


def pytest_configure(config: pytest.Config) -> None:
    unknown = sorted(set(selected_backends()) - set(BACKENDS))
    if unknown:
        raise pytest.UsageError(f"{BACKENDS_ENV}: unknown AnyIO backend(s) {', '.join(unknown)}")


def _selected(config: pytest.Config, option: str, env: str, default: tuple[str, ...]) -> list[str]:
    chosen = config.getoption(option) or [v for v in os.environ.get(env, "").split(",") if v]
    return list(chosen or default)


def _explicitly_parametrized(metafunc: pytest.Metafunc, name: str) -> bool:
    return any(
        name in (m.args[0] if isinstance(m.args[0], (list, tuple)) else m.args[0].split(","))
        for m in metafunc.definition.iter_markers("parametrize")
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    config = metafunc.config
    if "broker" in metafunc.fixturenames and not _explicitly_parametrized(metafunc, "broker"):
        brokers = _selected(config, "--broker", "CELERY_ANYIO_BROKERS", tuple(sorted(BROKERS)))
        metafunc.parametrize("broker", brokers, scope="session")
    if "pool_backend" in metafunc.fixturenames:
        backends = _selected(config, "--pool-backend", BACKENDS_ENV, POOL_BACKENDS)
        counts = _selected(config, "--processes", "CELERY_ANYIO_PROCESSES", PROCESSES)
        if metafunc.definition.get_closest_marker("single_process"):
            counts = [c for c in counts if c == "1"] or ["1"]
        variants = [PoolBackend(b, int(n)) for n in counts for b in backends]
        metafunc.parametrize(
            "pool_backend", variants, ids=[v.tag for v in variants], scope="session"
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``--processes 2`` alone selects the cells that run with several processes.

    Everything else (tests that do not vary with ``--processes``, single-process
    tests) runs whenever 1 is among the counts, so a pass with 1 and a pass with 2
    cover each test once.
    """
    if "1" in _selected(config, "--processes", "CELERY_ANYIO_PROCESSES", PROCESSES):
        return
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("pool_backend") if callspec is not None else None
        several = isinstance(backend, PoolBackend) and backend.processes > 1
        (keep if several else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(
    params=[p for name in BACKENDS if name in selected_backends() for p in ANYIO_BACKENDS[name]]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """The backend of each ``@pytest.mark.anyio`` test: ``(name, options)``.

    Tests that need the name alone take AnyIO's ``anyio_backend_name`` fixture.
    """
    name, options = request.param
    return str(name), dict(options)


@pytest.fixture(scope="session", autouse=True)
def _no_slow_callback_records() -> None:
    """asyncio's debug mode logs each callback over 0.1 s: the tests that block the loop
    on purpose (and read their own log records) need not see those lines."""

    class SlowCallbacks(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return record.msg != "Executing %s took %.3f seconds"

    logging.getLogger("asyncio").addFilter(SlowCallbacks())


@pytest.fixture(scope="session")
def run_id() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def namespace(broker: str, run_id: str) -> Namespace:
    if not broker_available(broker):
        pytest.fail(f"{broker} is not reachable: start it (see .ci/run)")
    return Namespace.create(broker, run_id)


@pytest.fixture(scope="session")
def worker(namespace: Namespace, pool_backend: PoolBackend) -> Iterator[Worker]:
    """A shared worker per broker and backend, at -c 200."""
    queue = namespace.queue(f"shared-{pool_backend.tag}")
    with Worker(namespace, queue, [*pool_args(pool_backend), "-c", "200"]) as w:
        yield w


@pytest.fixture(scope="session")
def client(namespace: Namespace, worker: Worker) -> Iterator[Client]:
    c = namespace.client(worker.queue)
    yield c
    c.close()


@pytest.fixture(scope="session")
def limits_worker(namespace: Namespace, pool_backend: PoolBackend) -> Iterator[Worker]:
    queue = namespace.queue(f"limits-{pool_backend.tag}")
    args = [*pool_args(pool_backend), "-c", "50"]
    with Worker(namespace, queue, args, app_module="tests.limitsapp") as worker:
        yield worker


@pytest.fixture(scope="session")
def limits(namespace: Namespace, limits_worker: Worker) -> Iterator[Client]:
    client = namespace.client(limits_worker.queue)
    yield client
    client.close()
