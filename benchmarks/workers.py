"""Worker subprocesses, and what they cost: CPU and RSS of each one's process tree.

Every worker runs in its own session, so stopping one also stops whatever it
forked; the clock of a drain starts at the worker's own ready timestamp, which
every benchmark app writes to its log as ``READY_MARKER<time.time()>``.
"""

from __future__ import annotations

import atexit
import contextlib
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from celery_anyio.worker_process import WorkerExited, WorkerProcess

from .cases import READY_MARKER

ROOT = Path(__file__).resolve().parent.parent
READY = re.escape(READY_MARKER) + r"([0-9.]+)(?: gevent-patched=([01]))?"
STOP_GRACE_SECONDS = 20.0
READY_TIMEOUT_SECONDS = 60.0


class BenchError(RuntimeError):
    """A measurement failed; the message goes into the results."""


class BenchTimeout(BenchError):
    """Not every task finished in time (the runner does not repeat such a case)."""


_LIVE: set[Worker] = set()


class Worker:
    """One worker command, started at once in its own session; its output in ``log_path``."""

    def __init__(self, command: Sequence[str], env: dict[str, str], log_path: Path) -> None:
        self.process = WorkerProcess(command, log_path, env=env, cwd=ROOT)
        self.command = self.process.argv
        self.log_path = log_path
        self.pid = self.process.pid
        self.ready: list[float] = []  # one timestamp per process that announced itself
        self.gevent_patched = False
        _LIVE.add(self)

    def alive(self) -> bool:
        return self.process.alive()

    def wait_ready(self, count: int = 1, timeout: float = READY_TIMEOUT_SECONDS) -> float:
        """Wait for ``count`` ready lines (one per process for taskiq and saq); the last one."""
        deadline = time.monotonic() + timeout
        try:
            while len(self.ready) < count:
                left = deadline - time.monotonic()
                line = self.process.wait_for_line(READY, left, interval=0.005)
                self.ready.append(float(line.group(1)))
                self.gevent_patched = line.group(2) == "1"
        except WorkerExited as exc:
            raise BenchError(f"worker exited before ready (rc={exc.returncode})") from None
        except TimeoutError:
            raise BenchError(f"worker not ready in {timeout:.0f}s") from None
        return max(self.ready)

    def terminate(self) -> None:
        """Ask for a warm shutdown without waiting for it."""
        self.process.terminate()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to the whole session once the grace has passed."""
        try:
            self.process.stop(STOP_GRACE_SECONDS)
        finally:
            _LIVE.discard(self)


@atexit.register
def stop_all_workers() -> None:
    """Wait for (and if need be force) the shutdown of every worker still running."""
    for worker in list(_LIVE):
        with contextlib.suppress(Exception):
            worker.stop()


class Sampler(threading.Thread):
    """Peak RSS and CPU time of the process trees under ``pids``, summed.

    Trees, because a prefork or ``--processes`` worker does its work in
    children; a child's CPU stays counted after it exits.  RSS counts the pages
    forked children share with their parent once per process, so the PSS
    (each shared page split between its sharers) is sampled too, less often:
    reading it walks the page tables.
    """

    def __init__(self, pids: Sequence[int], interval: float = 0.05, pss_every: int = 5) -> None:
        super().__init__(name="bench-sampler", daemon=True)
        self.roots = [psutil.Process(pid) for pid in pids]
        self.interval = interval
        self.pss_every = pss_every
        self.peak_rss = 0
        self.peak_pss = 0
        self._samples = 0
        self._procs: dict[int, psutil.Process] = {}
        self._cpu: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop_event = threading.Event()

    def _tree(self) -> list[psutil.Process]:
        found: list[psutil.Process] = []
        for root in self.roots:
            with contextlib.suppress(psutil.Error):
                found += [root, *root.children(recursive=True)]
        # The first Process object of a pid remembers its create time: a reused pid
        # is then seen as another process.
        return [self._procs.setdefault(proc.pid, proc) for proc in found]

    def sample(self) -> None:
        rss = pss = 0
        with self._lock:
            self._samples += 1
            full = self._samples % self.pss_every == 0
            for proc in self._tree():
                try:
                    with proc.oneshot():
                        rss += proc.memory_info().rss
                        times = proc.cpu_times()
                        pss += proc.memory_full_info().pss if full else 0
                except psutil.Error:
                    continue
                self._cpu[proc.pid] = times.user + times.system
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)

    def cpu_seconds(self, roots_only: bool = False) -> float:
        """CPU of the trees so far, or of the root processes alone (a worker's main process)."""
        self.sample()
        roots = {root.pid for root in self.roots}
        with self._lock:
            return sum(cpu for pid, cpu in self._cpu.items() if not roots_only or pid in roots)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(2)


class NeighbourWatch(threading.Thread):
    """Other processes busy on this machine: they skew every figure of the run."""

    IGNORED = frozenset({"redis-server", "beam.smp", "epmd"})  # the brokers belong to it

    def __init__(self, interval: float = 2.0, threshold: float = 20.0) -> None:
        super().__init__(name="bench-neighbours", daemon=True)
        self.interval = interval
        self.threshold = threshold
        self.samples = 0
        self.busy: dict[str, tuple[float, int]] = {}  # command -> (max %CPU, samples seen)
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

    def summary(self, limit: int = 3) -> list[str]:
        top = sorted(self.busy.items(), key=lambda item: -item[1][1])[:limit]
        return [
            f"{command} (up to {peak:.0f}% CPU, {seen}/{self.samples} samples)"
            for command, (peak, seen) in top
        ]


def log_problems(log_dir: Path, limit: int = 5) -> dict[str, list[str]]:
    """Error and warning lines of the worker logs (but the expected ones), per log."""
    interesting = re.compile(r"(ERROR|CRITICAL|WARNING)/|Traceback|Error:|\[ERROR|\[WARNING")
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
