"""Selecting the pool and backend: CLI, config, CELERY_CUSTOM_WORKER_POOL."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .harness import ROOT, Namespace, PoolBackend, Worker, node_stats, pool_args

pytestmark = pytest.mark.worker


def celery(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.workerapp", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def pool_stats(namespace: Namespace, worker: Worker) -> dict[str, object]:
    client = namespace.client(worker.queue)
    try:
        stats = node_stats(client.app, worker.node)
    finally:
        client.close()
    return dict(stats["pool"])


def test_help_lists_backend_option() -> None:
    out = celery("worker", "--help")
    assert out.returncode == 0, out.stderr
    assert "--backend, --anyio-backend [asyncio|trio]" in out.stdout


@pytest.mark.parametrize("broker", ["redis"], scope="session")
def test_cli_line_verbatim(namespace: Namespace, pool_backend: PoolBackend) -> None:
    queue = namespace.queue(f"cli-{pool_backend.tag}")
    args = [*pool_args(pool_backend)]
    with Worker(namespace, queue, args) as worker:
        stats = pool_stats(namespace, worker)
        client = namespace.client(queue)
        assert client.send("add", 2, 3).get(timeout=30) == 5
        client.close()
    assert stats["implementation"] == "celery_anyio.pool:Pool"
    assert stats["backend"] == pool_backend


@pytest.mark.parametrize("broker", ["redis"], scope="session")
def test_config_selects_pool_and_backend(namespace: Namespace) -> None:
    queue = namespace.queue("config")
    conf = {"worker_pool": "celery_anyio:Pool", "worker_anyio_backend": "trio"}
    with Worker(namespace, queue, [], conf=conf) as worker:
        assert pool_stats(namespace, worker)["backend"] == "trio"


@pytest.mark.parametrize("broker", ["redis"], scope="session")
def test_cli_backend_beats_config(namespace: Namespace) -> None:
    queue = namespace.queue("cli-over-config")
    conf = {"worker_anyio_backend": "trio"}
    with Worker(
        namespace, queue, ["-P", "celery_anyio:Pool", "--anyio-backend", "asyncio"], conf=conf
    ) as worker:
        assert pool_stats(namespace, worker)["backend"] == "asyncio"


@pytest.mark.parametrize("broker", ["redis"], scope="session")
def test_custom_pool_environment_variable(
    namespace: Namespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CELERY_CUSTOM_WORKER_POOL", "celery_anyio:Pool")
    queue = namespace.queue("custom")
    with Worker(namespace, queue, ["-P", "custom"]) as worker:
        stats = pool_stats(namespace, worker)
        assert stats["implementation"] == "celery_anyio.pool:Pool"
        assert stats["backend"] == "asyncio"


def test_unknown_backend_is_a_usage_error() -> None:
    out = celery("worker", "-P", "celery_anyio:Pool", "--backend=curio")
    assert out.returncode == 2
    assert "'curio' is not one of 'asyncio', 'trio'" in out.stderr


def test_unknown_backend_in_config_fails_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERY_ANYIO_TEST_CONF", '{"worker_anyio_backend": "curio"}')
    out = celery("worker", "-P", "celery_anyio:Pool", "--without-mingle", "--without-gossip")
    assert out.returncode != 0
    assert "unknown AnyIO backend 'curio'" in out.stdout + out.stderr


def test_unimportable_pool_is_a_usage_error() -> None:
    out = celery("worker", "-P", "nosuch_module:Pool")
    assert out.returncode == 2
    assert "cannot import pool 'nosuch_module:Pool'" in out.stderr
    out = celery("worker", "-P", "os:path")
    assert out.returncode == 2
    assert "is not a celery.concurrency.base.BasePool subclass" in out.stderr


@pytest.mark.parametrize("broker", ["redis"], scope="session")
@pytest.mark.parametrize("other_pool", ["solo", "threads", "prefork"])
def test_async_task_under_another_pool_fails_loudly(namespace: Namespace, other_pool: str) -> None:
    queue = namespace.queue(f"wrong-{other_pool}")
    with Worker(namespace, queue, ["-P", other_pool, "-c", "1"]) as worker:
        client = namespace.client(queue)
        result = client.send("add", 1, 2)
        with pytest.raises(Exception, match="celery_anyio") as info:
            result.get(timeout=30)
        assert type(info.value).__name__ == "WrongPoolError"
        # Rebuilt by the client from the JSON result: the message, once, intact.
        assert str(info.value).count("was executed by a pool") == 1, str(info.value)
        assert str(info.value).startswith("celery_anyio: async task 'tests.workerapp.add' was")
        assert result.state == "FAILURE"
        marked = client.send("mark", "celery-anyio-test:never")  # ignore_result: still loud
        client.close()
        import time

        # add's record alone names WrongPoolError twice (message and traceback): wait for
        # mark's own, so the worker is idle when it is stopped (Celery 5.3's prefork pool
        # can hang in a warm shutdown that starts while a task is being received).
        loud = f"tests.workerapp.mark[{marked.id}] raised unexpected: WrongPoolError("
        deadline = time.monotonic() + 10
        while loud not in worker.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert loud in worker.log()
        assert "-P celery_anyio:Pool" in worker.log()
        assert "succeeded" not in worker.log()
