"""How to publish to, start and read back each task queue: Celery, taskiq, saq.

Each driver pre-loads the tasks, names the worker command, tells how many
tasks are still unfinished (cheaply: it is polled every 20 ms during a drain)
and reads every task's own ``[sent, started, finished]`` stamps afterwards.
Results are kept in Redis by all three.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
from celery import Celery
from kombu import Connection, Exchange, Queue

from .cases import (
    BACKEND_OPTIONS_ENV,
    BROKER_ENV,
    CONCURRENCY_ENV,
    QUEUE_ENV,
    RESULTS_ENV,
    START_PACING_ENV,
    Config,
    Task,
)
from .workers import ROOT

CHUNK = 500
HOSTNAME = socket.gethostname()
LOGLEVEL_ENV = "CELERY_ANYIO_BENCH_LOGLEVEL"  # the Celery workers' -l (default warning)


@dataclass
class Outcome:
    """One task as it ended: whether it succeeded, and its own clock readings."""

    ok: bool
    detail: str = ""
    sent: float = 0.0
    started: float = 0.0
    finished: float = 0.0
    stored: float | None = None  # when its result was stored (Celery's ``date_done``)


class Driver:
    """The parts of a drain that depend on the task queue."""

    def __init__(self, config: Config, queue: str, broker_url: str, results_url: str) -> None:
        self.config = config
        self.queue = queue
        self.broker_url = broker_url
        self.results_url = results_url
        self.redis = redis.Redis.from_url(results_url)
        self._pending: list[list[str]] = []
        self._pending_for: Sequence[str] = ()

    def command(self, index: int) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop(BACKEND_OPTIONS_ENV, None)
        env.pop(START_PACING_ENV, None)
        env.update(
            {
                BROKER_ENV: self.broker_url,
                RESULTS_ENV: self.results_url,
                QUEUE_ENV: self.queue,
                CONCURRENCY_ENV: str(self.config.concurrency),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def preload(self, tasks: Sequence[Task]) -> list[str]:
        raise NotImplementedError

    def result_key(self, task_id: str) -> str:
        raise NotImplementedError

    def remaining(self, ids: Sequence[str]) -> int:
        """Tasks without a result: ``EXISTS`` on the oldest unfinished chunk only.

        Tasks finish roughly in order, so each poll costs a command or two.
        """
        if ids is not self._pending_for:
            self._pending_for = ids
            keys = [self.result_key(i) for i in ids]
            self._pending = [keys[k : k + CHUNK] for k in range(0, len(keys), CHUNK)]
        while self._pending:
            found = int(self.redis.exists(*self._pending[0]))
            if found < len(self._pending[0]):
                return sum(map(len, self._pending)) - found
            self._pending.pop(0)
        return 0

    def outcomes(self, ids: Sequence[str]) -> list[Outcome]:
        out: list[Outcome] = []
        for k in range(0, len(ids), CHUNK):
            raw = self.redis.mget([self.result_key(i) for i in ids[k : k + CHUNK]])
            out += [self.outcome(json.loads(value) if value else None) for value in raw]
        return out

    def outcome(self, stored: Any) -> Outcome:
        raise NotImplementedError

    def cleanup(self, ids: Sequence[str]) -> None:
        keys = [self.result_key(i) for i in ids]
        for k in range(0, len(keys), CHUNK):
            self.redis.delete(*keys[k : k + CHUNK])

    def close(self) -> None:
        self.redis.close()


def _stamps(value: Any) -> tuple[float, float, float]:
    sent, started, finished = value
    return float(sent), float(started), float(finished)


class CeleryDriver(Driver):
    """A client app without a result backend, so it never subscribes to results."""

    def __init__(self, config: Config, queue: str, broker_url: str, results_url: str) -> None:
        super().__init__(config, queue, broker_url, results_url)
        self.app = Celery("bench-client", broker=broker_url, set_as_current=False)
        self.app.conf.update(task_default_queue=queue, broker_connection_retry_on_startup=True)
        reset_queue(self.app.connection_for_write(), queue)

    def nodename(self, index: int) -> str:
        return f"{self.queue}-{index}@{HOSTNAME}"

    def command(self, index: int) -> list[str]:
        # ``python -m celery`` applies gevent's monkey-patching for ``-P gevent``.
        return [
            sys.executable, "-m", "celery", "-A", "benchmarks.benchapp", "worker",
            "-Q", self.queue, "-n", self.nodename(index),
            "-l", os.environ.get(LOGLEVEL_ENV, "warning"),
            "--without-mingle", "--without-gossip", *self.config.celery_args(),
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        env = super().env()
        if self.config.backend == "uvloop":
            env[BACKEND_OPTIONS_ENV] = json.dumps({"use_uvloop": True})
        if self.config.start_pacing is not None:
            env[START_PACING_ENV] = str(self.config.start_pacing)
        return env

    def task_name(self, kind: str) -> str:
        if kind == "reserved":
            return "bench.reserved_sync"
        return f"bench.{kind}_{'async' if self.config.is_anyio else 'sync'}"

    def preload(self, tasks: Sequence[Task]) -> list[str]:
        return self.paced(tasks, None)[0]

    def paced(self, tasks: Sequence[Task], rate: float | None) -> tuple[list[str], float]:
        """Publish at ``rate``/s, each with ``time.time()`` as its ``sent`` argument.

        A message that falls behind is sent at once and still measured from when
        it was sent; returns the ids and the rate reached. No ``rate``: as fast as
        it goes, untimed (on Redis kombu pipelines 500 publishes at a time).
        """
        ids = []
        with self.app.producer_or_acquire() as producer:
            batch = getattr(producer, "batch", None)
            batched = batch(max_size=500) if batch and rate is None else contextlib.nullcontext()
            start = time.perf_counter()
            with batched:
                for i, (kind, kwargs) in enumerate(tasks):
                    args = list(kwargs.values())
                    if rate is not None:
                        time.sleep(max(start + i / rate - time.perf_counter(), 0))
                        args.append(time.time())
                    task = self.app.send_task(self.task_name(kind), args=args, producer=producer)
                    ids.append(task.id)
            elapsed = time.perf_counter() - start
        return ids, (len(ids) - 1) / elapsed if elapsed > 0 and len(ids) > 1 else rate or 0.0

    def result_key(self, task_id: str) -> str:
        return f"celery-task-meta-{task_id}"

    def outcome(self, stored: Any) -> Outcome:
        if not stored or stored.get("status") != "SUCCESS":
            detail = str((stored or {}).get("result") or (stored or {}).get("status") or "missing")
            return Outcome(False, detail[:120])
        done = datetime.fromisoformat(stored["date_done"]).timestamp()
        return Outcome(True, "", *_stamps(stored["result"]), stored=done)

    def pool_stats(self, index: int, timeout: float = 5.0) -> dict[str, Any]:
        """The ``pool`` part of one worker's ``inspect stats``."""
        node = self.nodename(index)
        replies = self.app.control.inspect(destination=[node], timeout=timeout).stats()
        if not replies or node not in replies:
            raise RuntimeError(f"no `inspect stats` reply in {timeout:.0f}s")
        return dict(replies[node].get("pool") or {})

    def cleanup(self, ids: Sequence[str]) -> None:
        with contextlib.suppress(Exception):
            reset_queue(self.app.connection_for_write(), self.queue, delete=True)
        super().cleanup(ids)

    def close(self) -> None:
        self.app.close()
        super().close()


def reset_queue(connection: Connection, name: str, delete: bool = False) -> None:
    """Declare and purge a queue of ours (``delete``: remove it and its binding)."""
    queue = Queue(name, Exchange(name, "direct"), routing_key=name)
    with connection as conn:
        bound = queue(conn.default_channel)
        bound.declare()
        bound.purge()
        if delete:
            bound.delete()


class TaskiqDriver(Driver):
    """taskiq-redis: a Redis stream with a consumer group (acked), results by task id."""

    def command(self, index: int) -> list[str]:
        return [
            sys.executable, "-m", "taskiq", "worker", "benchmarks.taskiq_app:broker",
            "--workers", str(self.config.processes),
            "--max-async-tasks", str(self.config.concurrency), "--log-level", "WARNING",
        ]  # fmt: skip

    def preload(self, tasks: Sequence[Task]) -> list[str]:
        return asyncio.run(self._kick(tasks))

    async def _kick(self, tasks: Sequence[Task]) -> list[str]:
        from taskiq.kicker import AsyncKicker

        from .taskiq_app import make_broker

        broker = make_broker(self.broker_url, self.queue)
        await broker.startup()
        ids = []
        try:
            for kind, kwargs in tasks:
                task_id = uuid.uuid4().hex
                kicker: AsyncKicker[Any, Any] = AsyncKicker(f"bench.{kind}", broker, {})
                await kicker.with_task_id(task_id).kiq(**kwargs)
                ids.append(task_id)
        finally:
            await broker.shutdown()
        return ids

    def result_key(self, task_id: str) -> str:
        return f"{self.queue}:{task_id}"

    def outcome(self, stored: Any) -> Outcome:
        if not stored or stored.get("is_err"):
            return Outcome(False, str((stored or {}).get("error") or "missing")[:120])
        return Outcome(True, "", *_stamps(stored["return_value"]))

    def cleanup(self, ids: Sequence[str]) -> None:
        self.redis.delete(self.queue, f"autoclaim:{self.queue}:{self.queue}")
        super().cleanup(ids)


class SaqDriver(Driver):
    """saq: a job hash per task (its status and result), an ``incomplete`` sorted set."""

    def command(self, index: int) -> list[str]:
        return [
            sys.executable, "-m", "saq", "benchmarks.saq_app.settings",
            "--workers", str(self.config.processes),
        ]  # fmt: skip

    def preload(self, tasks: Sequence[Task]) -> list[str]:
        return asyncio.run(self._enqueue(tasks))

    async def _enqueue(self, tasks: Sequence[Task]) -> list[str]:
        from saq import Queue as SaqQueue

        queue = SaqQueue.from_url(self.broker_url, name=self.queue)
        ids = [uuid.uuid4().hex for _ in tasks]
        try:
            for task_id, (kind, kwargs) in zip(ids, tasks, strict=True):
                await queue.enqueue(kind, key=task_id, **kwargs)
        finally:
            await queue.disconnect()
        return ids

    def remaining(self, ids: Sequence[str]) -> int:
        return int(self.redis.zcard(f"saq:{self.queue}:incomplete"))

    def result_key(self, task_id: str) -> str:
        return f"saq:job:{self.queue}:{task_id}"

    def outcome(self, stored: Any) -> Outcome:
        if not stored or stored.get("status") != "complete":
            return Outcome(False, str((stored or {}).get("error") or "missing")[:120])
        return Outcome(True, "", *_stamps(stored["result"]))

    def cleanup(self, ids: Sequence[str]) -> None:
        keys = list(self.redis.scan_iter(match=f"saq:{self.queue}:*", count=1000))
        if keys:
            self.redis.delete(*keys)
        super().cleanup(ids)


DRIVERS: dict[str, type[Driver]] = {
    "celery": CeleryDriver,
    "taskiq": TaskiqDriver,
    "saq": SaqDriver,
}


def forget_redis_bindings(url: str, run_id: str) -> int:
    """Drop the kombu binding entries this run left in Redis (the workers' pidboxes)."""
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
