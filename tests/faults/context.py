"""One run's settings, and the environment one fault runs in (broker, client, store)."""

from __future__ import annotations

import contextlib
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import redis
from typing_extensions import Self

from .brokers import Broker, start_broker
from .client import Client
from .pools import PoolSpec
from .procs import on_cleanup
from .proxy import Proxy


@dataclass
class Settings:
    run_id: str
    pools: list[PoolSpec]
    tasks: int
    soak_tasks: int
    concurrency: int
    visibility: int
    broker: str  # for the faults that are not about one broker
    stable_url: str
    root: Path  # private brokers' folders
    log_dir: Path
    task_seconds: float = 0.05
    dedupe: bool = False  # worker_deduplicate_successful_tasks, for every pool
    probe_tasks: int = 20

    @property
    def stall(self) -> float:
        """No progress for this long means "not draining": longer than the Redis
        transport takes to redeliver what a dead consumer held."""
        return self.visibility + 5 + 30


class FaultEnv:
    """A private broker (optionally behind a proxy) and the clients of one fault."""

    def __init__(self, settings: Settings, fault: str, broker: str, proxy: bool = False) -> None:
        self.settings = settings
        self.fault = fault
        self.log_dir = Path(tempfile.mkdtemp(prefix=f"{fault}-", dir=settings.log_dir))
        self.broker: Broker = start_broker(broker, settings.run_id, settings.root)
        self._forget_broker = on_cleanup(f"broker {fault}", self.broker.close)
        self.proxy: Proxy | None = None
        if proxy:
            self.proxy = Proxy(settings.run_id, self.broker.port)
            self.proxy.start()
            on_cleanup(f"proxy {fault}", self.proxy.close)
        self.client = Client(self.broker.url(), settings.stable_url, settings.visibility)
        self.store = redis.Redis.from_url(settings.stable_url, socket_timeout=30)

    @property
    def worker_url(self) -> str:
        """Where workers connect: through the proxy when there is one."""
        return self.broker.url(self.proxy.port if self.proxy else None)

    def queue(self, pool: str, suffix: str = "") -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", f"{self.fault}-{pool}-{suffix}".lower()).strip("-")
        return f"faults-{self.settings.run_id[:8]}-{slug}"

    def key(self, pool: str, suffix: str = "") -> str:
        return f"celery-anyio-faults:{self.settings.run_id}:{self.queue(pool, suffix)}"

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
        if self.proxy is not None:
            self.proxy.close()
        self.broker.close()
        self._forget_broker()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
