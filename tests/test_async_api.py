"""Worker lifespan, async signal receivers and remote control on a real worker."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from .harness import Client, Namespace, PoolBackend, Worker, node_stats, pool_args, wait_for_log

pytestmark = pytest.mark.worker

EXAMPLE = "docs.examples.worker_resources"


@pytest.fixture(scope="session")
def resources_worker(namespace: Namespace, pool_backend: PoolBackend) -> Iterator[Worker]:
    queue = namespace.queue(f"resources-{pool_backend.tag}")
    args = [*pool_args(pool_backend), "-c", "100"]
    with Worker(namespace, queue, args, app_module=EXAMPLE) as worker:
        yield worker


@pytest.fixture(scope="session")
def resources_client(namespace: Namespace, resources_worker: Worker) -> Iterator[Client]:
    client = namespace.client(resources_worker.queue)
    yield client
    client.close()


def pool_stats(client: Client, worker: Worker) -> dict[str, Any]:
    return dict(node_stats(client.app, worker.node)["pool"])


def node(client: Client, worker: Worker) -> list[str]:
    return [worker.node]


def test_lifespan_resources_are_shared_by_every_task(
    resources_client: Client, resources_worker: Worker, pool_backend: PoolBackend
) -> None:
    sig = resources_client.app.signature(f"{EXAMPLE}.use_resource")
    results = [sig.apply_async() for _ in range(50)]
    seen = [r.get(timeout=30) for r in results]
    # One object per process that runs tasks, shared by all its tasks.
    assert 1 <= len({(s["pid"], s["resources"]) for s in seen}) <= pool_backend.processes
    assert len({s["resources"] for s in seen}) == len({s["pid"] for s in seen})
    assert all(s["prerun_saw_me"] for s in seen)  # async task_prerun ran first, on the loop
    log = resources_worker.log()
    assert log.count("lifespan: entered on celery-anyio-loop") == pool_backend.processes
    # Sent in the main process: on its loop when it runs the tasks, else on a loop of
    # its own there (the task processes have their own signals).
    ran_on = "celery-anyio-loop" if pool_backend.processes == 1 else ""
    assert f"worker_ready receiver ran on {ran_on}" in log
    assert "this receiver always fails" in log  # logged by Celery; the tasks succeeded


def test_lifespan_exits_after_the_last_task_on_warm_shutdown(
    namespace: Namespace, pool_backend: PoolBackend
) -> None:
    queue = namespace.queue(f"lifespan-stop-{pool_backend.tag}")
    args = [*pool_args(pool_backend)]
    worker = Worker(namespace, queue, args, app_module=EXAMPLE).start()
    client = namespace.client(queue)
    try:
        sig = client.app.signature(f"{EXAMPLE}.use_resource")
        results = [sig.apply_async() for _ in range(5)]
        for r in results:
            r.get(timeout=30)
        worker.stop()
        log = worker.log()
        calls = [int(n) for n in re.findall(r"lifespan: exited after (\d+) calls", log)]
        assert len(calls) == pool_backend.processes and sum(calls) == 5
        assert log.index("lifespan: exited") > log.rindex("succeeded in")
    finally:
        worker.stop()
        client.close()


def test_a_lifespan_that_fails_stops_the_worker_with_a_clear_error(
    namespace: Namespace, pool_backend: PoolBackend
) -> None:
    queue = namespace.queue(f"lifespan-fail-{pool_backend.tag}")
    args = [*pool_args(pool_backend)]
    conf = {"worker_anyio_lifespan": "tests.limitsapp:broken_lifespan"}
    worker = Worker(namespace, queue, args, conf=conf, app_module="tests.limitsapp")
    try:
        with pytest.raises(RuntimeError, match="worker exited with 1"):
            worker.start()
    finally:
        worker.stop()  # a worker that came up after all must not outlive the test
    assert "the worker lifespan failed to start: ConnectionError('database unreachable')" in (
        worker.log()
    )


def test_pool_grow_and_shrink_resize_the_limit_live(
    resources_client: Client, resources_worker: Worker
) -> None:
    destination = node(resources_client, resources_worker)
    assert pool_stats(resources_client, resources_worker)["max-concurrency"] == 100
    resources_client.app.control.pool_grow(20, destination=destination, reply=True)
    assert pool_stats(resources_client, resources_worker)["max-concurrency"] == 120
    resources_client.app.control.pool_shrink(30, destination=destination, reply=True)
    stats = pool_stats(resources_client, resources_worker)
    assert stats["max-concurrency"] == 90
    assert (stats["backend"], stats["loop"]) in (("asyncio", "asyncio"), ("trio", "trio"))
    assert set(stats["loop-lag-ms"]) == {"last", "p50", "p99", "max"}
    assert "running" in stats


@pytest.mark.parametrize("explicit", [None, 4], ids=["following", "explicit"])
def test_sync_task_threads_follow_pool_grow_unless_set(
    namespace: Namespace, pool_backend: PoolBackend, explicit: int | None
) -> None:
    queue = namespace.queue(f"grow-threads-{pool_backend.tag}-{explicit}")
    args = [*pool_args(pool_backend), "-c", "4"]
    conf = {"worker_anyio_thread_limit": explicit} if explicit else None
    with Worker(namespace, queue, args, conf=conf, app_module="tests.limitsapp") as worker:
        client = namespace.client(queue)
        # The setting is per process; following -c, the threads add up to -c.
        fixed = explicit * pool_backend.processes if explicit else None
        try:
            assert pool_stats(client, worker)["threads"] == (fixed or 4)
            client.app.control.pool_grow(8, destination=node(client, worker), reply=True)
            stats = pool_stats(client, worker)
            assert stats["max-concurrency"] == 12
            assert stats["threads"] == (fixed or 12)
            if explicit is None:  # twelve sync tasks run at once, each waiting for all
                k = f"celery-anyio-test:{queue}"
                sig = client.app.signature("tests.limitsapp.sync_rendezvous", args=(k, 12))
                results = [sig.clone().apply_async() for _ in range(12)]
                assert [r.get(timeout=60) for r in results] == [True] * 12
            client.app.control.pool_shrink(10, destination=node(client, worker), reply=True)
            assert pool_stats(client, worker)["threads"] == (fixed or 2)
        finally:
            client.close()


def test_shrunk_limit_bounds_running_tasks(namespace: Namespace, pool_backend: PoolBackend) -> None:
    queue = namespace.queue(f"shrink-{pool_backend.tag}")
    args = [*pool_args(pool_backend), "-c", "4"]
    with Worker(namespace, queue, args, app_module="tests.limitsapp") as worker:
        client = namespace.client(queue)
        try:
            client.app.control.pool_shrink(3, destination=node(client, worker), reply=True)
            started = time.monotonic()
            sig = client.app.signature("tests.workerapp.sleepy")
            results = [sig.clone(args=(i, 0.5)).apply_async() for i in range(3)]
            assert sorted(r.get(timeout=30) for r in results) == [0, 1, 2]
            assert time.monotonic() - started >= 1.4  # one at a time: 3 x 0.5 s
        finally:
            client.close()


def test_autoscale_grows_the_pool_under_load(
    namespace: Namespace, pool_backend: PoolBackend
) -> None:
    queue = namespace.queue(f"autoscale-{pool_backend.tag}")
    args = [*pool_args(pool_backend), "--autoscale=40,2"]
    with Worker(namespace, queue, args, app_module="tests.limitsapp") as worker:
        client = namespace.client(queue)
        try:
            assert pool_stats(client, worker)["max-concurrency"] == 2
            sig = client.app.signature("tests.workerapp.sleepy")
            started = time.monotonic()
            results = [sig.clone(args=(i, 2.0)).apply_async() for i in range(40)]
            wait_for_log(worker, r"Scaling up", timeout=15)
            assert sorted(r.get(timeout=60) for r in results) == list(range(40))
            # At 2 at a time this is 40 s; grown, a few rounds of 2 s.
            assert time.monotonic() - started < 20
            assert pool_stats(client, worker)["max-concurrency"] > 2
        finally:
            client.close()


@pytest.mark.parametrize("broker", ["redis"], scope="session")
def test_uvloop_opt_in(namespace: Namespace) -> None:
    queue = namespace.queue("uvloop")
    args = ["-P", "celery_anyio:Pool", "--backend=asyncio"]
    conf = {"worker_anyio_backend_options": {"use_uvloop": True}}
    with Worker(namespace, queue, args, conf=conf, app_module="tests.limitsapp") as worker:
        client = namespace.client(queue)
        try:
            stats = pool_stats(client, worker)
            assert (stats["backend"], stats["loop"]) == ("asyncio", "uvloop")
            sig = client.app.signature("tests.workerapp.sleepy")
            results = [sig.clone(args=(i, 0.2)).apply_async() for i in range(20)]
            assert sorted(r.get(timeout=30) for r in results) == list(range(20))
        finally:
            client.close()


def test_the_documented_cli_commands(
    namespace: Namespace, resources_client: Client, resources_worker: Worker
) -> None:
    """`celery control pool_grow` and `celery inspect stats`, as docs/async-worker.md shows."""
    import json
    import subprocess
    import sys

    from .harness import ROOT

    destination = node(resources_client, resources_worker)[0]

    def celery(*args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "celery", "-A", EXAMPLE, *args, "-d", destination],
            cwd=ROOT,
            env=namespace.env(resources_worker.queue),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return out.stdout

    before = json.loads(celery("inspect", "stats", "--json"))[destination]["pool"]
    assert "pool will grow" in celery("control", "pool_grow", "7")
    after = json.loads(celery("inspect", "stats", "--json"))[destination]["pool"]
    assert after["max-concurrency"] == before["max-concurrency"] + 7
    assert after["implementation"] == "celery_anyio.pool:Pool"
    assert set(after["loop-lag-ms"]) == {"last", "p50", "p99", "max"}
