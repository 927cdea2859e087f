"""``celery anyio demo``: a real worker on this pool, a batch of async tasks, progress.

Runs on kombu's filesystem transport in a temporary folder unless given a
broker URL, so it needs nothing but Python.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from .worker_process import WorkerExited, WorkerProcess


def run_demo(backend: str, count: int, concurrency: int, seconds: float, broker: str | None) -> int:
    folder = tempfile.mkdtemp(prefix="celery-anyio-demo-")
    for sub in ("queue", "processed", "results"):
        Path(folder, sub).mkdir()
    env = dict(os.environ, CELERY_ANYIO_DEMO_DIR=folder)
    if broker:
        env["CELERY_ANYIO_DEMO_BROKER"] = broker
        env["CELERY_ANYIO_DEMO_RESULTS"] = broker if broker.startswith("redis") else "rpc://"
    os.environ.update(env)
    from .demo_app import app, fetch

    log_path = Path(folder, "worker.log")
    results_dir = Path(folder, "results")
    command = [
        sys.executable, "-m", "celery", "-A", "celery_anyio.demo_app", "worker",
        "-P", "celery_anyio:Pool", f"--backend={backend}", "-c", str(concurrency),
        "--prefetch-multiplier", "2", "--without-mingle", "--without-gossip",
        "-l", "info",
    ]  # fmt: skip
    print(f"broker: {app.conf.broker_url}  results: {app.conf.result_backend}", flush=True)
    # kombu's filesystem transport has no atomic writes: publish before the
    # worker reads, so it never sees a half-written message.
    print(f"sending {count} async tasks (each awaits ~{seconds}s) ...", flush=True)
    results = [fetch.delay(i, seconds) for i in range(count)]
    print(f"$ {' '.join(command)}\n  (worker log: {log_path})", flush=True)
    worker = WorkerProcess(command, log_path, env=env)
    try:
        try:
            worker.wait_for_line(r" ready\.", timeout=60)
        except (WorkerExited, TimeoutError):
            print(worker.log(), file=sys.stderr)
            return 1
        started = time.monotonic()
        done = 0
        while done < count:
            if broker:
                done = sum(1 for r in results if r.ready())
            else:  # count result files; reading one mid-write could fail
                done = sum(1 for _ in results_dir.iterdir())
            _progress(done, count, time.monotonic() - started)
            if not worker.alive():
                print("\nworker died:\n" + worker.log(), file=sys.stderr)
                return 1
            time.sleep(0.1)
        elapsed = time.monotonic() - started
        worker.stop()
        values = [r.get(timeout=10) for r in results]
        ok = sorted(v["n"] for v in values) == list(range(count)) and all(
            v["task_id"] == r.id for v, r in zip(values, results, strict=False)
        )
        print(
            f"\n{count} tasks in {elapsed:.2f}s = {count / elapsed:.0f} tasks/s on {backend} "
            f"(one at a time: ~{count * seconds:.0f}s); results and task ids "
            f"{'all correct' if ok else 'WRONG'}",
            flush=True,
        )
        return 0 if ok else 1
    finally:
        worker.stop()


def _progress(done: int, total: int, elapsed: float) -> None:
    width = 40
    filled = width * done // total
    bar = "#" * filled + "-" * (width - filled)
    sys.stdout.write(f"\r[{bar}] {done}/{total} done in {elapsed:5.1f}s")
    sys.stdout.flush()
