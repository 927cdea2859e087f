"""One run of one case: a timed drain of pre-loaded tasks, then a paced latency phase.

The drain is timed from the worker's own ready timestamp (the latest one when
several workers or processes announce themselves) to the moment the harness
sees the last result, and counts only the tasks that finished after that
timestamp: two workers on one queue start a second or two apart, and the rate
is the pair's, not the head start of the first.  Its CPU is that of the
workers' process trees over the same span.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cases import Config, Workload
from .drivers import DRIVERS, CeleryDriver, Driver, Outcome
from .workers import BenchError, BenchTimeout, Sampler, Worker, stop_all_workers


@dataclass(frozen=True)
class Environment:
    broker: str
    broker_url: str
    results_url: str
    run_id: str
    log_dir: Path

    def queue(self, *parts: str | int) -> str:
        return "-".join(["bench", self.run_id, *map(str, parts)])


@dataclass(frozen=True)
class LatencyPlan:
    """How many tasks the paced phase publishes, at half the drain's rate."""

    max_n: int
    max_seconds: float  # ... or fewer, so that publishing takes at most this long
    min_n: int = 50
    idle_seconds: float = 0.5

    def count(self, rate: float) -> int:
        return min(self.max_n, max(self.min_n, int(rate * self.max_seconds)))


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest rank."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(1, math.ceil(pct / 100 * len(ordered))) - 1]


def peak_in_flight(outcomes: Sequence[Outcome]) -> int:
    """The most tasks between their own ``started`` and ``finished`` at one moment."""
    events = sorted(
        [(o.started, 1) for o in outcomes] + [(o.finished, -1) for o in outcomes]
    )  # at equal times -1 sorts first: no false overlap
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def wait_done(
    driver: Driver, ids: Sequence[str], timeout: float, alive: Callable[[], bool]
) -> float:
    """``time.time()`` once no task is left; polls every 20 ms."""
    started = time.monotonic()
    while True:
        left = driver.remaining(ids)
        if not left:
            return time.time()
        done = len(ids) - left
        if time.monotonic() - started > timeout:
            rate = done / (time.monotonic() - started)
            raise BenchTimeout(
                f"timeout after {timeout:.0f}s: {done}/{len(ids)} done (~{rate:.0f}/s)"
            )
        if not alive():
            raise BenchError(f"a worker died: {done}/{len(ids)} done")
        time.sleep(0.02)


def check_success(outcomes: Sequence[Outcome]) -> None:
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise BenchError(f"{len(failed)}/{len(outcomes)} tasks failed, e.g. {failed[0].detail}")


def measure(
    env: Environment,
    config: Config,
    workload: Workload,
    n: int,
    run: int,
    timeout: float,
    latency: LatencyPlan | None,
) -> dict[str, Any]:
    """One run; the figures as a JSON-ready dict."""
    queue = env.queue(config.slug, workload.name, f"r{run}")
    driver = DRIVERS[config.system](config, queue, env.broker_url, env.results_url)
    ids: list[str] = []
    workers: list[Worker] = []
    try:
        ids = driver.preload(workload.tasks(n, config.processes))
        stop_all_workers()  # nobody else runs while this drain is timed
        log = env.log_dir / f"{config.slug}-{workload.name}-r{run}"
        workers = [
            Worker(driver.command(i), driver.env(), Path(f"{log}-{i}.log"))
            for i in range(config.workers)
        ]
        sampler = Sampler([worker.pid for worker in workers])
        sampler.start()
        try:
            ready = [worker.wait_ready(config.ready_lines) for worker in workers]
            start = max(ready)
            cpu_before, main_before = sampler.cpu_seconds(), sampler.cpu_seconds(roots_only=True)
            end = wait_done(driver, ids, timeout, lambda: all(w.alive() for w in workers))
            cpu = sampler.cpu_seconds() - cpu_before
            main_cpu = sampler.cpu_seconds(roots_only=True) - main_before
        finally:
            sampler.stop()
        if config.pool == "gevent" and not all(w.gevent_patched for w in workers):
            raise BenchError("gevent worker is not monkey-patched (time.sleep blocks)")
        result: dict[str, Any] = {}
        if config.is_anyio:
            assert isinstance(driver, CeleryDriver)
            result.update(loop_stats(driver, config))
        outcomes = driver.outcomes(ids)
        check_success(outcomes)
        counted = sum(o.finished >= start for o in outcomes)
        result.update(
            seconds=end - start,
            tasks=counted,
            head_start=len(outcomes) - counted,
            cpu_ms_per_task=1000 * cpu / max(counted, 1),
            main_cpu_ms_per_task=1000 * main_cpu / max(counted, 1),
            peak_rss_mb=sampler.peak_rss / 2**20,
            peak_pss_mb=sampler.peak_pss / 2**20,
            peak_in_flight=peak_in_flight(outcomes),
        )
        if latency is not None and isinstance(driver, CeleryDriver):
            try:
                result["latency"] = paced_latency(
                    driver, workers, workload, latency, counted / (end - start) / 2, ids
                )
            except Exception as exc:  # noqa: BLE001 - recorded with the run
                result["latency_error"] = f"{type(exc).__name__}: {exc}"
        for worker in workers:
            # A Celery worker's shutdown overlaps the next run's publishing; the
            # others are blocked reading the stream or list the cleanup deletes.
            if config.system == "celery":
                worker.terminate()
            else:
                worker.stop()
        return result
    except BaseException:
        for worker in workers:
            worker.stop()
        raise
    finally:
        with contextlib.suppress(Exception):
            driver.cleanup(ids)
        driver.close()


def loop_stats(driver: CeleryDriver, config: Config) -> dict[str, Any]:
    """The pool's loop lag p99 (the worst over the workers), read before anything else."""
    try:
        stats = [driver.pool_stats(i) for i in range(config.workers)]
    except Exception as exc:  # noqa: BLE001 - a missing figure, not a failed drain
        return {"stats_error": f"{type(exc).__name__}: {exc}"}
    loops = {s.get("loop") for s in stats}
    if loops != {config.backend}:
        raise BenchError(f"worker reports loop {loops}, expected {config.backend!r}")
    lags = [float((s.get("loop-lag-ms") or {}).get("p99", math.nan)) for s in stats]
    return {"loop": config.backend, "lag_p99_ms": max(lags)}


def paced_latency(
    driver: CeleryDriver,
    workers: Sequence[Worker],
    workload: Workload,
    plan: LatencyPlan,
    rate: float,
    ids: list[str],
) -> dict[str, float]:
    """The same workers, idle again, get tasks at ``rate`` carrying their send time."""
    time.sleep(plan.idle_seconds)
    sent, achieved = driver.paced(workload.tasks(plan.count(rate)), rate)
    ids += sent
    wait_done(driver, sent, 60 + 3 * len(sent) / rate, lambda: all(w.alive() for w in workers))
    outcomes = driver.outcomes(sent)
    check_success(outcomes)
    start = [1000 * (o.started - o.sent) for o in outcomes]
    done = [1000 * ((o.stored or o.finished) - o.sent) for o in outcomes]
    figures = {"n": len(sent), "target_rate": rate, "achieved_rate": achieved}
    for pct in (50, 99):
        figures[f"start_p{pct}"] = percentile(start, pct)
        figures[f"done_p{pct}"] = percentile(done, pct)
    return figures
