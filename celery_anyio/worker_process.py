"""A ``celery worker`` (or any long-running command) run as a child process.

The demo, the test and fault harnesses and the benchmarks all start a worker,
wait for a line of its log and stop it without leaving anything behind: this is
the one place that does it.  The worker runs in a session of its own, so a
Ctrl-C in the caller's terminal reaches only the caller, and one ``killpg``
reaches whatever the worker forked.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

TAIL_CHARS = 5000  # of the log, in the error of a process that exited while awaited
REAP_SECONDS = 10.0  # for a SIGKILLed process to be reaped; longer: stuck in the kernel


class WorkerExited(RuntimeError):
    """The process exited while a line of its log was awaited."""

    def __init__(self, returncode: int, pattern: str, tail: str) -> None:
        super().__init__(
            f"worker exited with {returncode} before a line matched {pattern!r}; "
            f"its log ends:\n{tail}"
        )
        self.returncode = returncode
        self.tail = tail


class WorkerProcess:
    """``argv`` started at once in a new session, its stdout and stderr in ``log_path``.

    The log is opened afresh in append mode: notes the caller appends to it are
    not overwritten by the process's later writes.
    """

    def __init__(
        self,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            log.truncate(0)
            self._popen = subprocess.Popen(
                self.argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = self._popen.pid
        self.killed = False  # whether the last stop() or kill() had to SIGKILL it
        self._offset = 0  # of the first byte of the log not yet read as lines
        self._unread: list[str] = []  # lines read after the one wait_for_line matched
        self._terminated_at = 0.0
        self._swept = False

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    def poll(self) -> int | None:
        return self._popen.poll()

    def alive(self) -> bool:
        return self._popen.poll() is None

    def log(self, start: int = 0) -> str:
        """The log from byte ``start`` on, whole or not ("" if it is gone)."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(start)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def read_lines(self) -> list[str]:
        """The lines written since the last call; a last one still being written waits."""
        with self.log_path.open("rb") as log:
            log.seek(self._offset)
            data = log.read()
        cut = data.rfind(b"\n") + 1
        self._offset += cut
        lines = [*self._unread, *data[:cut].decode(errors="replace").splitlines()]
        self._unread = []
        return lines

    def wait_for_line(self, pattern: str, timeout: float, interval: float = 0.1) -> re.Match[str]:
        """The match of the next line that matches ``pattern``.

        Raises :class:`WorkerExited` as soon as the process has exited without
        writing one, and :class:`TimeoutError` after ``timeout`` seconds.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            code = self.poll()  # before reading: an exited process's last lines are read too
            lines = self.read_lines()
            for index, line in enumerate(lines):
                found = regex.search(line)
                if found:
                    self._unread = lines[index + 1 :]
                    return found
            if code is not None:
                raise WorkerExited(code, pattern, self.log()[-TAIL_CHARS:])
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no line of {self.log_path} matched {pattern!r} in {timeout}s")
            time.sleep(interval)

    def send_signal(self, signum: int) -> None:
        """Signal the main process only (nothing once it has exited)."""
        self._popen.send_signal(signum)

    def wait(self, timeout: float | None = None) -> int:
        """The exit code; raises :class:`subprocess.TimeoutExpired`."""
        return self._popen.wait(timeout)

    def terminate(self) -> None:
        """SIGTERM (a Celery worker's warm shutdown) without waiting: stop()'s grace counts
        from the first one, so several workers can stop side by side."""
        if self.alive():
            self._popen.send_signal(signal.SIGTERM)
            self._terminated_at = self._terminated_at or time.monotonic()

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL to the process group once ``grace`` has passed since it.

        The group is killed even after a clean exit, for what the worker left
        behind.  Idempotent; the exit code, as :meth:`kill` gives it.
        """
        if self.alive():
            if not self._terminated_at:
                self.terminate()
            left = grace - (time.monotonic() - self._terminated_at)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(max(left, 0.01))
        return self.kill()

    def kill(self) -> int | None:
        """SIGKILL to the whole process group now; the exit code, None if not reaped."""
        self.killed = self.alive()
        if not self._swept:  # once: the group's id may name another group later
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            self._swept = True
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(REAP_SECONDS)
        return self.returncode
