"""``python -m celery -A tests.faults.faultapp worker`` processes, one per pool and queue.

Each worker runs in its own session, so ``kill -9`` reaches its whole process group,
and logs to its own file, which the harness reads for the ready marker, errors and
(for a worker that stopped draining) a dump of its threads' stacks.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from celery_anyio.worker_process import WorkerExited, WorkerProcess

from .faultapp import (
    BROKER_ENV,
    DEDUPE_ENV,
    QUEUE_ENV,
    READY_MARKER,
    RESULTS_ENV,
    VISIBILITY_ENV,
)
from .pools import PoolSpec
from .procs import on_cleanup, owner_env

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 90.0
_serial = itertools.count(1)


def _nothing() -> None:
    pass


class WorkerFailed(RuntimeError):
    """The worker exited before it was ready, or never became ready."""


class FaultWorker:
    def __init__(
        self,
        pool: PoolSpec,
        queue: str,
        broker_url: str,
        results_url: str,
        log_dir: Path,
        run_id: str,
        concurrency: int,
        visibility: int,
        loglevel: str = "info",
        dedupe: bool = False,
    ) -> None:
        self.pool = pool
        self.queue = queue
        self.broker_url = broker_url
        self.results_url = results_url
        self.run_id = run_id
        self.concurrency = concurrency
        self.visibility = visibility
        self.loglevel = loglevel
        self.dedupe = dedupe
        serial = next(_serial)
        self.name = f"{pool.name}-{serial}-{run_id[:6]}"
        self.log_path = log_dir / f"{serial:03d}-{pool.name}.log"
        self.process: WorkerProcess | None = None
        self.node = ""
        self.ready_at = 0.0
        self.exit_code: int | None = None
        self._forget: Callable[[], None] = _nothing

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "celery", "-A", "tests.faults.faultapp", "worker",
            *self.pool.args, "-Q", self.queue, "-n", f"{self.name}@%h", "-l", self.loglevel,
            "--without-mingle", "--without-gossip", "-c", str(self.concurrency),
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_")}
        env.update(
            {
                BROKER_ENV: self.broker_url,
                RESULTS_ENV: self.results_url,
                QUEUE_ENV: self.queue,
                VISIBILITY_ENV: str(self.visibility),
                DEDUPE_ENV: "1" if self.dedupe else "0",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
                "PYTHONUNBUFFERED": "1",
                **owner_env(self.run_id),
            }
        )
        return env

    def start(self, timeout: float = READY_TIMEOUT) -> FaultWorker:
        return self.launch().wait_ready(timeout)

    def launch(self) -> FaultWorker:
        self.process = WorkerProcess(self.command(), self.log_path, env=self.env(), cwd=ROOT)
        self._forget = on_cleanup(f"worker {self.name}", self.kill)
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> FaultWorker:
        """Until the worker logs the ready marker (its consumer is connected)."""
        assert self.process is not None
        try:
            ready = self.process.wait_for_line(re.escape(READY_MARKER) + r"(\S+)", timeout)
        except WorkerExited as exc:
            raise WorkerFailed(
                f"{self.name} exited with {exc.returncode} at start: " + self.log()[-1500:]
            ) from None
        except TimeoutError:
            self.kill()
            raise WorkerFailed(f"{self.name} not ready in {timeout:.0f}s") from None
        self.node = ready.group(1)
        self.ready_at = time.time()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log(self, start: int = 0) -> str:
        return self.process.log(start) if self.process else ""

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def alive(self) -> bool:
        if self.process is None:
            return False
        code = self.process.poll()
        if code is not None:
            self.exit_code = code
        return code is None

    def send(self, sig: int) -> None:
        assert self.process is not None
        if self.alive():
            self.process.send_signal(sig)

    def wait_exit(self, timeout: float) -> int | None:
        """The exit code, or None if the worker is still running after ``timeout``."""
        if self.process is None:
            return None
        try:
            self.exit_code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        return self.exit_code

    def kill(self) -> None:
        """``kill -9`` of the worker's whole process group."""
        if self.process is not None:
            self.exit_code = self.process.kill()
        self._forget()

    def rss(self) -> int | None:
        """Resident memory of the worker and any processes it started."""
        try:
            main = psutil.Process(self.pid)
            procs = [main, *main.children(recursive=True)]
            return sum(int(p.memory_info().rss) for p in procs)
        except (psutil.Error, AssertionError):
            return None

    def dump_stacks(self) -> str:
        """Every thread's stack, from py-spy if it is installed, else Celery's SIGUSR1."""
        if not self.alive():
            return ""
        spy = shutil.which(
            "py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        )
        if spy:
            try:
                done = subprocess.run(
                    [spy, "dump", "--pid", str(self.pid)],
                    check=False,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                text = done.stdout or done.stderr
            except subprocess.TimeoutExpired:
                text = "py-spy dump timed out"
        else:
            before = self.log_size()
            self.send(signal.SIGUSR1)
            time.sleep(2)  # the cry handler writes from a signal handler: no event to await
            text = self.log(before)
        with self.log_path.open("a") as log:
            log.write(f"\n--- faults harness: stacks of {self.name} (pid {self.pid}) ---\n{text}\n")
        return text
