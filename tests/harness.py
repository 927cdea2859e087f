"""Start real `celery worker` processes against this machine's brokers."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlparse

import celery
import redis
from celery import Celery
from typing_extensions import Self

from celery_anyio.worker_process import WorkerExited, WorkerProcess

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("CELERY_ANYIO_REDIS", "redis://127.0.0.1:6379")
AMQP_URL = os.environ.get("CELERY_ANYIO_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
BROKERS = {"redis": REDIS_URL, "rabbitmq": AMQP_URL}
# Redis databases 1-15 are shared by concurrent test runs: each run picks one by
# its id and also namespaces every queue, so runs never see each other's messages.
RESULTS_DB_RANGE = range(1, 16)
BACKENDS = ("asyncio", "trio")
# Comma-separated AnyIO backend names: the worker tests' pool backends and the loops
# of the in-process tests (each nox `tests` cell sets one). Unset: all of them.
BACKENDS_ENV = "CELERY_ANYIO_BACKENDS"


def selected_backends() -> list[str]:
    """The AnyIO backends this run tests: those in ``$CELERY_ANYIO_BACKENDS``, else all."""
    chosen = [name.strip() for name in os.environ.get(BACKENDS_ENV, "").split(",")]
    return [name for name in chosen if name] or list(BACKENDS)


class PoolBackend(str):
    """An AnyIO backend name (what ``str()`` gives) that carries ``--processes`` too.

    The worker tests run once per backend and per process count: ``tag`` names
    the combination, for queue names and test ids.
    """

    processes: int

    def __new__(cls, backend: str, processes: int = 1) -> Self:
        value = super().__new__(cls, backend)
        value.processes = processes
        return value

    def __eq__(self, other: object) -> bool:
        # pytest reuses a session fixture whose parameter compares equal: keep the
        # variants apart; against a plain string, compare the backend name only.
        if isinstance(other, PoolBackend):
            return str.__eq__(self, other) and self.processes == other.processes
        return str.__eq__(self, other)

    def __hash__(self) -> int:
        return hash((str(self), self.processes))

    @property
    def tag(self) -> str:
        name = str.__str__(self)
        return name if self.processes == 1 else f"{name}-p{self.processes}"


def pool_args(backend: str) -> list[str]:
    """``-P celery_anyio:Pool --backend=... --processes N`` for ``backend``."""
    processes = getattr(backend, "processes", 1)
    return ["-P", "celery_anyio:Pool", f"--backend={backend}", "--processes", str(processes)]


def broker_available(broker: str) -> bool:
    url = urlparse(BROKERS[broker])
    try:
        with socket.create_connection((url.hostname or "127.0.0.1", url.port or 0), 2):
            return True
    except OSError:
        return False


@dataclass
class Namespace:
    """Broker/result URLs and queue names that belong to one test run."""

    broker: str
    run_id: str
    broker_url: str
    results_url: str

    @classmethod
    def create(cls, broker: str, run_id: str) -> Namespace:
        db = RESULTS_DB_RANGE[int(run_id, 16) % len(RESULTS_DB_RANGE)]
        results = f"{REDIS_URL}/{db}"
        broker_url = results if broker == "redis" else AMQP_URL
        return cls(broker, run_id, broker_url, results)

    def queue(self, name: str) -> str:
        return f"celery-anyio-test-{self.run_id}-{name}"

    def env(self, queue: str, conf: dict[str, Any] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            CELERY_ANYIO_TEST_BROKER=self.broker_url,
            CELERY_ANYIO_TEST_RESULTS=self.results_url,
            CELERY_ANYIO_TEST_QUEUE=queue,
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        )
        env.pop("CELERY_ANYIO_TEST_CONF", None)
        if conf:
            env["CELERY_ANYIO_TEST_CONF"] = json.dumps(conf)
        return env

    def client(self, queue: str) -> Client:
        """A client app whose messages go to ``queue``."""
        app = Celery(
            "client", broker=self.broker_url, backend=self.results_url, set_as_current=False
        )
        app.conf.update(task_default_queue=queue, result_expires=600)
        return Client(app)


@dataclass
class Client:
    """Sends the worker app's tasks by name, as any other program would."""

    app: Celery

    def sig(self, task: str, *args: Any, **kwargs: Any) -> Any:
        return self.app.signature(f"tests.workerapp.{task}", args=args, kwargs=kwargs)

    def send(self, task: str, *args: Any, **kwargs: Any) -> Any:
        return self.sig(task, *args, **kwargs).apply_async()

    def close(self) -> None:
        self.app.close()


@dataclass
class Worker:
    """A `python -m celery -A tests.workerapp worker ...` process on ``queue``."""

    namespace: Namespace
    queue: str
    args: list[str]
    conf: dict[str, Any] | None = None
    app_module: str = "tests.workerapp"
    ready_timeout: float = 30.0
    process: WorkerProcess | None = None
    log_path: Path = field(default_factory=lambda: Path(tempfile.mkstemp(suffix=".log")[1]))
    name: str = ""
    node: str = ""  # the worker's node name, known once it is ready

    def command(self) -> list[str]:
        self.name = f"{self.queue}-{os.getpid()}-{time.monotonic_ns()}@%h"
        return [
            sys.executable, "-m", "celery", "-A", self.app_module, "worker",
            "-Q", self.queue, "-n", self.name, "-l", "info",
            "--without-mingle", "--without-gossip", *self.args,
        ]  # fmt: skip

    def start(self) -> Self:
        self.process = WorkerProcess(
            self.command(),
            self.log_path,
            env=self.namespace.env(self.queue, self.conf),
            cwd=ROOT,
        )
        try:
            ready = self.process.wait_for_line(r"(\S+@\S+) ready\.", self.ready_timeout)
        except WorkerExited as exc:
            raise RuntimeError(f"worker exited with {exc.returncode}:\n{self.log()}") from None
        except TimeoutError:
            self.stop()
            timeout = self.ready_timeout
            raise RuntimeError(f"worker not ready in {timeout}s:\n{self.log()}") from None
        self.node = ready.group(1)
        return self

    def log(self) -> str:
        return self.process.log() if self.process else ""

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, SIGKILL after ``timeout``: then a test fails with TimeoutExpired."""
        if self.process is None:
            return None
        code = self.process.stop(timeout)
        if self.process.killed:
            raise subprocess.TimeoutExpired(self.process.argv, timeout)
        return code

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if exc_type is not None:
            sys.stderr.write(f"--- worker log {self.log_path} ---\n{self.log()[-20000:]}\n")


CELERY_VERSION = tuple(int(part) for part in celery.__version__.split(".")[:2])


def text(value: bytes | str) -> str:
    """A Redis reply as text (redis-py types keys and values as either)."""
    return value.decode() if isinstance(value, bytes) else value


def send(client: Client, name: str, *args: Any, **options: Any) -> Any:
    return client.app.signature(f"tests.limitsapp.{name}", args=args).apply_async(**options)


def tallies(client: Client, key: str, expected: int = 0, timeout: float = 10) -> dict[str, int]:
    store = redis.Redis.from_url(client.app.conf.result_backend)
    deadline = time.monotonic() + timeout
    while store.hlen(key) < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return {text(k): int(v) for k, v in store.hgetall(key).items()}


def wait_for_log(worker: Worker, pattern: str, timeout: float = 10) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, worker.log())
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} not in the worker log:\n{worker.log()[-5000:]}")


def wait_until_started(client: Client, key: str, count: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = tallies(client, key, timeout=0)
        if sum(1 for name in seen if name.startswith("started:")) >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"{count} tasks did not start: {tallies(client, key, timeout=0)}")


def wait_until_active(client: Client, worker: Worker, task_id: str, timeout: float = 30) -> None:
    """Wait until ``worker``'s consumer counts ``task_id`` as running (accepted there).

    With ``--processes N`` a task body starts in a task process a moment before the
    main process handles its report; what the consumer does at a stop depends on the
    latter.
    """
    inspect = client.app.control.inspect(timeout=2, destination=[worker.node])
    deadline = time.monotonic() + timeout
    while True:
        active = (inspect.active() or {}).get(worker.node, [])
        if any(request["id"] == task_id for request in active):
            return
        assert time.monotonic() < deadline, f"{task_id} is not active on {worker.node}"
        time.sleep(0.05)


def key() -> str:
    return f"celery-anyio-test:{uuid.uuid4().hex}"


def wait_for_state(result: Any, state: str, timeout: float = 5) -> float:
    """Poll ``result`` until it reaches ``state``; return how long that took."""
    started = time.monotonic()
    while result.state != state and time.monotonic() - started < timeout:
        time.sleep(0.02)
    assert result.state == state
    return time.monotonic() - started


# What "at once" may take on a loaded machine (a revoke's REVOKED state, ...): well
# above the tenths of a second it takes, still far below the tasks' own 30 s.
PROMPT = 3.0


def wait_for_count(client: Client, key: str, member: str, count: int, timeout: float = 10) -> int:
    """Poll the tally ``member`` of ``key`` until it reaches ``count``; return it."""
    deadline = time.monotonic() + timeout
    while (seen := tallies(client, key, timeout=0).get(member, 0)) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{member} at {seen}, not {count}: {tallies(client, key, 0, 0)}")
        time.sleep(0.02)
    return seen


def node_stats(app: Any, node: str, timeout: float = 30) -> dict[str, Any]:
    """``inspect stats`` of one worker node: its reply as soon as it comes.

    A worker busy with other tests' load can take seconds to answer; the bound
    is generous because it costs nothing when the reply is prompt.
    """
    replies = app.control.inspect(timeout=timeout, destination=[node], limit=1).stats() or {}
    assert node in replies, f"no stats from {node} in {timeout}s"
    return dict(replies[node])


def wait_until_done(client: Client, worker: Worker, task_id: str, timeout: float = 10) -> None:
    """Wait until ``worker`` holds ``task_id`` no more, neither running nor reserved.

    Call it once the task is known to have reached the worker (a log line, a
    tally): from then on, nothing more of that task can happen.
    """
    inspect = client.app.control.inspect(timeout=2, destination=[worker.node])
    deadline = time.monotonic() + timeout
    while True:
        held = [
            request
            for replies in (inspect.active() or {}, inspect.reserved() or {})
            for request in replies.get(worker.node, [])
            if request["id"] == task_id
        ]
        if not held:
            return
        assert time.monotonic() < deadline, f"the worker still holds {task_id}: {held}"
        time.sleep(0.05)


class EventLog:
    """The task events on ``client``'s broker, captured in a thread, as Flower would.

    Entering it waits for the events of a probe task: only then is the receiver
    known to be listening (on Redis it subscribes at its first poll) and the
    worker to send task events.
    """

    def __init__(self, client: Client) -> None:
        self.client = client
        self.events: list[dict[str, Any]] = []
        self._ready = threading.Event()
        self._receiver: Any = None
        self._thread = threading.Thread(target=self._listen, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        assert self._ready.wait(10), "the event receiver did not start"
        deadline = time.monotonic() + 30
        while True:
            probe = self.client.sig("add", 0, 0).apply_async()
            assert probe.get(timeout=30) == 0
            if self.wait_for(probe.id, "task-succeeded", timeout=2):
                return self
            assert time.monotonic() < deadline, "no task events arrived"

    def __exit__(self, *_: object) -> None:
        self._receiver.should_stop = True
        self._thread.join(15)

    def _listen(self) -> None:
        with self.client.app.connection_for_read() as conn:
            self._receiver = self.client.app.events.Receiver(
                conn, handlers={"*": self.events.append}
            )
            self._ready.set()
            for _ in self._receiver.itercapture(limit=None, timeout=None, wakeup=False):
                pass

    def types(self, task_id: str) -> list[str]:
        return [e["type"] for e in list(self.events) if e.get("uuid") == task_id]

    def wait_for(self, task_id: str, event_type: str, timeout: float = 10) -> bool:
        """Whether ``task_id``'s ``event_type`` arrived within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while event_type not in self.types(task_id):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True
