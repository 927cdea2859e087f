"""Result stores run off the loop thread (``worker_anyio_result_threads``).

A result backend as slow as a remote database (1.5 s per store) must not stall
the other tasks on the loop, and ``current_task`` in the store must still be the
task whose state it stores.  With the setting at 0 the store runs on the loop, as
Celery's tracer does it, and the same test shows the stall: the measure can fail.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from .harness import Namespace, PoolBackend, Worker, node_stats, pool_args
from .slow_results import STORE_SECONDS

# One process: the stores must run on the loop of the task that measures it, and the
# pool's result-threads count is per process.
pytestmark = [pytest.mark.worker, pytest.mark.single_process]

STORES = 5  # back to back on the loop they would stall it for 7.5 s


@pytest.fixture(params=[1, 0], ids=["result-threads", "on-loop"])
def result_threads(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def slow_store_worker(
    namespace: Namespace, pool_backend: PoolBackend, result_threads: int
) -> Iterator[Worker]:
    queue = namespace.queue(f"slowstore-{pool_backend.tag}-{result_threads}")
    conf = {
        "result_backend": f"tests.slow_results:SlowRedisBackend+{namespace.results_url}",
        "worker_anyio_result_threads": result_threads,
    }
    args = [*pool_args(pool_backend), "-c", "20"]
    with Worker(namespace, queue, args, conf=conf) as worker:
        yield worker


def test_slow_result_stores_do_not_stall_the_loop(
    namespace: Namespace, slow_store_worker: Worker, result_threads: int
) -> None:
    client = namespace.client(slow_store_worker.queue)
    node = slow_store_worker.node
    try:
        gaps = client.send("loop_gaps", 2.0)
        stored = [client.send("add", i, i) for i in range(STORES)]
        assert [r.get(timeout=30) for r in stored] == [2 * i for i in range(STORES)]
        longest_gap = gaps.get(timeout=30)
        stats = node_stats(client.app, node)
    finally:
        client.close()
    assert stats["pool"]["result-threads"] == result_threads
    store = redis.Redis.from_url(namespace.results_url, decode_responses=True)
    where = [store.hgetall(f"store-thread:{r.id}") for r in stored]
    assert [w["current"] for w in where] == [r.id for r in stored]  # the right current_task
    if result_threads:
        assert {w["thread"] for w in where} == {"celery-anyio-results-0"}
        assert longest_gap < STORE_SECONDS / 2
    else:
        assert {w["thread"] for w in where} == {"celery-anyio-loop"}
        assert longest_gap >= STORE_SECONDS
