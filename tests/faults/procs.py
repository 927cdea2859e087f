"""Process plumbing: a cleanup stack that also runs on Ctrl-C and SIGTERM, free ports,
waiting on conditions, and stopping exactly the processes the harness started."""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, TypeVar

import psutil

T = TypeVar("T")

# Ports below Linux's ephemeral range (32768-) so no outgoing connection takes one
# between a broker's stop and its restart; RabbitMQ's CLI uses dist port + 10000.
PORT_RANGE = (21000, 29000)
# The shared RabbitMQ node's distribution port (20000 + 5672) and its CLI range.
RESERVED_PORTS = set(range(25672, 25700))
# Every process the harness starts carries this variable, so cleanup can find
# daemons that left their process group (epmd) without matching on names.
OWNER_ENV = "CELERY_ANYIO_FAULTS_OWNER"


class HarnessTimeout(BaseException):
    """A fault took longer than its whole budget (the SIGALRM safety net)."""


_cleanups: list[tuple[str, Callable[[], None]]] = []


def on_cleanup(name: str, fn: Callable[[], None]) -> Callable[[], None]:
    """Register ``fn`` to run at exit (last registered first); returns an unregister."""
    entry = (name, fn)
    _cleanups.append(entry)

    def forget() -> None:
        with contextlib.suppress(ValueError):
            _cleanups.remove(entry)

    return forget


def run_cleanups() -> None:
    while _cleanups:
        name, fn = _cleanups.pop()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - cleanup must go on with the rest
            sys.stderr.write(f"cleanup {name} failed: {exc!r}\n")


@contextlib.contextmanager
def cleanup_scope() -> Iterator[None]:
    """Run, at the end of the block, the cleanups registered inside it."""
    depth = len(_cleanups)
    try:
        yield
    finally:
        while len(_cleanups) > depth:
            name, fn = _cleanups.pop()
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - cleanup must go on with the rest
                sys.stderr.write(f"cleanup {name} failed: {exc!r}\n")


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def install() -> None:
    """Run the cleanups on normal exit, on errors, on Ctrl-C and on SIGTERM/SIGHUP."""
    atexit.register(run_cleanups)
    # Also when started in the background of a script, which ignores SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)


@contextlib.contextmanager
def budget(seconds: float) -> Iterator[None]:
    """Raise :class:`HarnessTimeout` in the main thread if the block outlives ``seconds``."""

    def expire(_signum: int, _frame: FrameType | None) -> None:
        raise HarnessTimeout(f"gave up after {seconds:.0f}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


_taken: set[int] = set()


def free_port(span: int = 1) -> int:
    """A port where ``span`` consecutive ports are free (and not handed out before)."""
    for _ in range(1000):
        port = random.randrange(*PORT_RANGE)
        ports = range(port, port + span)
        if any(p in _taken or p in RESERVED_PORTS for p in ports):
            continue
        if all(port_free(p) for p in ports):
            _taken.update(ports)
            return port
    raise RuntimeError("no free port")


def wait_for(
    check: Callable[[], T | None], timeout: float, interval: float = 0.1, what: str = ""
) -> T:
    """Poll ``check`` until it returns something not None/False; raise on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found is not None and found is not False:
            return found
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what or 'condition'} not met in {timeout:.0f}s")
        time.sleep(interval)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 1):
            return True
    except OSError:
        return False


def owner_env(run_id: str) -> dict[str, str]:
    return {OWNER_ENV: run_id}


def owned_processes(run_id: str, extra: dict[str, str] | None = None) -> list[psutil.Process]:
    """Processes whose environment says this run started them (and matches ``extra``)."""
    want = {OWNER_ENV: run_id, **(extra or {})}
    found = []
    for proc in psutil.process_iter():
        try:
            env = proc.environ()
        except (psutil.Error, OSError):
            continue
        if all(env.get(k) == v for k, v in want.items()):
            found.append(proc)
    return found


def kill_owned(run_id: str, extra: dict[str, str] | None = None) -> int:
    """SIGKILL what :func:`owned_processes` finds; returns how many."""
    procs = [p for p in owned_processes(run_id, extra) if p.pid != os.getpid()]
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(procs, timeout=5)
    return len(procs)


def kill_group(process: subprocess.Popen[Any], sig: int = signal.SIGKILL) -> None:
    """Signal the whole session/process group ``process`` leads (it was started with
    ``start_new_session``), then reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)
    if sig == signal.SIGKILL:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
