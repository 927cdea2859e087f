"""Flower, the tool Celery users watch workers with, sees one worker with its processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .harness import ROOT, Client, Namespace, PoolBackend, Worker, pool_args

pytestmark = [pytest.mark.worker, pytest.mark.parametrize("broker", ["redis"], scope="session")]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def flower(
    namespace: Namespace, pool_backend: PoolBackend
) -> Iterator[tuple[httpx.Client, Worker, Client]]:
    queue = namespace.queue(f"flower-{pool_backend.tag}-{time.monotonic_ns()}")
    worker = Worker(namespace, queue, [*pool_args(pool_backend), "-c", "20", "-E"]).start()
    port = _free_port()
    env = dict(namespace.env(queue), FLOWER_UNAUTHENTICATED_API="1")
    command = [
        sys.executable, "-m", "celery", "-A", "tests.workerapp", "flower",
        f"--port={port}", "--address=127.0.0.1",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    client = namespace.client(queue)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                api.get("/healthcheck").raise_for_status()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "flower did not start"
                time.sleep(0.2)
        yield api, worker, client
    finally:
        api.close()
        client.close()
        process.terminate()
        process.wait(30)
        worker.stop()


def _workers(api: httpx.Client, node: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        workers = api.get("/api/workers", params={"refresh": 1}).json()
        if node in workers and "stats" in workers[node]:
            return dict(workers[node])
        assert time.monotonic() < deadline, workers
        time.sleep(0.5)


def test_flower_shows_the_worker_its_processes_and_tasks(
    flower: tuple[httpx.Client, Worker, Client], pool_backend: PoolBackend
) -> None:
    api, worker, client = flower
    results = [client.send("add", i, i) for i in range(10)]
    assert [r.get(timeout=30) for r in results] == [2 * i for i in range(10)]
    pool = _workers(api, worker.node)["stats"]["pool"]
    assert pool["implementation"] == "celery_anyio.pool:Pool"
    assert len(pool["processes"]) == pool_backend.processes  # one worker, its processes
    assert os.getpid() not in pool["processes"]
    deadline = time.monotonic() + 30
    ids = {r.id for r in results}
    while True:  # task events (-E) reach Flower
        tasks = api.get("/api/tasks", params={"workername": worker.node}).json()
        if ids <= {t for t, info in tasks.items() if info.get("state") == "SUCCESS"}:
            break
        assert time.monotonic() < deadline, tasks
        time.sleep(0.5)
    grown = api.post(f"/api/worker/pool/grow/{worker.node}", params={"n": 5})
    assert grown.status_code == 200, grown.text
    assert _workers(api, worker.node)["stats"]["pool"]["max-concurrency"] == 25
