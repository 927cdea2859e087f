"""A long drain of no-op tasks, pre-loaded into the queue, with the worker's RSS
sampled every second: does memory come back, and does anything get lost?"""

from __future__ import annotations

import time

from .context import FaultEnv, Settings
from .lanes import Lane, close, count, settle
from .report import FaultResult, Row

BATCH = 5000
SAMPLE_EVERY = 1.0
MB = 1024 * 1024


def run(settings: Settings, description: str) -> FaultResult:
    result = FaultResult("soak", settings.broker, description)
    with FaultEnv(settings, "soak", settings.broker) as env:
        for pool in settings.pools:
            # -l warning: at info, Celery's two log lines per task would be most of the work.
            lane = Lane(env, pool, loglevel="warning", ignore_results=True)
            try:
                result.rows.append(_soak(settings, lane))
            except Exception as exc:  # noqa: BLE001 - reported in the row, next pool
                row = Row(pool=pool.name, sent=lane.sent, alive="?")
                row.notes.append(f"harness error: {exc!r}")
                result.rows.append(row)
            finally:
                close([lane])
            result.rows[-1].notes.extend(lane.closing_notes)
    return result


def _soak(settings: Settings, lane: Lane) -> Row:
    n = settings.soak_tasks
    lane.env.client.declare(lane.queue)
    started = time.monotonic()
    messages = lane.drain_messages(n, "noop")
    for start in range(0, n, BATCH):
        lane.publish(messages[start : start + BATCH])
    preload = time.monotonic() - started
    worker = lane.start_worker()
    ready = time.monotonic()
    samples: list[tuple[float, int, int]] = []  # (seconds since ready, rss, tasks ran)

    def sample() -> None:
        now = time.monotonic()
        if samples and now - ready - samples[-1][0] < SAMPLE_EVERY:
            return
        rss = worker.rss()
        if rss is not None:
            samples.append((now - ready, rss, lane.tally.ran()))

    sample()
    settle([lane], settings.stall, deadline=max(900.0, n / 50), on_tick=sample)
    drained = time.monotonic() - ready
    sample()
    row = count(lane)
    if lane.state != "settled":
        row.notes.insert(0, f"did not finish: {lane.state}")
    if samples:
        first, last = samples[0][1], samples[-1][1]
        peak = max(s[1] for s in samples)
        warm = next((s[1] for s in samples if s[2] >= n // 10), first)
        row.extra.update(
            rss_start_mb=first / MB,
            rss_end_mb=last / MB,
            rss_max_mb=peak / MB,
            rss_growth_pct=100.0 * (last - first) / first,
            rss_after_10pct_mb=warm / MB,
            rss_samples=[(round(t, 1), r // MB, ran) for t, r, ran in samples],
        )
        row.notes.insert(
            0,
            f"RSS {first / MB:.0f} MB at start, {last / MB:.0f} at the end, max {peak / MB:.0f}, "
            f"growth {100.0 * (last - first) / first:+.0f}% "
            f"({100.0 * (last - warm) / warm:+.0f}% after the first 10 %)",
        )
    row.extra.update(preload_s=preload, drain_s=drained, tasks_per_s=n / drained)
    row.notes.insert(1, f"{n / drained:.0f} tasks/s; pre-loaded in {preload:.0f}s; results ignored")
    return row
