"""How long a worker takes to be ready, with 1 and more task processes.

``python -m benchmarks.startup`` starts ``celery -A benchmarks.benchapp worker -P
celery_anyio:Pool --processes N`` several times for each N and each backend, and
times it from the command's start to Celery's "ready." line (the consumer is
connected and every task process has reported ready). Medians and ranges; the
other processes of the machine share its cores, so compare rows of one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from celery_anyio.worker_process import WorkerProcess

from .cases import QUEUE_ENV
from .workers import ROOT

READY_LINE = r"\S+@\S+ ready\."
READY_TIMEOUT_SECONDS = 60.0


def seconds_to_ready(processes: int, backend: str, log_path: Path) -> float:
    queue = f"startup-{uuid.uuid4().hex[:8]}"
    argv = [
        sys.executable, "-m", "celery", "-A", "benchmarks.benchapp", "worker",
        "-P", "celery_anyio:Pool", f"--backend={backend}", "--processes", str(processes),
        "-c", "500", "-Q", queue, "-n", f"{queue}@%h", "-l", "info",
        "--without-mingle", "--without-gossip",
    ]  # fmt: skip
    started = time.monotonic()
    worker = WorkerProcess(argv, log_path, env={**os.environ, QUEUE_ENV: queue}, cwd=ROOT)
    try:
        worker.wait_for_line(READY_LINE, READY_TIMEOUT_SECONDS, interval=0.005)
        return time.monotonic() - started
    finally:
        worker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,2,4", help="comma-separated counts")
    parser.add_argument("--backends", default="asyncio,trio")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    counts = [int(n) for n in args.processes.split(",")]
    backends = args.backends.split(",")
    log_path = Path(tempfile.mkdtemp(prefix="celery-anyio-startup-")) / "worker.log"
    times: dict[tuple[str, int], list[float]] = {(b, n): [] for b in backends for n in counts}
    for _ in range(args.runs):  # interleaved, so a slow moment of the host hits every row
        for (backend, n), seen in times.items():
            seen.append(seconds_to_ready(n, backend, log_path))
    print("| backend | --processes | ready s, median [min-max] | vs --processes 1 |")
    print("|---|---:|---|---:|")
    for (backend, n), seen in times.items():
        base = statistics.median(times[(backend, counts[0])])
        median = statistics.median(seen)
        print(
            f"| {backend} | {n} | {median:.2f} [{min(seen):.2f}-{max(seen):.2f}] "
            f"| {median - base:+.2f} s |"
        )


if __name__ == "__main__":
    main()
