"""Cancellation semantics on a real worker: limits, revoke, exception groups, exits."""

from __future__ import annotations

import pickle
import time

import pytest

from celery_anyio.errors import TaskExceptionGroup

from .harness import (
    CELERY_VERSION,
    PROMPT,
    Client,
    Namespace,
    PoolBackend,
    Worker,
    key,
    node_stats,
    pool_args,
    send,
    tallies,
    wait_for_log,
    wait_for_state,
    wait_until_done,
    wait_until_started,
)

pytestmark = pytest.mark.worker


# -- time limits ------------------------------------------------------------------


def test_soft_limit_is_caught_in_the_body_which_returns_its_cleanup_value(
    limits: Client, limits_worker: Worker
) -> None:
    k = key()
    result = send(limits, "soft_cleanup", k, soft_time_limit=0.3)
    assert result.get(timeout=30) == "cleaned up"
    assert result.state == "SUCCESS"
    assert tallies(limits, k, 1) == {"cleanup": 1}
    wait_for_log(limits_worker, rf"Soft time limit \(0.3s\) exceeded for .*\[{result.id}\]")


def test_hard_limit_wins_over_a_handler_that_swallows_the_soft_one(limits: Client) -> None:
    k = key()
    started = time.monotonic()
    result = send(limits, "soft_swallower", k, soft_time_limit=0.2, time_limit=1)
    with pytest.raises(Exception) as info:
        result.get(timeout=30)
    assert type(info.value).__name__ == "TimeLimitExceeded"
    assert time.monotonic() - started < 10  # at the 1 s hard limit, not after the handler's 30 s
    assert tallies(limits, k, 1) == {"soft": 1}


def test_sync_task_soft_limit_lands_in_its_thread(limits: Client) -> None:
    k = key()
    result = send(limits, "sync_soft_cleanup", k, soft_time_limit=0.3)
    assert result.get(timeout=30) == "cleaned up"
    assert tallies(limits, k, 1) == {"cleanup": 1}


def test_sync_task_hard_limit_is_reported_on_time_and_not_overwritten(
    limits: Client, limits_worker: Worker
) -> None:
    k = key()
    started = time.monotonic()
    result = send(limits, "sync_stuck", k, 6, time_limit=0.5)
    with pytest.raises(Exception) as info:
        result.get(timeout=30)
    assert type(info.value).__name__ == "TimeLimitExceeded"
    assert time.monotonic() - started < 4.5  # the thread is still in time.sleep(6)
    wait_for_log(limits_worker, rf"sync task .*\[{result.id}\] hit its hard time limit")
    # The thread returns from its sleep and is interrupted there, before "returned".
    assert tallies(limits, k, 2, timeout=30) == {"started": 1, "unwound": 1}
    assert result.state == "FAILURE"
    assert type(result.result).__name__ == "TimeLimitExceeded"


# -- exception groups --------------------------------------------------------------


def test_group_with_one_leaf_is_reported_as_that_leaf(limits: Client) -> None:
    result = send(limits, "group_failure", ["only one"])
    with pytest.raises(ValueError, match="only one"):
        result.get(timeout=30)
    assert "sub-exception" in result.traceback  # the group's traceback is kept


def test_group_with_several_leaves_reaches_the_client_with_every_leaf(limits: Client) -> None:
    result = send(limits, "group_mixed")
    with pytest.raises(TaskExceptionGroup) as info:
        result.get(timeout=30)
    assert sorted(info.value.types) == ["KeyError", "RuntimeError", "ValueError"]
    assert {leaf["message"] for leaf in info.value.leaves} == {
        "bad value",
        "'missing'",
        "broken",
    }
    for leaf in info.value.leaves:
        assert "_fail_after" in leaf["traceback"]
    for text in ("bad value", "missing", "broken", "_fail_after"):
        assert text in result.traceback
    assert pickle.loads(pickle.dumps(info.value)).leaves == info.value.leaves


def test_retry_inside_a_group_is_a_retry(limits: Client) -> None:
    k = key()
    assert send(limits, "group_retry", k).get(timeout=30) == 1
    assert tallies(limits, k, 2) == {"try0": 1, "try1": 1}


def test_reject_inside_a_group_wins_over_other_leaves(
    limits: Client, limits_worker: Worker
) -> None:
    result = send(limits, "group_reject")
    if CELERY_VERSION >= (5, 5):
        with pytest.raises(Exception, match="rejected in a group") as info:
            result.get(timeout=30)
        assert type(info.value).__name__ == "Reject"
    else:  # Celery < 5.5 stores nothing for Reject(requeue=False)
        name = rf"tests\.limitsapp\.group_reject\[{result.id}\]"
        wait_for_log(limits_worker, rf"{name} reject requeue=False: rejected in a group")
        wait_until_done(limits, limits_worker, result.id)
        assert result.state == "PENDING"


def test_ignore_inside_a_group_stores_nothing(limits: Client, limits_worker: Worker) -> None:
    result = send(limits, "group_ignore")
    wait_for_log(limits_worker, rf"tests\.limitsapp\.group_ignore\[{result.id}\] ignored")
    wait_until_done(limits, limits_worker, result.id)  # nothing more of it can happen
    assert result.state == "PENDING"


def test_time_limits_inside_a_group_map_to_the_time_limit_states(limits: Client) -> None:
    soft_key, hard_key = key(), key()
    soft = send(limits, "group_sleepers", soft_key, 30, soft_time_limit=0.3)
    hard = send(limits, "group_sleepers", hard_key, 30, time_limit=0.5)
    with pytest.raises(Exception) as soft_info:
        soft.get(timeout=30)
    with pytest.raises(Exception) as hard_info:
        hard.get(timeout=30)
    assert type(soft_info.value).__name__ == "SoftTimeLimitExceeded"
    assert type(hard_info.value).__name__ == "TimeLimitExceeded"
    started = {"started:group": 1, "started:child0": 1, "started:child1": 1, "started:child2": 1}
    unwound = {**started, "child0": 1, "child1": 1, "child2": 1}
    assert tallies(limits, soft_key, 7) == unwound
    assert tallies(limits, hard_key, 7) == unwound


def test_revoke_inside_a_group_is_revoked(limits: Client) -> None:
    k = key()
    result = send(limits, "group_sleepers", k, 30)
    # Revoked before it starts, it would never run; here the group and its children run.
    wait_until_started(limits, k, 4)
    result.revoke(terminate=True)
    assert wait_for_state(result, "REVOKED") < PROMPT
    started = {"started:group": 1, "started:child0": 1, "started:child1": 1, "started:child2": 1}
    assert tallies(limits, k, 7) == {**started, "child0": 1, "child1": 1, "child2": 1}


# -- what a task must not be able to do ----------------------------------------------


EXITS = ["SystemExit", "KeyboardInterrupt", "GeneratorExit", "OwnBaseException"]


@pytest.mark.parametrize("kind", EXITS)
def test_exit_exceptions_fail_the_task_not_the_worker(limits: Client, kind: str) -> None:
    k = key()
    sibling = send(limits, "counted", k, "sibling", 0.5)
    wait_until_started(limits, k, 1)  # the sibling is running when the exit is raised
    result = send(limits, "exits", kind)
    with pytest.raises(Exception, match=rf"raised (\w+\.)*{kind}") as info:
        result.get(timeout=30)
    assert type(info.value).__name__ == "TaskExited"
    assert sibling.get(timeout=30) == "sibling"
    assert limits.app.signature("tests.workerapp.add", args=(1, 2)).delay().get(timeout=30) == 3


def test_unserializable_result_fails_clearly_and_the_worker_goes_on(limits: Client) -> None:
    result = send(limits, "unserializable")
    with pytest.raises(Exception, match="not JSON serializable"):
        result.get(timeout=30)
    assert result.state == "FAILURE"
    assert limits.app.signature("tests.workerapp.add", args=(2, 2)).delay().get(timeout=30) == 4


def test_unpicklable_exception_fails_clearly(limits: Client) -> None:
    result = send(limits, "unpicklable_error")
    with pytest.raises(Exception, match="UnpicklableError") as info:
        result.get(timeout=30)
    # Celery's own wrapper names the original type and keeps its repr.
    assert type(info.value).__name__ == "UnpickleableExceptionWrapper"
    assert "lock" in str(info.value)
    assert limits.app.signature("tests.workerapp.add", args=(3, 3)).delay().get(timeout=30) == 6


def test_a_task_that_blocks_the_loop_is_named_in_a_warning(
    limits: Client, limits_worker: Worker
) -> None:
    result = send(limits, "blocker", 0.6)
    assert result.get(timeout=30) == "blocked"
    found = wait_for_log(
        limits_worker,
        rf"event loop was blocked for (\d+\.\d+)s by task tests\.limitsapp\.blocker\[{result.id}\]",
    )
    assert 0.5 <= float(found.group(1)) < 5  # about the 0.6 s it slept
    node = limits_worker.node
    pool = node_stats(limits.app, node)["pool"]
    assert pool["loop-lag-ms"]["max"] >= 500
    assert limits.app.signature("tests.workerapp.add", args=(1, 1)).delay().get(timeout=30) == 2


def test_tasks_that_arrive_while_the_loop_is_blocked_start_once_it_has_caught_up(
    limits: Client, limits_worker: Worker, pool_backend: PoolBackend
) -> None:
    """Start pacing in a real worker: the tasks wait unstarted, then all run."""
    # One blocker per task process (the main process gives each the next job).
    blockers = [send(limits, "announced_blocker", 1.5) for _ in range(pool_backend.processes)]
    for blocker in blockers:
        wait_for_log(limits_worker, rf"blocking the loop now: {blocker.id}", timeout=30)
    tally = key()
    arrivals = [send(limits, "counted", tally, str(i), 0.01) for i in range(20)]
    assert [result.get(timeout=30) for result in arrivals] == [str(i) for i in range(20)]
    assert [blocker.get(timeout=30) for blocker in blockers] == ["blocked"] * len(blockers)
    pool = node_stats(limits.app, limits_worker.node)["pool"]
    pacing = [child["start-pacing"] for child in pool.get("children") or [pool]]
    assert sum(each["held"] for each in pacing) >= 1, pacing
    assert sum(each["late-ticks"] for each in pacing) >= 1, pacing


@pytest.mark.parametrize("broker", ["redis"], scope="session")
def test_several_leaves_round_trip_through_the_pickle_serializer(
    namespace: Namespace, pool_backend: PoolBackend
) -> None:
    # Task messages stay JSON (a root worker refuses to accept pickled ones).
    conf = {"result_serializer": "pickle", "result_accept_content": ["json", "pickle"]}
    queue = namespace.queue(f"pickle-{pool_backend.tag}")
    args = [*pool_args(pool_backend)]
    with Worker(namespace, queue, args, conf=conf, app_module="tests.limitsapp"):
        client = namespace.client(queue)
        client.app.conf.update(result_serializer="pickle", result_accept_content=["json", "pickle"])
        try:
            result = send(client, "group_mixed")
            with pytest.raises(TaskExceptionGroup) as info:
                result.get(timeout=30)
            assert sorted(info.value.types) == ["KeyError", "RuntimeError", "ValueError"]
            assert all("_fail_after" in leaf["traceback"] for leaf in info.value.leaves)
            assert "broken" in result.traceback
        finally:
            client.close()


def test_sync_task_exit_fails_the_task_not_the_worker(limits: Client) -> None:
    result = send(limits, "sync_exits")
    with pytest.raises(Exception, match="raised SystemExit") as info:
        result.get(timeout=30)
    assert type(info.value).__name__ == "TaskExited"
    assert limits.app.signature("tests.workerapp.add", args=(5, 5)).delay().get(timeout=30) == 10


@pytest.mark.parametrize("kind", EXITS)
def test_any_base_exception_of_a_sync_task_fails_it_not_the_worker(
    limits: Client, kind: str
) -> None:
    # GeneratorExit raised back through a thread's future ended asyncio workers.
    sibling = limits.app.signature("tests.workerapp.sleepy", args=(8, 0.3)).apply_async()
    result = send(limits, "sync_raises", kind)
    with pytest.raises(Exception, match=rf"raised (\w+\.)*{kind}") as info:
        result.get(timeout=30)
    assert type(info.value).__name__ == "TaskExited"
    assert sibling.get(timeout=30) == 8
    later = [limits.app.signature("tests.workerapp.add", args=(i, i)).delay() for i in range(20)]
    assert [r.get(timeout=30) for r in later] == [2 * i for i in range(20)]


def test_soft_limit_as_a_task_option(limits: Client) -> None:
    assert send(limits, "soft_limited_by_option").get(timeout=30) == "caught"
