"""Revoke on a real worker: before start, terminate, stamped headers, events, sync tasks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .harness import (
    PROMPT,
    Client,
    EventLog,
    Namespace,
    PoolBackend,
    Worker,
    key,
    pool_args,
    send,
    tallies,
    wait_for_log,
    wait_for_state,
    wait_until_started,
)

pytestmark = pytest.mark.worker


@pytest.fixture(scope="session")
def narrow_worker(namespace: Namespace, pool_backend: PoolBackend) -> Iterator[Worker]:
    """One task at a time, events on: a second task waits in the pool's queue."""
    queue = namespace.queue(f"narrow-{pool_backend.tag}")
    args = [*pool_args(pool_backend), "-c", "1", "-E"]
    with Worker(namespace, queue, args, app_module="tests.limitsapp") as worker:
        yield worker


@pytest.fixture(scope="session")
def narrow(namespace: Namespace, narrow_worker: Worker) -> Iterator[Client]:
    client = namespace.client(narrow_worker.queue)
    yield client
    client.close()


def test_task_revoked_while_queued_in_the_pool_never_starts(narrow: Client) -> None:
    k = key()
    first = send(narrow, "counted", k, "first", 1.0)
    queued = send(narrow, "counted", k, "queued", 0.1)
    wait_until_started(narrow, k, 1)
    queued.revoke()  # no terminate: it has not started
    assert first.get(timeout=30) == "first"
    wait_for_state(queued, "REVOKED")
    # One at a time, in order: a task sent after it ran, so its turn has passed.
    assert send(narrow, "counted", k, "later", 0.01).get(timeout=30) == "later"
    assert "started:queued" not in tallies(narrow, k)


def test_terminate_sends_one_revoke_event_and_runs_finally(narrow: Client) -> None:
    k = key()
    with EventLog(narrow) as log:
        result = narrow.app.signature("tests.workerapp.guarded", args=(k, 30)).apply_async()
        assert log.wait_for(result.id, "task-started")
        result.revoke(terminate=True)
        assert wait_for_state(result, "REVOKED") < PROMPT
        assert tallies(narrow, k, 1) == {"finally": 1}
        # The events of a task that ran after it: every event of the revoked one came first.
        later = narrow.app.signature("tests.workerapp.add", args=(1, 1)).apply_async()
        assert later.get(timeout=30) == 2
        assert log.wait_for(later.id, "task-succeeded")
    assert log.types(result.id).count("task-revoked") == 1
    assert "task-failed" not in log.types(result.id)


def test_revoke_by_stamped_headers_terminates(narrow: Client) -> None:
    k = key()
    stamp = key()
    sig = narrow.app.signature("tests.limitsapp.counted", args=(k, "stamped", 30))
    sig.stamp(celery_anyio_test=stamp)
    result = sig.apply_async()
    wait_until_started(narrow, k, 1)
    narrow.app.control.revoke_by_stamped_headers({"celery_anyio_test": stamp}, terminate=True)
    assert wait_for_state(result, "REVOKED") < PROMPT
    # One at a time: a later task ran, so the terminated one has ended.
    assert send(narrow, "counted", k, "later", 0.01).get(timeout=30) == "later"
    assert "finished:stamped" not in tallies(narrow, k)


def test_terminating_a_sync_task_stops_its_thread_when_it_can(
    narrow: Client, narrow_worker: Worker
) -> None:
    k = key()
    result = send(narrow, "sync_stuck", k, 1.5)
    tallies(narrow, k, 1)
    result.revoke(terminate=True)
    assert wait_for_state(result, "REVOKED") < PROMPT
    wait_for_log(narrow_worker, rf"sync task .*\[{result.id}\] was terminated")
    # The thread returns from time.sleep and is interrupted there, before "returned".
    assert tallies(narrow, k, 2) == {"started": 1, "unwound": 1}
    assert result.state == "REVOKED"
    assert narrow.app.signature("tests.workerapp.add", args=(1, 1)).delay().get(timeout=30) == 2


def test_terminate_with_sigkill_never_signals_the_worker(
    narrow: Client, narrow_worker: Worker
) -> None:
    k = key()
    result = send(narrow, "counted", k, "killed", 30)
    wait_until_started(narrow, k, 1)
    result.revoke(terminate=True, signal="SIGKILL")
    assert wait_for_state(result, "REVOKED") < PROMPT
    assert narrow_worker.process is not None and narrow_worker.process.poll() is None
    assert narrow.app.signature("tests.workerapp.add", args=(2, 3)).delay().get(timeout=30) == 5
