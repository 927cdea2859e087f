"""WorkerProcess on plain Python commands: log lines, early exits, a stop that leaves nothing."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest

from celery_anyio.worker_process import WorkerExited, WorkerProcess

STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print("child", child.pid, flush=True)
print("ready 1", flush=True)
print("ready 2", flush=True)
sys.stdout.write("half a line")
sys.stdout.flush()
time.sleep(60)
"""


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def gone(pid: int, timeout: float = 10) -> bool:
    """Whether ``pid`` ends within ``timeout`` (a zombie, dead but not reaped, has ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.02)
    return False


def test_lines_in_order_and_a_stop_that_kills_the_group(tmp_path: Path) -> None:
    worker = WorkerProcess(python(STUBBORN), tmp_path / "logs" / "worker.log")
    try:
        child = int(worker.wait_for_line(r"child (\d+)", 30).group(1))
        assert worker.wait_for_line(r"ready (\d)", 5).group(1) == "1"
        assert worker.wait_for_line(r"ready (\d)", 5).group(1) == "2"  # read with the first
        assert worker.read_lines() == []  # not the half-written line
        assert worker.log().endswith("ready 2\nhalf a line")
    finally:
        code = worker.stop(grace=0.5)  # it ignores SIGTERM
    assert code == -signal.SIGKILL and worker.killed
    if Path("/proc/self/stat").exists():
        assert gone(child), "the worker's child outlived the stop"
    assert worker.stop() == -signal.SIGKILL and not worker.killed  # idempotent


def test_an_exit_while_awaited_fails_at_once_with_the_log(tmp_path: Path) -> None:
    worker = WorkerProcess(python("print('boom'); raise SystemExit(3)"), tmp_path / "w.log")
    started = time.monotonic()
    with pytest.raises(WorkerExited, match="worker exited with 3") as info:
        worker.wait_for_line("ready", 30)
    assert time.monotonic() - started < 20
    assert info.value.returncode == 3 and "boom" in info.value.tail
    assert worker.stop() == 3 and not worker.killed


def test_a_line_that_never_comes_times_out(tmp_path: Path) -> None:
    worker = WorkerProcess(python("import time; time.sleep(60)"), tmp_path / "w.log")
    try:
        with pytest.raises(TimeoutError):
            worker.wait_for_line("ready", 0.2)
    finally:
        assert worker.kill() == -signal.SIGKILL and worker.killed
