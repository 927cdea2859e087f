"""A real `celery worker -P celery_anyio:Pool` on Redis and RabbitMQ, both backends."""

from __future__ import annotations

import time
import uuid

import pytest
from celery import chain, chord, group
from celery.result import ResultSet

from .harness import Client, PoolBackend, Worker, node_stats

pytestmark = pytest.mark.worker


def test_200_sleeping_tasks_run_concurrently(client: Client) -> None:
    started = time.monotonic()
    results = [client.send("sleepy", i, 0.5) for i in range(200)]
    # One wait for all: Celery 5.3's client spends up to a second in each
    # AsyncResult.get() whose result has already arrived (it drains the backend once
    # more before it looks), which alone can exceed the bound below.
    values = ResultSet(results, app=client.app).get(timeout=60)
    assert sorted(values) == list(range(200))
    elapsed = time.monotonic() - started
    # Serially this is 100 s; concurrently it is one sleep plus overhead.
    assert elapsed < 10, elapsed


def test_arguments_larger_than_a_socket_buffer_reach_their_task(client: Client) -> None:
    """Megabytes of arguments (a job message that does not fit in one socket write to a
    task process), several at once, and the tasks sent after them."""
    big = [client.send("total", [1] * (1_000_000 + i)) for i in range(3)]
    after = [client.send("add", i, i) for i in range(20)]
    assert [r.get(timeout=60) for r in big] == [1_000_000 + i for i in range(3)]
    assert [r.get(timeout=60) for r in after] == [2 * i for i in range(20)]


def test_bound_tasks_see_their_own_request(client: Client) -> None:
    results = [client.send("whoami", 0.05 + (i % 7) / 100) for i in range(200)]
    for result in results:
        seen = result.get(timeout=60)
        assert seen["before"] == seen["after"] == seen["current"] == result.id
        assert seen["thread"] == result.id  # anyio.to_thread keeps the task's context
        assert seen["child"] == result.id  # so does a child task of the body's task group
        assert seen["prerun_mismatches"] == 0  # task_prerun saw the right current_task


def test_sync_tasks_run_in_threads_next_to_async_ones(client: Client) -> None:
    sleepers = [client.send("sleepy", i, 0.3) for i in range(50)]
    adds = [client.send("sync_add", i, i) for i in range(50)]
    assert [r.get(timeout=30)["sum"] for r in adds] == [2 * i for i in range(50)]
    threads = {r.get(timeout=30)["thread"] for r in adds}
    assert all(name != "celery-anyio-loop" for name in threads)
    assert sorted(r.get(timeout=30) for r in sleepers) == list(range(50))


def test_retry_and_autoretry(client: Client) -> None:
    retried = client.send("flaky", 2)
    auto = client.send("auto_flaky", 2)
    assert retried.get(timeout=30) == 2
    assert auto.get(timeout=30) == 2


def test_failure_state_and_traceback(client: Client) -> None:
    result = client.send("boom", "kaput")
    with pytest.raises(Exception, match="kaput") as info:
        result.get(timeout=30)
    assert type(info.value).__name__ == "ValueError"
    assert result.state == "FAILURE"
    assert "boom" in (result.traceback or "")


def test_update_state_is_visible_while_running(client: Client) -> None:
    result = client.send("progress")
    deadline = time.monotonic() + 10
    while result.state != "PROGRESS" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert result.state == "PROGRESS"
    assert result.info == {"step": 1}
    assert result.get(timeout=10) == "done"


def test_ignore_result_still_runs_the_body(client: Client) -> None:
    import redis

    key = f"celery-anyio-test:{uuid.uuid4().hex}"
    client.send("mark", key)
    store = redis.Redis.from_url(client.app.conf.result_backend)
    deadline = time.monotonic() + 10
    while store.get(key) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.get(key) == b"ran"


def test_canvas_chain_group_chord(client: Client) -> None:
    assert chain(client.sig("add", 1, 2), client.sig("add", 3)).apply_async().get(timeout=30) == 6
    assert group(client.sig("add", i, i) for i in range(10)).apply_async().get(timeout=30) == [
        2 * i for i in range(10)
    ]
    header = [client.sig("add", i, 1) for i in range(10)]
    assert chord(header)(client.sig("total")).get(timeout=30) == sum(range(1, 11))


def test_countdown_and_expires(client: Client) -> None:
    started = time.monotonic()
    assert client.sig("add", 1, 1).apply_async(countdown=1).get(timeout=30) == 2
    assert time.monotonic() - started >= 1
    expired = client.sig("add", 1, 1).apply_async(countdown=1, expires=0.5)
    with pytest.raises(Exception) as info:
        expired.get(timeout=30)
    assert expired.state == "REVOKED", info.value


def test_inspect_stats_shows_the_pool(
    client: Client, worker: Worker, pool_backend: PoolBackend
) -> None:
    pool = node_stats(client.app, worker.node)["pool"]
    assert pool["implementation"] == "celery_anyio.pool:Pool"
    assert pool["backend"] == pool_backend
    assert pool["max-concurrency"] == 200
    assert len(pool["processes"]) == pool_backend.processes  # celery-exporter counts them
    assert pool["result-threads"] == 4 * pool_backend.processes


def test_no_errors_in_worker_log(client: Client, worker: Worker) -> None:
    client.send("add", 1, 1).get(timeout=30)
    log = worker.log()
    assert "never awaited" not in log
    # Tasks that fail on purpose (here and in test_semantics) log their errors.
    expected = ("boom", "hooked", "signalled", "rejecting", "sleepy")
    unexpected = [
        line
        for line in log.splitlines()
        if ("ERROR" in line or "CRITICAL" in line)
        and not any(f"tests.workerapp.{name}[" in line for name in expected)
    ]
    assert not unexpected, unexpected
