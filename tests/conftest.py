"""Fixtures: real brokers, a per-run namespace, and `celery worker` subprocesses."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from .harness import BROKERS, Client, Namespace, PoolBackend, Worker, broker_available, pool_args

POOL_BACKENDS = ("asyncio", "trio")
PROCESSES = ("1", "2")


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
        backends = _selected(config, "--pool-backend", "CELERY_ANYIO_BACKENDS", POOL_BACKENDS)
        counts = _selected(config, "--processes", "CELERY_ANYIO_PROCESSES", PROCESSES)
        if metafunc.definition.get_closest_marker("single_process"):
            counts = [c for c in counts if c == "1"] or ["1"]
        variants = [PoolBackend(b, int(n)) for n in counts for b in backends]
        metafunc.parametrize(
            "pool_backend", variants, ids=[v.tag for v in variants], scope="session"
        )


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


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
