"""``--processes N``: the task processes' lifecycle, as prefork users rely on it."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery.exceptions import WorkerLostError

from .harness import (
    Client,
    Namespace,
    PoolBackend,
    Worker,
    key,
    node_stats,
    tallies,
    wait_for_log,
    wait_until_started,
)
from .processapp import LIFECYCLE_ENV

pytestmark = pytest.mark.worker

APP = "tests.processapp"
EXIT_BOUND = 30  # seconds a stopping worker may take beyond its running tasks


class Lifecycle:
    """A ``--processes 2`` worker with its client and lifecycle record."""

    def __init__(self, worker: Worker, client: Client, record: str) -> None:
        self.worker, self.client, self.record = worker, client, record

    def send(self, task: str, *args: Any, **options: Any) -> Any:
        return self.client.app.signature(f"{APP}.{task}", args=args).apply_async(**options)

    def pids(self) -> list[int]:
        node = self.worker.node
        return list(node_stats(self.client.app, node)["pool"]["processes"])

    def events(self) -> dict[str, int]:
        return tallies(self.client, self.record, timeout=0)


@pytest.fixture
def lifecycle(
    namespace: Namespace,
    pool_backend: PoolBackend,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Lifecycle]:
    record = key()
    monkeypatch.setenv(LIFECYCLE_ENV, record)
    extra = getattr(request, "param", [])
    queue = namespace.queue(f"lifecycle-{pool_backend}-{time.monotonic_ns()}")
    args = [
        "-P", "celery_anyio:Pool", f"--backend={pool_backend}", "--processes", "2",
        "-c", "10", *extra,
    ]  # fmt: skip
    worker = Worker(namespace, queue, args, app_module=APP).start()
    client = namespace.client(queue)
    try:
        yield Lifecycle(worker, client, record)
    finally:
        worker.stop()
        client.close()


@pytest.mark.single_process  # runs --processes 2 itself
def test_every_task_process_is_initialised_and_shut_down(lifecycle: Lifecycle) -> None:
    pids = lifecycle.pids()
    assert len(pids) == 2 and os.getpid() not in pids
    assert {m: n for m, n in lifecycle.events().items() if m.startswith("init:")} == {
        f"init:{pid}": 1 for pid in pids
    }
    ran = {r.get(timeout=30) for r in [lifecycle.send("where", key(), "x", 0.2) for _ in range(10)]}
    assert ran == set(pids)  # both processes took tasks
    # What a child inherits stays out of its garbage collections (shared pages).
    frozen = dict(r.get(timeout=30) for r in [lifecycle.send("frozen") for _ in range(10)])
    assert all(count > 0 for count in frozen.values()), frozen
    assert lifecycle.worker.stop(EXIT_BOUND) == 0
    events = lifecycle.events()
    assert {m for m in events if m.startswith("shutdown:")} == {f"shutdown:{p}" for p in pids}


@pytest.mark.single_process
def test_a_killed_process_is_replaced_and_its_tasks_fail_or_come_back(
    lifecycle: Lifecycle,
) -> None:
    k = key()
    plain = [lifecycle.send("where", k, f"plain{i}", 30) for i in range(4)]
    late = [lifecycle.send("redelivered", k, f"late{i}", 30) for i in range(4)]
    wait_until_started(lifecycle.client, k, 8)
    victim, survivor = lifecycle.pids()
    os.kill(victim, signal.SIGKILL)
    wait_for_log(lifecycle.worker, rf"pid {victim}\) exited with signal 9 \(SIGKILL\)")
    lost = 0
    for result in plain:
        try:
            assert result.get(timeout=60) == survivor
        except WorkerLostError as exc:
            assert "Worker exited prematurely: signal 9 (SIGKILL) Job: " in str(exc)
            lost += 1
    assert 0 < lost < 4  # the victim's plain tasks failed as under prefork; the others ran
    # reject_on_worker_lost: the victim's acks_late tasks went back to the queue and ran.
    assert all(isinstance(r.get(timeout=60), int) for r in late)
    seen = tallies(lifecycle.client, k)
    assert all(seen[f"finished:late{i}"] == 1 for i in range(4)), seen
    pids = lifecycle.pids()
    assert victim not in pids and survivor in pids and len(pids) == 2
    more = [lifecycle.send("where", key(), "m", 0.01) for _ in range(10)]
    assert all(r.get(timeout=30) in pids for r in more)


@pytest.mark.single_process
@pytest.mark.parametrize("lifecycle", [["--max-tasks-per-child", "5"]], indirect=True)
def test_max_tasks_per_child_recycles_without_cutting_a_task(lifecycle: Lifecycle) -> None:
    first = set(lifecycle.pids())
    k = key()
    results = [lifecycle.send("where", k, str(i), 0.3) for i in range(40)]
    ran_in = [r.get(timeout=120) for r in results]
    seen = tallies(lifecycle.client, k)
    assert all(seen[f"started:{i}"] == seen[f"finished:{i}"] == 1 for i in range(40)), seen
    assert len(set(ran_in)) >= 8  # 40 tasks, 5 per process
    fresh = set(lifecycle.pids())
    assert fresh.isdisjoint(first)
    # A replacement, too, keeps what it inherits shared (no collection visits it).
    frozen = dict(r.get(timeout=30) for r in [lifecycle.send("frozen") for _ in range(4)])
    assert set(frozen) <= fresh and all(count > 0 for count in frozen.values()), frozen
    log = lifecycle.worker.log()
    assert "retires: it took 5 tasks (--max-tasks-per-child)" in log
    assert "WorkerLostError" not in log and "exited with" not in log


@pytest.mark.single_process
@pytest.mark.parametrize("lifecycle", [["--max-memory-per-child", "150000"]], indirect=True)
def test_max_memory_per_child_recycles_a_process(lifecycle: Lifecycle) -> None:
    first = set(lifecycle.pids())
    results = [lifecycle.send("hoard", 40) for _ in range(8)]  # 320 MB over 2 processes
    assert all(isinstance(r.get(timeout=60), int) for r in results)
    wait_for_log(lifecycle.worker, r"uses more than 150000 KiB \(--max-memory-per-child\)")
    deadline = time.monotonic() + 30
    while set(lifecycle.pids()) & first == first:
        assert time.monotonic() < deadline, "no process was replaced"
        time.sleep(0.2)
    assert "WorkerLostError" not in lifecycle.worker.log()
    assert isinstance(lifecycle.send("where", key(), "after", 0.01).get(timeout=30), int)


@pytest.mark.single_process
def test_warm_shutdown_reaches_every_process(lifecycle: Lifecycle) -> None:
    k = key()
    results = [lifecycle.send("where", k, str(i), 1.0) for i in range(10)]
    wait_until_started(lifecycle.client, k, 10)
    lifecycle.worker.signal(signal.SIGTERM)
    assert lifecycle.worker.wait(EXIT_BOUND) == 0
    assert len({r.get(timeout=10) for r in results}) == 2  # both finished their tasks
    seen = tallies(lifecycle.client, k)
    assert all(seen[f"finished:{i}"] == 1 for i in range(10)), seen


@pytest.mark.single_process
def test_a_stuck_process_does_not_hang_a_cold_stop(lifecycle: Lifecycle) -> None:
    k = key()
    lifecycle.send("block_loop", k, 120)
    lifecycle.send("where", k, "x", 120)
    wait_until_started(lifecycle.client, k, 2)
    lifecycle.worker.signal(signal.SIGQUIT)
    assert lifecycle.worker.wait(EXIT_BOUND) is not None
    wait_for_log(lifecycle.worker, r"did not stop in .*: killed|Cold shutdown")
