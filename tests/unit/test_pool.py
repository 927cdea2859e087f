"""The pool driven by Celery's own Requests, with no broker and no worker around it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
from celery import Celery

from celery_anyio import TaskExited
from celery_anyio.pool import Pool
from celery_anyio.receivers import WorkerLoop

from .requests import Acks, make_request


@pytest.fixture(params=["asyncio", "trio"])
def app(request: pytest.FixtureRequest) -> Iterator[Celery]:
    app = Celery("unit", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.update(worker_anyio_backend=request.param, task_acks_late=False)

    @app.task(shared=False, name="unit.double")
    async def double(x: int) -> int:
        await anyio.sleep(0.01)
        return 2 * x

    @app.task(shared=False, name="unit.late", acks_late=True)
    async def late(x: int) -> int:
        await anyio.sleep(0.01)
        return x

    @app.task(shared=False, name="unit.exits")
    def exits() -> None:
        raise GeneratorExit

    @app.task(shared=False, name="unit.sleeps")
    async def sleeps(seconds: float) -> str:
        await anyio.sleep(seconds)
        return "slept"

    app.finalize()
    app.set_current()
    yield app
    app.close()


@pytest.fixture
def pool(app: Celery) -> Iterator[Pool]:
    pool = Pool(limit=4, app=app)
    pool.start()
    yield pool
    pool.terminate()


def _wait(predicate: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def test_results_acks_and_states_go_where_celery_puts_them(app: Celery, pool: Pool) -> None:
    acks = Acks()
    early = [make_request(app, "unit.double", (i,), acks) for i in range(10)]
    late = [make_request(app, "unit.late", (i,), acks) for i in range(10)]
    for request in early + late:
        request.execute_using_pool(pool)
    for i, request in enumerate(early):
        assert app.AsyncResult(request.id).get(timeout=10) == 2 * i
    for i, request in enumerate(late):
        assert app.AsyncResult(request.id).get(timeout=10) == i
    _wait(lambda: len(acks.acked) == 20)  # acks_late ones after their result
    assert sorted(acks.acked) == sorted(r.id for r in early + late)


def test_a_sync_task_raising_generator_exit_fails_cleanly(app: Celery, pool: Pool) -> None:
    request = make_request(app, "unit.exits")
    request.execute_using_pool(pool)
    with pytest.raises(TaskExited, match="GeneratorExit"):
        app.AsyncResult(request.id).get(timeout=10)
    following = make_request(app, "unit.double", (21,))
    following.execute_using_pool(pool)
    assert app.AsyncResult(following.id).get(timeout=10) == 42


def test_flush_drops_queued_jobs_and_lets_running_ones_finish(app: Celery, pool: Pool) -> None:
    acks = Acks()
    running = [make_request(app, "unit.sleeps", (0.3,), acks) for _ in range(4)]
    queued = [make_request(app, "unit.sleeps", (0.01,), acks) for _ in range(6)]
    for request in running + queued:
        request.execute_using_pool(pool)
    _wait(lambda: all(r.time_start for r in running))
    pool.flush()
    assert [app.AsyncResult(r.id).get(timeout=10) for r in running] == ["slept"] * 4
    following = make_request(app, "unit.double", (1,))
    following.execute_using_pool(pool)
    assert app.AsyncResult(following.id).get(timeout=10) == 2  # the pool goes on
    assert all(r.time_start is None for r in queued)  # never started: the broker has them
    assert all(app.AsyncResult(r.id).state == "PENDING" for r in queued)


def test_terminate_cancels_the_job_and_reports_nothing(app: Celery, pool: Pool) -> None:
    request = make_request(app, "unit.sleeps", (30,))
    request.execute_using_pool(pool)
    _wait(lambda: request.time_start is not None)
    request.terminate(pool)  # what revoke(terminate=True) does in the worker
    assert app.AsyncResult(request.id).state == "REVOKED"  # type: ignore[comparison-overlap]  # stubs lack it
    info = pool.info
    _wait(lambda: pool.info["running"] == 0)
    assert info["implementation"] == "celery_anyio.pool:Pool"


def test_grow_and_shrink_follow_with_the_threads(app: Celery, pool: Pool) -> None:
    assert pool.info["threads"] == 4
    pool.grow(6)
    _wait(lambda: pool.info["threads"] == 10)
    pool.shrink(8)
    _wait(lambda: pool.info["threads"] == 2)
    assert pool.num_processes == 2


@pytest.mark.parametrize("cold", [False, True], ids=["warm", "cold"])
def test_a_stopped_pool_leaves_no_worker_loop_for_signals(app: Celery, cold: bool) -> None:
    """Async receivers of signals sent after the stop run on a loop of their own."""
    pool = Pool(limit=2, app=app)
    pool.start()
    assert WorkerLoop.token is not None
    if cold:
        pool.terminate()
    else:
        pool.stop()
    assert WorkerLoop.token is None
    assert WorkerLoop.thread is None


@contextlib.asynccontextmanager
async def broken_lifespan(app: Celery) -> AsyncIterator[None]:
    raise ConnectionError("database unreachable")
    yield


def test_task_processes_that_all_fail_to_start_fail_the_start(app: Celery) -> None:
    """Each child's lifespan fails: the start fails, however fast they all exit."""
    app.conf.update(worker_anyio_processes=2, worker_anyio_lifespan=broken_lifespan)
    pool = Pool(limit=2, app=app)
    with pytest.raises(RuntimeError, match=r"task process \d exited while starting"):
        pool.start()
    assert not pool.did_start_ok()
