"""Private brokers on their own ports and folders, which faults may stop and restart.

The machine's shared Redis (6379) and RabbitMQ (5672) serve other test runs and are
never touched. Redis runs with ``appendonly yes`` so a restart keeps its queues
(and "lost" means lost); RabbitMQ runs as its own node, with its own epmd, as the
``rabbitmq`` user, and its queues and messages are durable.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Protocol

import redis
from kombu.connection import Connection
from kombu.transport import pyamqp

from .procs import free_port, kill_group, kill_owned, owner_env, port_open, wait_for

READY_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0
RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
# kombu's Redis transport: one list per priority step, and the unacked index.
REDIS_PRIORITY_SEP = "\x06\x16"
REDIS_PRIORITY_STEPS = (0, 3, 6, 9)


class Broker(Protocol):
    kind: str
    port: int
    up_at: float  # when it last came up (accepting clients), epoch seconds

    def url(self, port: int | None = None) -> str: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def close(self) -> None: ...
    def ready(self, queue: str) -> int: ...
    def unacked(self, queue: str) -> int: ...
    def purge(self, queue: str) -> None: ...


def _as_rabbitmq(cmd: list[str]) -> list[str]:
    return ["setpriv", "--reuid=rabbitmq", "--regid=rabbitmq", "--init-groups", *cmd]


def _amqp_channel(conn: Connection) -> pyamqp.Channel:
    """An ``amqp://`` connection's channel: py-amqp's, with its queue methods (kombu's
    stubs type ``default_channel`` as the ``StdChannel`` base, which has none)."""
    channel = conn.default_channel
    assert isinstance(channel, pyamqp.Channel)
    return channel


class PrivateRedis:
    """``redis-server --port P --appendonly yes --dir D`` as a child of the harness."""

    kind = "redis"

    def __init__(self, run_id: str, root: Path) -> None:
        self.run_id = run_id
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="redis-", dir=root))
        self.process: subprocess.Popen[bytes] | None = None
        self.up_at = 0.0

    def url(self, port: int | None = None) -> str:
        return f"redis://127.0.0.1:{port or self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=10)

    def start(self) -> None:
        cmd = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
            "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            cmd,
            env={**os.environ, **owner_env(self.run_id)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for(self._pong, READY_TIMEOUT, interval=0.05, what=f"private redis on {self.port}")
        self.up_at = time.time()

    def _pong(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited: {self.log_tail()}")
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        """SIGTERM: Redis writes the append-only file out and exits."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            kill_group(self.process)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self) -> str:
        path = self.dir / "redis.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def _queues(self, queue: str) -> list[str]:
        return [
            queue if p == 0 else f"{queue}{REDIS_PRIORITY_SEP}{p}" for p in REDIS_PRIORITY_STEPS
        ]

    def ready(self, queue: str) -> int:
        client = self.client()
        return sum(int(client.llen(q)) for q in self._queues(queue))

    def _unacked_tags(self, queue: str) -> list[bytes | str]:
        tags = []
        for tag, value in self.client().hgetall("unacked").items():
            with contextlib.suppress(ValueError, IndexError):
                if json.loads(value)[2] == queue:
                    tags.append(tag)
        return tags

    def unacked(self, queue: str) -> int:
        return len(self._unacked_tags(queue))

    def purge(self, queue: str) -> None:
        client = self.client()
        client.delete(*self._queues(queue))
        tags = self._unacked_tags(queue)
        if tags:
            client.hdel("unacked", *tags)
            client.zrem("unacked_index", *tags)


class PrivateRabbitMQ:
    """A RabbitMQ node of its own: name, ports, epmd, data and config folder."""

    kind = "rabbitmq"

    def __init__(self, run_id: str, root: Path) -> None:
        self.run_id = run_id
        self.port = free_port(3)  # AMQP, distribution, epmd
        self.ctl_port = free_port(11)  # the CLI tools' distribution ports
        self.node = f"faults-{run_id[:8]}-{self.port}@localhost"
        self.dir = Path(tempfile.mkdtemp(prefix="rabbitmq-", dir=root))
        self.dir.chmod(0o755)
        (self.dir / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq-env.conf").write_text("")
        cookie = self.dir / ".erlang.cookie"
        cookie.write_text(os.urandom(16).hex())
        cookie.chmod(0o400)
        for sub in ("mnesia", "log"):
            (self.dir / sub).mkdir()
        subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(self.dir)], check=True)
        self.process: subprocess.Popen[bytes] | None = None
        self.up_at = 0.0

    def url(self, port: int | None = None) -> str:
        return f"amqp://guest:guest@127.0.0.1:{port or self.port}//"

    @property
    def epmd_port(self) -> int:
        return self.port + 2

    def env(self) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TERM")}
        return {
            **keep,
            **owner_env(self.run_id),
            "HOME": str(self.dir),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.port + 1),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_CTL_DIST_PORT_MIN": str(self.ctl_port),
            "RABBITMQ_CTL_DIST_PORT_MAX": str(self.ctl_port + 10),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def ctl(self, *args: str, timeout: float = 60) -> str:
        cmd = _as_rabbitmq([str(RABBITMQ_BIN / "rabbitmqctl"), "-q", "-n", self.node, *args])
        done = subprocess.run(
            cmd,
            env=self.env(),
            cwd=self.dir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip()[-500:]}")
        return done.stdout

    def start(self) -> None:
        log = (self.dir / "log" / "server.out").open("ab")
        self.process = subprocess.Popen(
            _as_rabbitmq([str(RABBITMQ_BIN / "rabbitmq-server")]),
            env=self.env(),
            cwd=self.dir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

        def up() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited: {self.log_tail()}")
            return port_open(self.port)

        wait_for(up, READY_TIMEOUT, interval=0.1, what=f"private rabbitmq on {self.port}")
        self.up_at = time.time()
        self.ctl("await_startup", "--timeout", "60", timeout=90)

    def stop(self) -> None:
        """``rabbitmqctl stop``: the node shuts down cleanly, as a service restart does."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            self.ctl("stop", timeout=STOP_TIMEOUT)
            self.process.wait(STOP_TIMEOUT)
        except (RuntimeError, subprocess.TimeoutExpired):
            kill_group(self.process)

    def close(self) -> None:
        self.stop()
        # epmd daemonizes out of the node's process group: find it by its port.
        subprocess.run(
            ["epmd", "-port", str(self.epmd_port), "-kill"],
            env={**os.environ, "ERL_EPMD_PORT": str(self.epmd_port)},
            capture_output=True,
            timeout=30,
            check=False,
        )
        kill_owned(self.run_id, {"RABBITMQ_NODENAME": self.node})
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self) -> str:
        path = self.dir / "log" / "server.out"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def ready(self, queue: str) -> int:
        with Connection(self.url(), connect_timeout=5) as conn:
            try:
                declared = _amqp_channel(conn).queue_declare(queue=queue, passive=True)
            except conn.channel_errors:
                return 0  # no such queue
            assert declared is not None  # None only with nowait=True
            _, messages, _ = declared
            return int(messages)

    def unacked(self, queue: str) -> int:
        out = self.ctl("list_queues", "name", "messages_unacknowledged", timeout=60)
        for line in out.splitlines():
            name, _, count = line.rpartition("\t")
            if name == queue:
                return int(count)
        return 0

    def purge(self, queue: str) -> None:
        with (
            Connection(self.url(), connect_timeout=5) as conn,
            contextlib.suppress(*conn.channel_errors),
        ):
            _amqp_channel(conn).queue_purge(queue)


def start_broker(kind: str, run_id: str, root: Path) -> Broker:
    broker: Broker = (
        PrivateRedis(run_id, root) if kind == "redis" else PrivateRabbitMQ(run_id, root)
    )
    try:
        broker.start()
    except BaseException:
        broker.close()
        raise
    return broker
