"""Celery task semantics for async tasks: hooks, signals, Reject/Ignore, limits, events."""

from __future__ import annotations

import re
import time
import uuid

import celery
import pytest
import redis

from .harness import (
    PROMPT,
    Client,
    EventLog,
    Worker,
    text,
    wait_for_log,
    wait_for_state,
    wait_until_done,
)

pytestmark = pytest.mark.worker

# Celery 5.7 records a terminal FAILURE (and fires task_failure) for
# Reject(requeue=False) (celery/celery#10369, issue #4222). Before that the worker only
# rejects the message: the backend keeps nothing and the result stays PENDING.
REJECT_STORES_FAILURE = celery.VERSION >= (5, 7)


def _tallies(client: Client, key: str, expected: int, timeout: float = 10) -> dict[str, int]:
    store = redis.Redis.from_url(client.app.conf.result_backend)
    deadline = time.monotonic() + timeout
    while store.hlen(key) < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return {text(k): int(v) for k, v in store.hgetall(key).items()}


def test_on_success_on_failure_after_return(client: Client) -> None:
    key = uuid.uuid4().hex
    ok = client.send("hooked", key, False)
    bad = client.send("hooked", key, True)
    assert ok.get(timeout=30) == "ok"
    with pytest.raises(RuntimeError):
        bad.get(timeout=30)
    seen = _tallies(client, f"hooks:{key}", 4)
    assert set(seen) == {
        f"on_success:{ok.id}",
        f"after_return:SUCCESS:{ok.id}",
        f"on_failure:{bad.id}",
        f"after_return:FAILURE:{bad.id}",
    }


def test_task_signals_fire_once_with_the_right_current_task(client: Client) -> None:
    key = f"sig:{uuid.uuid4().hex}"
    ok = client.send("signalled", key, False)
    retried = client.send("signalled", key + "r", True)
    assert ok.get(timeout=30) == "ok"
    with pytest.raises(RuntimeError):
        retried.get(timeout=30)
    seen = _tallies(client, key, 4)
    assert seen == {
        f"task_received:{ok.id}:False": 1,  # consumer thread: no current task yet
        f"task_prerun:{ok.id}:True": 1,
        f"task_success:{ok.id}:True": 1,
        f"task_postrun:{ok.id}:True": 1,
    }
    seen = _tallies(client, key + "r", 7)
    assert seen[f"task_received:{retried.id}:False"] == 2  # first try and the retry
    assert seen[f"task_prerun:{retried.id}:True"] == 2
    assert seen[f"task_retry:{retried.id}:True"] == 1
    assert seen[f"task_failure:{retried.id}:True"] == 1
    assert seen[f"task_postrun:{retried.id}:True"] == 2


def test_reject_and_ignore(client: Client, worker: Worker) -> None:
    rejected = client.send("rejecting")
    logged = f"Task tests.workerapp.rejecting[{rejected.id}] reject requeue=False: no thanks"
    if REJECT_STORES_FAILURE:
        with pytest.raises(Exception, match="no thanks"):
            rejected.get(timeout=30)
        assert rejected.state == "FAILURE"  # Reject(requeue=False) is terminal
    else:
        wait_for_log(worker, re.escape(logged), timeout=30)
        wait_until_done(client, worker, rejected.id)  # nothing more of it can happen
        assert rejected.state == "PENDING"  # the message is dropped, nothing is stored
    assert worker.log().count(logged) == 1  # rejected once, never redelivered
    ignored = client.send("ignoring")
    wait_for_log(worker, rf"Task tests\.workerapp\.ignoring\[{ignored.id}\] ignored")
    wait_until_done(client, worker, ignored.id)
    assert ignored.state == "PENDING"  # Ignore stores nothing


def test_await_other_task_is_a_plain_call(client: Client) -> None:
    assert client.send("calls_other", 21).get(timeout=30) == 42


def test_rate_limit(client: Client) -> None:
    results = [client.send("limited", i) for i in range(10)]
    stamps = sorted(r.get(timeout=60) for r in results)
    assert stamps[-1] - stamps[0] >= 1.2  # 10 tasks at 5/s: about 2 s, never a burst


def test_soft_time_limit(client: Client) -> None:
    result = client.sig("sleepy", 1, 5).apply_async(soft_time_limit=0.3)
    with pytest.raises(Exception) as info:
        result.get(timeout=30)
    assert type(info.value).__name__ == "SoftTimeLimitExceeded"


def test_hard_time_limit(client: Client) -> None:
    started = time.monotonic()
    result = client.sig("sleepy", 1, 30).apply_async(time_limit=0.5)
    with pytest.raises(Exception) as info:
        result.get(timeout=30)
    assert type(info.value).__name__ == "TimeLimitExceeded"
    assert time.monotonic() - started < 10  # at the 0.5 s limit, not after the task's 30 s


def test_revoke_terminate_runs_finally(client: Client) -> None:
    key = f"revoke:{uuid.uuid4().hex}"
    result = client.send("guarded", key, 30)
    deadline = time.monotonic() + 10
    while result.state != "STARTED" and time.monotonic() < deadline:
        active = client.app.control.inspect(timeout=1).active() or {}
        if any(t["id"] == result.id for tasks in active.values() for t in tasks):
            break
        time.sleep(0.05)
    result.revoke(terminate=True)
    assert wait_for_state(result, "REVOKED") < PROMPT
    assert _tallies(client, key, 1) == {"finally": 1}


def test_task_events(client: Client, worker: Worker) -> None:
    replies = client.app.control.ping(timeout=2) or []
    node = [name for reply in replies for name in reply if name.startswith(worker.queue)]
    assert node, "worker did not answer ping"
    client.app.control.enable_events(destination=node)
    try:
        with EventLog(client) as log:  # a probe's events arrived: enabled, and listening
            result = client.send("add", 2, 2)
            assert result.get(timeout=30) == 4
            log.wait_for(result.id, "task-succeeded")
    finally:
        client.app.control.disable_events(destination=node)
    assert log.types(result.id) == ["task-received", "task-started", "task-succeeded"]
