"""How long a finished ``acks_late`` task waits for its ack to be sent.

``python -m benchmarks.ack_lag [--broker rabbitmq|redis|both] [-n 3000] [--runs 1]
[--pools threads,anyio-asyncio,...]`` fills a queue with ``n`` tasks that each sleep
50 ms, starts a real worker at ``-c 500`` with a prefetch multiplier of 1 (the fault
suite's shape, ``tests/faults``), waits for every result, stops the worker warmly and
reads what ``benchmarks.acklag_app`` noted per task: the end of the body, the
``task_postrun`` signal (the result is stored) and the moment the consumer sent the
ack. Every finished task whose ack has not reached the broker runs again when the
connection is lost, so this is the window that re-runs come from.

Pools: ``threads`` (Celery's, the reference), ``anyio-asyncio``, ``anyio-trio``,
``anyio-asyncio-p2`` / ``anyio-trio-p2`` (``--processes 2``), and each celery_anyio
one with ``-stock-acks`` appended: the same with the ``acks`` patch switched off
(``CELERY_ANYIO_DISABLE_PATCHES=acks``), acks sent from the hub's next pass as Celery
queues them (with ``--processes 2`` the main process still reads the task processes'
reports before each message). ``CELERY_ANYIO_BENCH_RESULT_THREADS`` sets
``worker_anyio_result_threads`` as for ``benchmarks.run``. Results (and the notes)
in Redis database 13 by default. Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import datetime
from importlib.metadata import version
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import celery
import redis
from celery import Celery

from benchmarks import acklag_app
from benchmarks.harness import percentile
from benchmarks.workers import ROOT

RESULTS_URL = os.environ.get("CELERY_ANYIO_BENCH_ACKLAG_REDIS", "redis://127.0.0.1:6379/13")
BROKERS = {
    "redis": RESULTS_URL,
    "rabbitmq": os.environ.get("CELERY_ANYIO_BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672//"),
}
POOLS = ("threads", "anyio-asyncio", "anyio-trio", "anyio-asyncio-p2", "anyio-asyncio-stock-acks")
CONCURRENCY = 500
SLEEP = 0.05
READY_TIMEOUT = 60.0
RESULT_TIMEOUT = 300.0
STOP_TIMEOUT = 120.0


def worker_args(pool: str) -> tuple[list[str], str, dict[str, str]]:
    """The worker's pool options, the task it runs and extra environment."""
    if pool == "threads":
        return ["-P", "threads"], "benchmarks.acklag_app.sleep_sync", {}
    name = pool.removesuffix("-stock-acks")
    env = {"CELERY_ANYIO_DISABLE_PATCHES": "acks"} if name != pool else {}
    backend = name.removeprefix("anyio-").removesuffix("-p2")
    processes = "2" if name.endswith("-p2") else "1"
    args = ["-P", "celery_anyio:Pool", f"--backend={backend}", "--processes", processes]
    return args, "benchmarks.acklag_app.sleep_async", env


def run_once(pool: str, broker: str, n: int) -> dict[str, list[float]]:
    """One drain; the lags in ms: ``body`` (body end to ack), ``postrun`` (stored to ack)."""
    run = uuid.uuid4().hex[:8]
    queue, key = f"acklag-{run}", f"celery-anyio-acklag:{run}"
    args, task, extra = worker_args(pool)
    env = dict(
        os.environ,
        **extra,
        **{
            acklag_app.BROKER_ENV: BROKERS[broker],
            acklag_app.RESULTS_ENV: RESULTS_URL,
            acklag_app.QUEUE_ENV: queue,
            acklag_app.KEY_ENV: key,
        },
    )
    client = Celery("acklag-client", broker=BROKERS[broker], backend=RESULTS_URL)
    client.conf.update(task_default_queue=queue, result_expires=3600)
    store = redis.Redis.from_url(RESULTS_URL)
    try:
        with client.producer_or_acquire() as producer:
            results = [client.send_task(task, (SLEEP,), producer=producer) for _ in range(n)]
        command = [
            sys.executable, "-m", "celery", "-A", "benchmarks.acklag_app", "worker", *args,
            "-Q", queue, "-n", f"{queue}@%h", "-c", str(CONCURRENCY), "-l", "warning",
            "--without-mingle", "--without-gossip",
        ]  # fmt: skip
        worker = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        try:
            for result in results:
                result.get(timeout=RESULT_TIMEOUT)
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(STOP_TIMEOUT)
        noted = {
            moment: {_text(k): float(v) for k, v in store.hgetall(f"{key}:{moment}").items()}
            for moment in acklag_app.MOMENTS
        }
    finally:
        store.delete(*(f"{key}:{moment}" for moment in acklag_app.MOMENTS))
        for result in results:
            result.forget()
        client.close()
    acks = noted["ack"]
    return {
        moment: [(acks[i] - t) * 1000 for i, t in noted[moment].items() if i in acks]
        for moment in ("body", "postrun")
    }


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def render(rows: Sequence[tuple[str, str, int, dict[str, list[float]]]]) -> str:
    lines = [
        "| broker | pool | tasks | body end → ack ms p50 / p90 / p99 | stored → ack ms p50 / p90 / p99 |",
        "|---|---|---:|---|---|",
    ]
    for broker, pool, n, lags in rows:
        cells = [
            " / ".join(f"{percentile(lags[m], p):.1f}" for p in (50, 90, 99))
            for m in ("body", "postrun")
        ]
        lines.append(f"| {broker} | {pool} | {len(lags['body'])}/{n} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", choices=[*BROKERS, "both"], default="rabbitmq")
    parser.add_argument("-n", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--pools", default=",".join(POOLS))
    options = parser.parse_args(argv)
    brokers = list(BROKERS) if options.broker == "both" else [options.broker]
    pools = [p.strip() for p in options.pools.split(",") if p.strip()]
    print(
        f"# ack lag, {datetime.now().isoformat(timespec='seconds')}, "
        f"Python {platform.python_version()}, celery {celery.__version__}, "
        f"kombu {version('kombu')}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    rows = []
    for broker in brokers:
        for pool in pools:
            for _ in range(options.runs):
                started = time.monotonic()
                lags = run_once(pool, broker, options.n)
                rows.append((broker, pool, options.n, lags))
                print(f"{broker} {pool}: {time.monotonic() - started:.1f} s", flush=True)
    print(render(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
