"""Worker process management, publishing and measurement for the benchmarks.

Every measurement runs a real ``python -m celery -A benchmarks.benchapp worker``
subprocess on its own queue; tasks store their results in Redis, and the
harness counts results by ``EXISTS`` on ``celery-task-meta-<id>`` keys.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import redis
from celery import Celery
from kombu import Connection, Exchange, Queue

from .benchapp import BACKEND_OPTIONS_ENV, BROKER_ENV, QUEUE_ENV, READY_MARKER, RESULTS_ENV

ROOT = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "celery-task-meta-"
ANYIO_POOL = "celery_anyio:Pool"
STOP_GRACE_SECONDS = 20.0
READY_TIMEOUT_SECONDS = 60.0
SAMPLE_INTERVAL = 0.05
CHUNK = 500
STATS_TIMEOUT_SECONDS = 5.0
HOSTNAME = socket.gethostname()
LOGLEVEL_ENV = "CELERY_ANYIO_BENCH_LOGLEVEL"  # the workers' -l (default warning)

Message = tuple[str, list[Any]]  # task name, positional args (without ``sent``)


class BenchError(RuntimeError):
    """A measurement failed; the message goes into the results table."""


class BenchTimeout(BenchError):
    """Not every result arrived in time (the harness does not repeat such a case)."""


# -- what is measured -----------------------------------------------------------------


@dataclass(frozen=True)
class PoolConfig:
    """One worker configuration: pool, concurrency and (celery_anyio) backend.

    ``uvloop`` (asyncio only) sets ``worker_anyio_backend_options =
    {"use_uvloop": True}`` in the worker's app, through the environment.
    """

    pool: str
    concurrency: int
    backend: str | None = None
    uvloop: bool = False
    prefetch: int | None = None  # the worker's prefetch multiplier, when not the default

    @property
    def is_async(self) -> bool:
        return self.pool == ANYIO_POOL

    @property
    def variant(self) -> str:
        """``asyncio``, ``uvloop`` or ``trio`` for celery_anyio, else the pool name."""
        if not self.is_async:
            return self.pool
        return "uvloop" if self.uvloop else str(self.backend)

    @property
    def label(self) -> str:
        if self.is_async:
            return f"anyio-{self.variant} -c {self.concurrency}"
        if self.pool == "solo":
            return "solo"
        if self.prefetch is not None:
            return f"{self.pool} -c {self.concurrency} (prefetch {self.prefetch})"
        return f"{self.pool} -c {self.concurrency}"

    @property
    def backend_options(self) -> dict[str, Any]:
        return {"use_uvloop": True} if self.uvloop else {}

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.label.lower()).strip("-")

    @property
    def prefetch_multiplier(self) -> int:
        if self.prefetch is not None:
            return self.prefetch
        # Enough prefetch to keep every slot busy, without 4 x 10000 messages.
        return 1 if self.concurrency >= 1000 else 4

    def worker_args(self) -> list[str]:
        args = ["-P", self.pool, "-c", str(self.concurrency)]
        if self.backend:
            args.append(f"--backend={self.backend}")
        return [*args, "--prefetch-multiplier", str(self.prefetch_multiplier)]


@dataclass(frozen=True)
class Workload:
    """``n`` messages of one kind; ``task_seconds`` is the mean task duration."""

    name: str
    n: int
    io_seconds: float = 0.0
    hold: bool = False  # tasks wait until all ``n`` have started (then ``io_seconds``)
    reserve: bool = False  # tasks wait until the worker has received all ``n``
    cpu_ms: float = 0.0
    cpu_every: int = 0  # every k-th message is the CPU task (0: none)

    @property
    def waits_for_all(self) -> bool:
        """Whether every task waits for the others (no paced latency phase, no caps)."""
        return self.hold or self.reserve

    @property
    def task_seconds(self) -> float:
        if not self.cpu_every:
            return self.io_seconds
        share = 1 / self.cpu_every
        return (1 - share) * self.io_seconds + share * self.cpu_ms / 1000

    def messages(self, is_async: bool, n: int | None = None) -> list[Message]:
        suffix = "async" if is_async else "sync"
        out: list[Message] = []
        for i in range(self.n if n is None else n):
            if self.cpu_every and i % self.cpu_every == self.cpu_every - 1:
                out.append((f"bench.cpu_{suffix}", [self.cpu_ms]))
            elif self.reserve:
                out.append(("bench.reserved_sync", [self.n if n is None else n]))
            elif self.hold:
                out.append((f"bench.hold_{suffix}", [self.io_seconds, self.n if n is None else n]))
            elif self.io_seconds:
                out.append((f"bench.io_{suffix}", [self.io_seconds]))
            else:
                out.append((f"bench.noop_{suffix}", []))
        return out


@dataclass
class Environment:
    """Where to publish, where results go, and where worker logs are kept."""

    broker: str
    broker_url: str
    results_url: str
    run_id: str
    log_dir: Path

    def queue(self, *parts: str | int) -> str:
        return "-".join(["bench", self.run_id, *map(str, parts)])

    def worker_env(self, queue: str, config: PoolConfig) -> dict[str, str]:
        env = dict(os.environ)
        env.pop(BACKEND_OPTIONS_ENV, None)
        env.update(
            {
                BROKER_ENV: self.broker_url,
                RESULTS_ENV: self.results_url,
                QUEUE_ENV: queue,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
                "PYTHONUNBUFFERED": "1",
            }
        )
        if config.backend_options:
            env[BACKEND_OPTIONS_ENV] = json.dumps(config.backend_options)
        return env


# -- worker processes -----------------------------------------------------------------

_LIVE: set[Worker] = set()


@dataclass(eq=False)
class Worker:
    """A ``celery worker`` subprocess in its own session, logging to ``log_path``."""

    env: Environment
    config: PoolConfig
    queue: str
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    ready_ts: float = 0.0
    gevent_patched: bool = False
    _log_offset: int = 0
    _log_tail: str = ""
    _terminated_at: float = 0.0

    @property
    def nodename(self) -> str:
        return f"{self.queue}@{HOSTNAME}"

    def command(self) -> list[str]:
        # ``python -m celery`` applies gevent's monkey-patching for ``-P gevent``,
        # as the ``celery`` script does.
        return [
            sys.executable, "-m", "celery", "-A", "benchmarks.benchapp", "worker",
            "-Q", self.queue, "-n", self.nodename, "-l", os.environ.get(LOGLEVEL_ENV, "warning"),
            "--without-mingle", "--without-gossip", *self.config.worker_args(),
        ]  # fmt: skip

    def start(self) -> Worker:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command(),
                cwd=ROOT,
                env=self.env.worker_env(self.queue, self.config),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _LIVE.add(self)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, timeout: float = READY_TIMEOUT_SECONDS) -> float:
        """Wait for the ready line; return the worker's own ready timestamp."""
        pattern = re.compile(re.escape(READY_MARKER) + r"([0-9.]+) gevent-patched=([01])")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = pattern.search(self._read_new_log())
            if match:
                self.ready_ts = float(match.group(1))
                self.gevent_patched = match.group(2) == "1"
                if self.config.pool == "gevent" and not self.gevent_patched:
                    raise BenchError("gevent worker is not monkey-patched (time.sleep blocks)")
                return self.ready_ts
            if not self.alive():
                raise BenchError(f"worker exited before ready (rc={self.process_rc()})")
            time.sleep(0.005)
        raise BenchError(f"worker not ready in {timeout:.0f}s")

    def _read_new_log(self) -> str:
        with self.log_path.open("rb") as log:
            log.seek(self._log_offset)
            data = log.read()
        self._log_offset += len(data)
        # Keep a little of the previous read: the marker may straddle two reads.
        text = self._log_tail + data.decode(errors="replace")
        self._log_tail = text[-200:]
        return text

    def process_rc(self) -> int | None:
        return self.process.returncode if self.process else None

    def terminate(self) -> None:
        """Ask for a warm shutdown (SIGTERM) without waiting for it."""
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)
            self._terminated_at = time.monotonic()

    def stop(self) -> None:
        """SIGTERM (warm shutdown), SIGKILL to the whole session after 20 s."""
        process = self.process
        if process is None:
            return
        try:
            if process.poll() is None:
                if not self._terminated_at:
                    self.terminate()
                grace = STOP_GRACE_SECONDS - (time.monotonic() - self._terminated_at)
                try:
                    process.wait(max(grace, 0.01))
                except subprocess.TimeoutExpired:
                    _killpg(process.pid)
                    process.wait(5)
            _killpg(process.pid)  # anything the worker left behind in its session
        finally:
            _LIVE.discard(self)


def _killpg(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


@atexit.register
def stop_all_workers(keep: Worker | None = None) -> None:
    """Stop (or wait for the shutdown of) every worker we started but ``keep``."""
    for worker in list(_LIVE):
        if worker is not keep:
            with contextlib.suppress(Exception):
                worker.stop()


@contextlib.contextmanager
def running_worker(
    env: Environment, config: PoolConfig, queue: str, log_name: str
) -> Iterator[Worker]:
    """A started worker; on the way out only SIGTERM it when all went well.

    Its shutdown then overlaps with the harness's bookkeeping and the next
    worker's start-up; measurements call :func:`stop_all_workers` before they
    start timing (which waits, and SIGKILLs after 20 s as :meth:`Worker.stop`).
    """
    worker = Worker(env, config, queue, env.log_dir / f"{log_name}.log")
    try:
        yield worker.start()
    except BaseException:
        worker.stop()
        raise
    worker.terminate()


class Sampler(threading.Thread):
    """Samples RSS (every 50 ms) and CPU time of a process and its descendants."""

    def __init__(self, pid: int, interval: float = SAMPLE_INTERVAL) -> None:
        super().__init__(name="bench-sampler", daemon=True)
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_rss = 0
        self._procs: dict[int, psutil.Process] = {}
        self._cpu: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop_event = threading.Event()

    def _tree(self) -> list[psutil.Process]:
        try:
            found = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return []
        for proc in found:  # keep the Process objects: they remember create times
            self._procs.setdefault(proc.pid, proc)
        return [self._procs[proc.pid] for proc in found]

    def sample(self) -> None:
        rss = 0
        with self._lock:
            for proc in self._tree():
                try:
                    with proc.oneshot():
                        rss += proc.memory_info().rss
                        times = proc.cpu_times()
                except psutil.Error:
                    continue  # exited: keep its last CPU reading
                self._cpu[proc.pid] = times.user + times.system
        self.peak_rss = max(self.peak_rss, rss)

    def cpu_seconds(self) -> float:
        """User + system CPU of the tree so far (exited processes: last reading)."""
        self.sample()
        with self._lock:
            return sum(self._cpu.values())

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(2)


class NeighbourWatch(threading.Thread):
    """Notes other processes busy on this machine: they skew every number."""

    IGNORED = frozenset({"redis-server", "beam.smp", "epmd"})  # the brokers are part of it

    def __init__(self, interval: float = 2.0, threshold: float = 20.0) -> None:
        super().__init__(name="bench-neighbours", daemon=True)
        self.interval = interval
        self.threshold = threshold
        self.samples = 0
        self.busy: dict[str, tuple[float, int]] = {}  # command -> (max %CPU, samples)
        self._stop_event = threading.Event()

    def sample(self) -> None:
        me = psutil.Process()
        ours = {me.pid, *(child.pid for child in me.children(recursive=True))}
        for proc in psutil.process_iter(["name", "cmdline"]):
            if proc.pid in ours or proc.info["name"] in self.IGNORED:
                continue
            try:
                usage = proc.cpu_percent(None)
            except psutil.Error:
                continue
            if usage >= self.threshold:
                command = " ".join(proc.info["cmdline"] or [proc.info["name"] or "?"])[:90]
                peak, seen = self.busy.get(command, (0.0, 0))
                self.busy[command] = (max(peak, usage), seen + 1)
        self.samples += 1

    def run(self) -> None:
        self.sample()  # primes cpu_percent
        self.samples = 0
        self.busy.clear()
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)

    def summary(self, limit: int = 3) -> str:
        top = sorted(self.busy.items(), key=lambda item: -item[1][1])[:limit]
        return "; ".join(
            f"`{command}` (up to {peak:.0f}% CPU, in {seen}/{self.samples} samples)"
            for command, (peak, seen) in top
        )


# -- broker and results ---------------------------------------------------------------


class Publisher:
    """Sends benchmark tasks by name from a client app that has no result backend.

    Without a backend the client never subscribes to result channels; the
    worker's app stores every result in Redis as usual.
    """

    def __init__(self, broker_url: str, queue: str) -> None:
        self.queue = queue
        self.app = Celery("bench-client", broker=broker_url, set_as_current=False)
        self.app.conf.update(task_default_queue=queue, broker_connection_retry_on_startup=True)

    def preload(self, messages: Sequence[Message]) -> list[str]:
        """Publish all ``messages`` as fast as possible (untimed).

        kombu >= 5.7 batches publishes on Redis (one pipeline per 500 LPUSHes),
        which makes pre-loading ~3x faster; other transports publish one by one.
        """
        ids = []
        with self.app.producer_or_acquire() as producer:
            batch = getattr(producer, "batch", None)
            with batch(max_size=500) if batch is not None else contextlib.nullcontext():
                for name, args in messages:
                    ids.append(self.app.send_task(name, args=args, producer=producer).id)
        return ids

    def paced(self, messages: Sequence[Message], rate: float) -> tuple[list[str], float]:
        """Publish at ``rate``/s with ``time.time()`` appended to the args.

        Returns the ids and the achieved rate; a message that is late is sent at
        once, and its latency is measured from when it was actually sent.
        """
        ids = []
        with self.app.producer_or_acquire() as producer:
            start = time.perf_counter()
            for i, (name, args) in enumerate(messages):
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                sent = time.time()
                ids.append(self.app.send_task(name, args=[*args, sent], producer=producer).id)
            elapsed = time.perf_counter() - start
        achieved = (len(ids) - 1) / elapsed if elapsed > 0 and len(ids) > 1 else rate
        return ids, achieved

    def reset_queue(self, delete: bool = False) -> None:
        """Declare and purge the queue (``delete``: remove it and its binding)."""
        reset_queue(self.app.connection_for_write(), self.queue, delete)

    def close(self) -> None:
        self.app.close()


def reset_queue(connection: Connection, name: str, delete: bool = False) -> None:
    queue = Queue(name, Exchange(name, "direct"), routing_key=name)
    with connection as conn:
        bound = queue(conn.default_channel)
        bound.declare()
        bound.purge()
        if delete:
            bound.delete()


class Results:
    """Counts and reads task results stored by the Redis result backend."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)

    def wait_all(
        self, ids: Sequence[str], timeout: float, alive: Callable[[], bool], poll: float = 0.02
    ) -> float:
        """Return ``time.time()`` once every result exists.

        ``EXISTS`` over 500 keys at a time, oldest first, and only up to the
        first chunk that is not complete yet: tasks finish roughly in order, so
        each poll costs a couple of cheap commands.
        """
        chunks = [
            [RESULT_PREFIX + i for i in ids[k : k + CHUNK]] for k in range(0, len(ids), CHUNK)
        ]
        done = partial = 0
        started = time.monotonic()
        deadline = started + timeout
        while True:
            while chunks:
                partial = int(self.client.exists(*chunks[0]))
                if partial < len(chunks[0]):
                    break
                done += len(chunks.pop(0))
                partial = 0
            if not chunks:
                return time.time()
            if time.monotonic() > deadline:
                count = done + partial
                raise BenchTimeout(
                    f"timeout after {timeout:.0f}s: {count}/{len(ids)} done "
                    f"(~{count / (time.monotonic() - started):.0f}/s)"
                )
            if not alive():
                raise BenchError(f"worker died: {done + partial}/{len(ids)} done")
            time.sleep(poll)

    def metas(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for k in range(0, len(ids), CHUNK):
            raw = self.client.mget([RESULT_PREFIX + i for i in ids[k : k + CHUNK]])
            out.extend(json.loads(value) if value else {} for value in raw)
        return out

    def delete(self, ids: Sequence[str]) -> None:
        for k in range(0, len(ids), CHUNK):
            self.client.delete(*[RESULT_PREFIX + i for i in ids[k : k + CHUNK]])

    def close(self) -> None:
        self.client.close()


def check_success(metas: Sequence[dict[str, Any]]) -> None:
    failed = [meta for meta in metas if meta.get("status") != "SUCCESS"]
    if failed:
        first = failed[0]
        detail = str(first.get("result") or first.get("status") or "missing")[:120]
        raise BenchError(f"{len(failed)}/{len(metas)} tasks not SUCCESS, e.g. {detail}")


# -- measurements ---------------------------------------------------------------------


@dataclass
class DrainResult:
    """One drain: ``n`` pre-loaded messages, worker ready -> last result stored."""

    n: int
    seconds: float
    cpu_seconds: float
    peak_rss: int
    peak_in_flight: int = 0  # most tasks between started and finished at one moment
    loop: str | None = None  # celery_anyio: ``pool.loop`` from ``inspect stats``
    loop_lag_ms: dict[str, float] | None = None  # ... and ``pool["loop-lag-ms"]``
    stats_error: str = ""

    @property
    def rate(self) -> float:
        return self.n / self.seconds

    @property
    def cpu_ms_per_task(self) -> float:
        return 1000 * self.cpu_seconds / self.n


@dataclass
class LatencyResult:
    n: int
    target_rate: float
    achieved_rate: float
    start_ms: list[float] = field(default_factory=list)
    done_ms: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class LatencyPlan:
    """How many messages the paced phase publishes at half the drain rate."""

    max_n: int
    max_seconds: float  # ... or fewer, so that publishing takes at most this long
    min_n: int = 50
    idle_seconds: float = 0.5

    def count(self, rate: float) -> int:
        return min(self.max_n, max(self.min_n, int(rate * self.max_seconds)))


@dataclass
class RunResult:
    drain: DrainResult
    latency: LatencyResult | None = None
    latency_error: str = ""


def pool_stats(
    app: Celery, nodename: str, timeout: float = STATS_TIMEOUT_SECONDS
) -> dict[str, Any]:
    """The ``pool`` section of one worker's ``inspect stats`` (remote control via the broker)."""
    replies = app.control.inspect(destination=[nodename], timeout=timeout).stats()
    if not replies or nodename not in replies:
        raise BenchError(f"no `inspect stats` reply from the worker in {timeout:.0f}s")
    return dict(replies[nodename].get("pool") or {})


def measure_run(
    env: Environment,
    config: PoolConfig,
    workload: Workload,
    n: int,
    run: int,
    timeout: float,
    latency: LatencyPlan | None,
) -> RunResult:
    """One run of a case: a timed drain, then (same worker) a paced latency phase.

    The drain pre-loads ``n`` messages, starts a worker and times its ready
    timestamp -> the last result stored; for celery_anyio it then reads the
    loop lag from ``inspect stats`` before anything else happens. The worker,
    idle again, then gets ``latency.count(rate)`` messages published at half
    this run's drain rate, each carrying its publish time.
    """
    queue = env.queue(config.slug, workload.name, f"r{run}")
    publisher = Publisher(env.broker_url, queue)
    results = Results(env.results_url)
    ids: list[str] = []
    latency_ids: list[str] = []
    try:
        publisher.reset_queue()
        ids = publisher.preload(workload.messages(config.is_async, n))
        stop_all_workers()  # the drain is timed from start-up: nobody else running
        with running_worker(env, config, queue, f"{config.slug}-{workload.name}-r{run}") as worker:
            sampler = Sampler(worker.pid)
            sampler.start()
            try:
                ready = worker.wait_ready()
                cpu_before = sampler.cpu_seconds()
                finished = results.wait_all(ids, timeout, worker.alive)
                cpu_after = sampler.cpu_seconds()
            finally:
                sampler.stop()
            drain = DrainResult(n, finished - ready, cpu_after - cpu_before, sampler.peak_rss)
            if config.is_async:
                _read_loop_stats(publisher.app, worker, drain)
            metas = results.metas(ids)
            check_success(metas)
            drain.peak_in_flight = peak_in_flight(metas)
            outcome = RunResult(drain)
            if latency is not None:
                try:
                    outcome.latency = _paced_latency(
                        publisher, results, worker, workload, latency, drain.rate / 2, latency_ids
                    )
                except Exception as exc:  # noqa: BLE001 - recorded with the case
                    outcome.latency_error = f"{type(exc).__name__}: {exc}"
        return outcome
    finally:
        _cleanup(publisher, results, [*ids, *latency_ids])


def _read_loop_stats(app: Celery, worker: Worker, drain: DrainResult) -> None:
    try:
        stats = pool_stats(app, worker.nodename)
    except Exception as exc:  # noqa: BLE001 - a missing figure, not a failed drain
        drain.stats_error = f"{type(exc).__name__}: {exc}"
        return
    drain.loop = stats.get("loop")
    lag = stats.get("loop-lag-ms")
    drain.loop_lag_ms = {k: float(v) for k, v in lag.items()} if isinstance(lag, dict) else None
    if drain.loop != worker.config.variant:
        raise BenchError(f"worker reports loop {drain.loop!r}, expected {worker.config.variant!r}")


def _paced_latency(
    publisher: Publisher,
    results: Results,
    worker: Worker,
    workload: Workload,
    plan: LatencyPlan,
    rate: float,
    ids: list[str],
) -> LatencyResult:
    n = plan.count(rate)
    time.sleep(plan.idle_seconds)
    sent_ids, achieved = publisher.paced(workload.messages(worker.config.is_async, n), rate)
    ids.extend(sent_ids)
    results.wait_all(ids, 60 + 3 * n / rate, worker.alive)
    metas = results.metas(ids)
    check_success(metas)
    outcome = LatencyResult(n, rate, achieved)
    for meta in metas:
        sent, started, _ = meta["result"]
        done = datetime.fromisoformat(meta["date_done"]).timestamp()
        outcome.start_ms.append(1000 * (started - sent))
        outcome.done_ms.append(1000 * (done - sent))
    return outcome


def _cleanup(publisher: Publisher, results: Results, ids: Sequence[str]) -> None:
    with contextlib.suppress(Exception):
        publisher.reset_queue(delete=True)
    with contextlib.suppress(Exception):
        results.delete(ids)
    publisher.close()
    results.close()


def peak_in_flight(metas: Sequence[dict[str, Any]]) -> int:
    """The largest number of tasks between their ``started`` and ``finished`` stamps."""
    events: list[tuple[float, int]] = []
    for meta in metas:
        _, started, finished = meta["result"]
        events += [(started, 1), (finished, -1)]
    running = peak = 0
    for _, step in sorted(events):  # at equal times, -1 sorts first: no false overlap
        running += step
        peak = max(peak, running)
    return peak


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def log_problems(log_dir: Path, limit: int = 5) -> dict[str, list[str]]:
    """Error/warning lines from worker logs (except the expected ones), per log."""
    interesting = re.compile(r"(ERROR|CRITICAL|WARNING)/|Traceback|Error:")
    expected = (READY_MARKER, "SecurityWarning", "superuser privileges")
    problems: dict[str, list[str]] = {}
    for path in sorted(log_dir.glob("*.log")):
        lines = [
            line.strip()
            for line in path.read_text(errors="replace").splitlines()
            if interesting.search(line) and not any(skip in line for skip in expected)
        ]
        if lines:
            problems[path.name] = list(dict.fromkeys(lines))[:limit]
    return problems


def forget_redis_bindings(url: str, run_id: str) -> int:
    """Drop kombu binding entries this run left in Redis (e.g. worker pidboxes)."""
    client = redis.Redis.from_url(url)
    removed = 0
    try:
        for key in client.scan_iter(match="_kombu.binding*", count=1000, _type="set"):
            members = [m for m in client.smembers(key) if run_id.encode() in m]
            if members:
                removed += int(client.srem(key, *members))
    finally:
        client.close()
    return removed
