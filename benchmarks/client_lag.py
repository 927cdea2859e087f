"""How late the caller's event loop runs while many coroutines use the async client.

``python -m benchmarks.client_lag [--backend asyncio|trio|both] [-n 200] [--rounds 5]``
starts a real ``celery worker -P celery_anyio:Pool`` (``benchmarks.benchapp``,
on its own queue; Redis database 13 for broker and results by default), then,
in this process on the chosen AnyIO backend, runs rounds of ``n`` concurrent
clients that each ``await sig.adelay()`` a task awaiting 50 ms and then
``await result.aget()``, while a probe sleeps 1 ms over and over and records
how late it woke up: the loop lag every other coroutine of the program sees.

The ``asgi`` variant does the same through a Starlette app (``n`` concurrent
requests to an endpoint that sends and awaits a result, over httpx's in-process
ASGI transport, so no sockets) and meanwhile times two ping endpoints requested
every 10 ms, an ``async def`` one and a ``def`` one (which Starlette and FastAPI
run in AnyIO's default thread limiter).  The first round of each variant warms
the client's connections and threads up and is reported apart.  ``--threads``
sets the client's thread limit (``--threads 40`` is the old behaviour, which ran
the client's calls in AnyIO's default limiter of 40).  Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio
import anyio.to_thread
import celery
import redis
from celery import Celery

import celery_anyio  # noqa: F401 - adds adelay/aget to Celery's classes
from benchmarks.cases import anyio as anyio_config
from benchmarks.drivers import CeleryDriver, forget_redis_bindings
from benchmarks.harness import Environment, percentile
from benchmarks.workers import ROOT, Worker
from celery_anyio import aio

REDIS_URL = os.environ.get("CELERY_ANYIO_BENCH_CLIENT_REDIS", "redis://127.0.0.1:6379/13")
AMQP_URL = os.environ.get("CELERY_ANYIO_BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
BROKERS = {"redis": REDIS_URL, "rabbitmq": AMQP_URL}
TASK = "bench.io_async"  # awaits its first argument, in seconds
PROBE_TICK = 0.001
PING_PERIOD = 0.01  # each ping endpoint is requested every 10 ms
PING_PATHS = ("/ping", "/ping-sync")
RESULT_TIMEOUT = 60.0
BACKENDS = ("asyncio", "trio")
VARIANTS = ("loop", "asgi")


@dataclass
class Round:
    """One round: ``n`` concurrent send + wait, and what the loop went through."""

    seconds: float = 0.0
    lags: list[float] = field(default_factory=list)
    sends: list[float] = field(default_factory=list)  # how long each adelay took
    trips: list[float] = field(default_factory=list)  # adelay start to aget's return
    pings: dict[str, list[float]] = field(default_factory=dict)  # per path (asgi only)


async def probe(lags: list[float]) -> None:
    """Sleep ``PROBE_TICK`` over and over; record how late each wake-up was."""
    while True:
        start = anyio.current_time()
        await anyio.sleep(PROBE_TICK)
        lags.append(max(anyio.current_time() - start - PROBE_TICK, 0.0))


Ping = Callable[[], Awaitable[None]]


async def run_round(
    sample: Round,
    work: Callable[[Round], Coroutine[Any, Any, None]],
    n: int,
    pings: Mapping[str, Ping],
) -> Round:
    """``n`` concurrent ``work`` calls, with the lag probe (and the pingers) beside them."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(probe, sample.lags)
        for path, ping in pings.items():
            tg.start_soon(ping_forever, ping, sample.pings.setdefault(path, []))
        await anyio.sleep(0.05)  # a few idle ticks first: the probe is running
        started = anyio.current_time()
        async with anyio.create_task_group() as clients:
            for _ in range(n):
                clients.start_soon(work, sample)
        sample.seconds = anyio.current_time() - started
        tg.cancel_scope.cancel()
    return sample


async def ping_forever(ping: Ping, latencies: list[float]) -> None:
    """Start a ping every ``PING_PERIOD``; record each one's latency from when it was due.

    Due times are fixed in advance, as requests arriving from outside would be, so
    a ping that the loop starts late counts that delay too.
    """

    async def one(due: float) -> None:
        await ping()
        latencies.append(anyio.current_time() - due)

    async with anyio.create_task_group() as tg:
        first = anyio.current_time()
        for k in itertools.count():
            due = first + k * PING_PERIOD
            await anyio.sleep(max(due - anyio.current_time(), 0.0))
            tg.start_soon(one, due)


async def send_and_wait(sig: Any, sample: Round, ids: list[str]) -> Any:
    """``await sig.adelay()`` then ``await result.aget()``, timed."""
    started = anyio.current_time()
    result = await sig.adelay()
    sample.sends.append(anyio.current_time() - started)
    ids.append(result.id)
    value = await result.aget(timeout=RESULT_TIMEOUT)
    sample.trips.append(anyio.current_time() - started)
    if not (isinstance(value, list) and len(value) == 3):
        raise RuntimeError(f"unexpected result {value!r}")
    return value


def client_threads() -> str:
    """The client's thread limit, as this checkout's ``celery_anyio.aio`` sets it."""
    limiter = getattr(aio, "client_limiter", None)  # absent before the client had its own
    if limiter is None:
        default = anyio.to_thread.current_default_thread_limiter().total_tokens
        return f"{default:g} (AnyIO's default limiter)"
    return f"{limiter().total_tokens:g}"


async def bench_loop(app: Celery, args: argparse.Namespace, ids: list[str]) -> list[Round]:
    sig = app.signature(TASK, args=(args.task_seconds,))

    async def work(sample: Round) -> None:
        await send_and_wait(sig, sample, ids)

    return [await run_round(Round(), work, args.concurrency, {}) for _ in range(args.rounds + 1)]


async def bench_asgi(app: Celery, args: argparse.Namespace, ids: list[str]) -> list[Round]:
    """The same through a Starlette app, and two ping endpoints: async and sync.

    Starlette (and FastAPI) run a ``def`` endpoint in AnyIO's default thread
    limiter, so the sync one also shows whether the client leaves it free.
    """
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    sig = app.signature(TASK, args=(args.task_seconds,))
    rounds: list[Round] = []

    async def task(request: Request) -> JSONResponse:
        return JSONResponse(await send_and_wait(sig, rounds[-1], ids))

    async def pong(request: Request) -> JSONResponse:
        return JSONResponse("pong")

    def pong_sync(request: Request) -> JSONResponse:
        return JSONResponse("pong")

    routes = [Route("/task", task), Route("/ping", pong), Route("/ping-sync", pong_sync)]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    transport = httpx.ASGITransport(app=Starlette(routes=routes))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://app", limits=limits, timeout=RESULT_TIMEOUT
    ) as http:

        def pinger(path: str) -> Ping:
            async def ping() -> None:
                (await http.get(path)).raise_for_status()

            return ping

        async def request(sample: Round) -> None:
            (await http.get("/task")).raise_for_status()

        pings = {path: pinger(path) for path in PING_PATHS}
        for _ in range(args.rounds + 1):
            rounds.append(Round())
            await run_round(rounds[-1], request, args.concurrency, pings)
    return rounds


async def bench(variant: str, app: Celery, args: argparse.Namespace) -> tuple[str, list[Round]]:
    """One variant on the running loop: its client thread limit and its rounds."""
    if args.threads is not None:
        aio.client_limiter().total_tokens = args.threads
    threads = client_threads()
    ids: list[str] = []
    run = bench_loop if variant == "loop" else bench_asgi
    try:
        rounds = await run(app, args, ids)
    finally:
        await anyio.to_thread.run_sync(lambda: cleanup_results(ids))
    return threads, rounds


def cleanup_results(ids: list[str]) -> None:
    with redis.Redis.from_url(REDIS_URL) as client:
        for k in range(0, len(ids), 500):
            client.delete(*[f"celery-task-meta-{i}" for i in ids[k : k + 500]])


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def row(backend: str, variant: str, threads: str, label: str, rounds: list[Round]) -> str:
    lags = [lag for r in rounds for lag in r.lags]
    trips = [t for r in rounds for t in r.trips]
    sends = [s for r in rounds for s in r.sends]
    rate = len(trips) / sum(r.seconds for r in rounds)
    ping = []
    for path in PING_PATHS:
        pings = [p for r in rounds for p in r.pings.get(path, [])]
        ping.append(f"{ms(percentile(pings, 99))} / {ms(max(pings))}" if pings else "-")
    return (
        f"| {backend} | {variant} | {threads} | {label} | {ms(percentile(lags, 50))} | "
        f"{ms(percentile(lags, 99))} | {ms(max(lags))} | {rate:.0f} | "
        f"{ms(percentile(sends, 99))} | {ms(percentile(trips, 99))} | {' | '.join(ping)} |"
    )


HEADER = (
    "| client | variant | client threads | rounds | lag p50 ms | lag p99 ms | lag max ms | "
    "round trips/s | adelay p99 ms | adelay+aget p99 ms | /ping p99 / max ms | "
    "sync /ping p99 / max ms |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=[*BACKENDS, "both"], default="both")
    parser.add_argument("--variant", choices=[*VARIANTS, "both"], default="both")
    parser.add_argument("-n", "--concurrency", type=int, default=200, help="concurrent clients")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (plus a warm-up)")
    parser.add_argument("--task-seconds", type=float, default=0.05, help="what each task awaits")
    parser.add_argument("--broker", choices=sorted(BROKERS), default="redis")
    parser.add_argument("--worker-backend", choices=BACKENDS, default="asyncio")
    parser.add_argument("--worker-concurrency", type=int, default=500)
    parser.add_argument(
        "--threads", type=int, default=None, help="set aio.client_limiter().total_tokens"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    run_id = uuid.uuid4().hex[:8]
    env = Environment(
        broker=args.broker,
        broker_url=BROKERS[args.broker],
        results_url=REDIS_URL,
        run_id=run_id,
        log_dir=ROOT / "benchmarks" / "results" / "logs" / f"client-lag-{run_id}",
    )
    queue = env.queue("client-lag")
    config = anyio_config(args.worker_backend, args.worker_concurrency)
    driver = CeleryDriver(config, queue, env.broker_url, REDIS_URL)
    command = driver.command(0)
    app = Celery("client-lag", broker=env.broker_url, backend=REDIS_URL, set_as_current=False)
    app.conf.update(task_default_queue=queue, result_expires=600)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    print(
        f"{datetime.now():%Y-%m-%d %H:%M}, commit {commit or '?'} (+ working tree), "
        f"{platform.python_version()}, Celery {celery.__version__}, {os.cpu_count()} cores, "
        f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}; worker "
        f"{' '.join(command[1:])}; broker {args.broker}, results {REDIS_URL}; "
        f"{args.concurrency} concurrent clients, {args.task_seconds * 1000:g} ms tasks, "
        f"{args.rounds} rounds after a warm-up\n",
        flush=True,
    )
    backends = BACKENDS if args.backend == "both" else (args.backend,)
    variants = VARIANTS if args.variant == "both" else (args.variant,)
    worker = Worker(command, driver.env(), env.log_dir / "worker.log")
    try:
        worker.wait_ready()
        print(HEADER, flush=True)
        for backend in backends:
            for variant in variants:
                threads, rounds = anyio.run(bench, variant, app, args, backend=backend)
                print(row(backend, variant, threads, "warm-up", rounds[:1]), flush=True)
                print(row(backend, variant, threads, str(args.rounds), rounds[1:]), flush=True)
    finally:
        worker.stop()
        driver.cleanup([])
        driver.close()
        app.close()
        if args.broker == "redis":
            forget_redis_bindings(REDIS_URL, run_id)
    print(f"\nload {' '.join(f'{x:.2f}' for x in os.getloadavg())}; worker log {worker.log_path}")


if __name__ == "__main__":
    main()
