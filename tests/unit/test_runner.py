"""JobRunner on a real LoopThread, fed and watched the way the pool does it."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import anyio.to_thread
import pytest

from celery_anyio import _backends, bridge
from celery_anyio.jobs import Job, JobRunner
from celery_anyio.loop import LoopThread


class Record:
    """Every callback a job makes, in order, thread-safe."""

    def __init__(self) -> None:
        self.events: list[tuple[int, str, Any]] = []
        self.released: list[int] = []
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)

    def add(self, job_id: int, what: str, value: Any = None) -> None:
        with self.changed:
            self.events.append((job_id, what, value))
            self.changed.notify_all()

    def release(self, job: Job) -> None:
        with self.changed:
            self.released.append(job.id)
            self.changed.notify_all()

    def wait(self, predicate: Any, timeout: float = 10) -> None:
        with self.changed:
            assert self.changed.wait_for(predicate, timeout), self.events

    def of(self, job: Job) -> list[str]:
        return [what for job_id, what, _ in self.events if job_id == job.id]


@pytest.fixture(params=["asyncio", "trio"])
def runner(request: pytest.FixtureRequest) -> Iterator[tuple[JobRunner, LoopThread, Record]]:
    record = Record()
    runner = JobRunner(2, 2, _backends.load(request.param), on_released=record.release)
    loop = LoopThread(request.param, admit=runner.admit)
    runner.attach(loop)
    loop.start()
    yield runner, loop, record
    runner.cancel_all()
    loop.join(10)


def _job(record: Record, target: Any, *args: Any, is_async: bool = True, **options: Any) -> Job:
    holder: list[Job] = []

    def report(what: str) -> Any:
        return lambda *values: record.add(holder[0].id, what, values)

    job = Job(
        target=target,
        args=args,
        kwargs={},
        is_async=is_async,
        accept_callback=report("accepted"),
        callback=report("done"),
        error_callback=report("error"),
        timeout_callback=report("timeout"),
        **options,
    )
    holder.append(job)
    return job


def _await_sleep(seconds: float) -> str:
    """An async job's target as the tracer is: sync code that awaits through the bridge."""
    bridge.await_(anyio.sleep(seconds))
    return "slept"


def test_accept_then_outcome_then_release(runner: Any) -> None:
    jobs, record = runner[0], runner[2]
    job = _job(record, _await_sleep, 0.01)
    jobs.submit(job)
    record.wait(lambda: job.id in record.released)
    assert record.of(job) == ["accepted", "done"]


def test_concurrency_is_a_limit_and_jobs_start_in_order(runner: Any) -> None:
    jobs, record = runner[0], runner[2]
    batch = [_job(record, _await_sleep, 0.05) for _ in range(8)]
    for job in batch:
        jobs.submit(job)
    record.wait(lambda: len(record.released) == 8)
    accepted = [job_id for job_id, what, _ in record.events if what == "accepted"]
    arrived = [job.id for job in batch]
    # Admitted in arrival order; two admitted together may start either way round
    # (trio starts runnable tasks in random order), never further apart than -c.
    assert sorted(accepted) == arrived
    assert max(abs(accepted.index(i) - arrived.index(i)) for i in arrived) < 2
    assert jobs.stats()["running"] == 0


def test_hard_limit_reports_only_the_timeout(runner: Any) -> None:
    jobs, record = runner[0], runner[2]
    job = _job(record, _await_sleep, 30, timeout=0.1)
    jobs.submit(job)
    record.wait(lambda: job.id in record.released)
    assert record.of(job) == ["accepted", "timeout"]
    assert record.events[-1][2] == (False, 0.1)


def test_terminate_reports_nothing_after_accept(runner: Any) -> None:
    jobs, record = runner[0], runner[2]
    job = _job(record, _await_sleep, 30)
    jobs.submit(job)
    record.wait(lambda: record.of(job) == ["accepted"])
    assert jobs.terminate(job.id)
    record.wait(lambda: job.id in record.released)
    assert record.of(job) == ["accepted"]


def test_flush_drops_what_has_not_started(runner: Any) -> None:
    jobs, record = runner[0], runner[2]
    running = [_job(record, _await_sleep, 0.2) for _ in range(2)]
    waiting = [_job(record, _await_sleep, 0.01) for _ in range(3)]
    for job in running + waiting:
        jobs.submit(job)
    record.wait(lambda: all(record.of(job) == ["accepted"] for job in running))
    assert sorted(jobs.flush()) == sorted(job.id for job in waiting)
    record.wait(lambda: len(record.released) == 5)  # dropped ones give their slot back too
    assert all(record.of(job) == [] for job in waiting)
    assert all(record.of(job) == ["accepted", "done"] for job in running)


def _await_gate(gate: threading.Event) -> str:
    """An async job that runs until the test opens ``gate``."""

    bridge.await_(anyio.to_thread.run_sync(gate.wait, abandon_on_cancel=True))
    return "opened"


def test_a_redelivered_copy_waits_for_its_first_delivery(runner: Any) -> None:
    jobs, record = runner[0], runner[2]
    gate = threading.Event()
    first = _job(record, _await_gate, gate, dedupe_id="t1")
    copy = _job(record, _await_sleep, 0, dedupe_id="t1", redelivered=True)
    other = _job(record, _await_sleep, 0, dedupe_id="t2", redelivered=True)
    jobs.submit(first)
    record.wait(lambda: record.of(first) == ["accepted"])
    jobs.submit(copy)
    jobs.submit(other)  # another task's copy: nothing to wait for
    record.wait(lambda: other.id in record.released)
    assert record.of(copy) == []  # a free slot, and still it waits
    gate.set()
    record.wait(lambda: copy.id in record.released)
    assert [job_id for job_id, what, _ in record.events if job_id != other.id] == [
        first.id,
        first.id,
        copy.id,
        copy.id,
    ]


def test_the_same_id_sent_twice_runs_twice_at_once(runner: Any) -> None:
    """Only a redelivered message waits: a client may send an id twice, as in Celery."""
    jobs, record = runner[0], runner[2]
    gate = threading.Event()
    batch = [_job(record, _await_gate, gate, dedupe_id="t1") for _ in range(2)]
    for job in batch:
        jobs.submit(job)
    record.wait(lambda: all(record.of(job) == ["accepted"] for job in batch))
    gate.set()
    record.wait(lambda: len(record.released) == 2)


def test_a_flushed_copy_is_dropped_after_waiting(runner: Any) -> None:
    jobs, record = runner[0], runner[2]
    gate = threading.Event()
    first = _job(record, _await_gate, gate, dedupe_id="t1")
    copy = _job(record, _await_sleep, 0, dedupe_id="t1", redelivered=True)
    jobs.submit(first)
    record.wait(lambda: record.of(first) == ["accepted"])
    jobs.submit(copy)
    assert jobs.flush() == [copy.id]
    gate.set()
    record.wait(lambda: len(record.released) == 2)
    assert record.of(copy) == []


def test_a_sync_job_raising_generator_exit_is_an_error_report(runner: Any) -> None:
    jobs, record = runner[0], runner[2]

    def exits() -> None:
        raise GeneratorExit

    job = _job(record, exits, is_async=False)
    jobs.submit(job)
    record.wait(lambda: job.id in record.released)
    assert record.of(job) == ["accepted", "error"]
    (einfo,) = record.events[-1][2]
    assert type(einfo.exception).__name__ == "TaskExited" or "GeneratorExit" in einfo.traceback
    later = _job(record, _await_sleep, 0.01)
    jobs.submit(later)
    record.wait(lambda: later.id in record.released)  # the loop is still there


def test_warm_stop_waits_for_every_job_and_cancel_cuts_them(runner: Any) -> None:
    jobs, loop, record = runner
    batch = [_job(record, _await_sleep, 0.1) for _ in range(4)]
    for job in batch:
        jobs.submit(job)
    loop.stop()
    assert loop.join(10)
    assert all(record.of(job) == ["accepted", "done"] for job in batch)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_failing_lifespan_is_a_clear_start_error(backend: str) -> None:
    @contextlib.asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        raise ConnectionError("database unreachable")
        yield

    loop = LoopThread(backend, lifespan=lifespan)
    with pytest.raises(RuntimeError, match="lifespan failed to start: ConnectionError"):
        loop.start()
    assert loop.join(5)
