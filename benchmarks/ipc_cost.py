"""What one task costs in crossing between the main process and a task process.

``python -m benchmarks.ipc_cost`` times, per task, the messages ``--processes N``
exchanges (:mod:`celery_anyio.ipc`): the ``job`` message the main process sends
(Celery's request dict and body for ``fast_trace_task``, as prefork's pipes carry
them) and the four a task process sends back (``accepted``, ``done``,
``released``, and Celery's tracer result inside ``done``), each pickled, framed,
written to a socket, read and unpickled, on one core, with no worker around.
The CPU time of each side is what a task adds to that process.
"""

from __future__ import annotations

import argparse
import socket
import time
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.app import trace as celery_trace

from celery_anyio.child import target_name
from celery_anyio.ipc import READ_SIZE, Frames, frame
from tests.unit.requests import make_request


def job_message(app: Celery) -> tuple[Any, ...]:
    """The ``job`` message of a real request for a task with a small argument."""
    request = make_request(app, "bench.fetch", ("https://example.com/item/1",))
    args = (
        request.task_name,
        request.id,
        request.request_dict,
        request.body,
        request.content_type,
        request.content_encoding,
    )
    return ("job", 1, target_name(celery_trace.fast_trace_task), args, True, None, None, request.id)


def replies() -> list[tuple[Any, ...]]:
    """What a task process sends back for a task that returned a small value."""
    return [
        ("accepted", 1, time.monotonic()),
        ("done", 1, (1, 200, 0.0012)),  # fast_trace_task's (ok, retval, runtime)
        ("released", 1),
    ]


def fetch(url: str) -> int:
    """The task whose messages cross (its body never runs here)."""
    return 200


def per_call_us(func: Callable[[], object], n: int) -> float:
    """CPU time (this process) of one call, in microseconds."""
    func()
    started = time.process_time()
    for _ in range(n):
        func()
    return (time.process_time() - started) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=50_000, help="repetitions per figure")
    n = parser.parse_args().n

    app = Celery("bench", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.task(name="bench.fetch", shared=False)(fetch)
    job, back = job_message(app), replies()
    job_bytes, back_bytes = frame(job), [frame(m) for m in back]

    main_side, child_side = Frames(), Frames()
    ours, theirs = socket.socketpair()

    def main_sends() -> None:
        ours.sendall(frame(job))

    def child_reads() -> None:
        for _ in child_side.feed(theirs.recv(READ_SIZE)):
            pass

    def child_sends() -> None:
        for message in back:
            theirs.sendall(frame(message))

    def main_reads() -> None:
        data = b""
        while len(data) < sum(map(len, back_bytes)):
            data += ours.recv(READ_SIZE)
        for _ in main_side.feed(data):
            pass

    def round_trip() -> None:
        main_sends()
        child_reads()
        child_sends()
        main_reads()

    figures = {
        "job message size, bytes": float(len(job_bytes)),
        "replies size, bytes": float(sum(map(len, back_bytes))),
        "main: pickle + frame the job": per_call_us(lambda: frame(job), n),
        "main: unpickle the replies": per_call_us(
            lambda: list(Frames().feed(b"".join(back_bytes))), n
        ),
        "child: unpickle the job": per_call_us(lambda: list(Frames().feed(job_bytes)), n),
        "child: pickle + frame the replies": per_call_us(lambda: [frame(m) for m in back], n),
        "both sides, with the socket calls (one core)": per_call_us(round_trip, n),
    }
    for name, value in figures.items():
        unit = "" if "bytes" in name else " µs"
        print(f"{name:<48} {value:>8.1f}{unit}")


if __name__ == "__main__":
    main()
