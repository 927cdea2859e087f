"""``python -m tests.faults [--faults a,b] [--pools ...] [--tasks N] [--json out.json]``.

Runs each fault, prints its table as Markdown as soon as it is done, and a summary
of the targets at the end. Exits 0 when the harness itself ran (missed targets are
results, not errors) unless ``--strict``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import redis

from . import procs
from .context import Settings
from .faultapp import DEFAULT_VISIBILITY
from .pools import POOLS
from .registry import FAULTS, QUICK, QUICK_TASKS, QUICK_VISIBILITY, expand
from .report import FaultResult, markdown, write_json

ROOT = Path(__file__).resolve().parents[2]
STABLE_URL = os.environ.get("CELERY_ANYIO_FAULTS_STABLE", "redis://127.0.0.1:6379/14")
FAULT_BUDGET = 1800.0


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.faults", description=__doc__)
    p.add_argument("--faults", default="", help="comma-separated names or groups (--list)")
    p.add_argument("--pools", default=",".join(POOLS), help="comma-separated: " + ", ".join(POOLS))
    p.add_argument("--tasks", type=int, help="tasks per pool and fault (default 3000)")
    p.add_argument("--soak-tasks", type=int, default=100_000)
    p.add_argument("--broker", choices=("redis", "rabbitmq"), default="redis",
                   help="for the faults that are not about one broker")  # fmt: skip
    p.add_argument("--concurrency", type=int, default=500)
    p.add_argument("--visibility-timeout", type=int,
                   help=f"Redis transport, seconds (default {DEFAULT_VISIBILITY}; "
                   f"{QUICK_VISIBILITY} with --quick)")  # fmt: skip
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_TASKS} tasks, faults {', '.join(QUICK)} (a smoke test)")  # fmt: skip
    p.add_argument("--dedupe", action="store_true",
                   help="every worker with worker_deduplicate_successful_tasks = True")  # fmt: skip
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--log-dir", type=Path, help="keep worker and broker logs here")
    p.add_argument("--strict", action="store_true", help="exit 1 if any target is missed")
    p.add_argument("--list", action="store_true", help="list the faults and exit")
    return p.parse_args(argv)


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.stdout.strip()


def _meta(settings: Settings, faults: list[str]) -> dict[str, Any]:
    dirty = _git("status", "--porcelain", "--", "celery_anyio")
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "celery_anyio_uncommitted": dirty.splitlines() if dirty else [],
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "load_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "versions": {p: version(p) for p in ("celery", "kombu", "redis", "anyio", "trio", "amqp")},
        "faults": faults,
        "pools": [p.name for p in settings.pools],
        "tasks": settings.tasks,
        "soak_tasks": settings.soak_tasks,
        "concurrency": settings.concurrency,
        "visibility_timeout": settings.visibility,
        "task_seconds": settings.task_seconds,
        "broker": settings.broker,
        "worker_deduplicate_successful_tasks": settings.dedupe,
    }


def _summary(results: list[FaultResult]) -> str:
    pools = [p for p in POOLS if any(r.pool == p for res in results for r in res.rows)]
    lines = [
        "## Targets",
        "",
        "| fault | " + " | ".join(pools) + " |",
        "|---|" + "---|" * len(pools),
    ]
    for res in results:
        cells = []
        for pool in pools:
            row = next((r for r in res.rows if r.pool == pool), None)
            if row is None:
                cells.append("error" if res.error else "-")
            else:
                cells.append("ok" if not row.misses else ", ".join(row.misses))
        lines.append(f"| {res.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _preflight(faults: list[str], broker: str) -> list[str]:
    """Reasons the selected faults cannot run here."""
    problems = []
    try:
        redis.Redis.from_url(STABLE_URL, socket_timeout=5).ping()
    except redis.RedisError as exc:
        problems.append(f"stable Redis {STABLE_URL}: {exc}")
    brokers = {FAULTS[f].needs or broker for f in faults}
    if "redis" in brokers and not shutil.which("redis-server"):
        problems.append("redis-server is not installed")
    if "rabbitmq" in brokers and not Path("/usr/lib/rabbitmq/bin/rabbitmq-server").exists():
        problems.append("rabbitmq-server is not installed")
    if "rabbitmq" in brokers and os.geteuid() != 0:
        problems.append("a private RabbitMQ node runs as the rabbitmq user: run as root")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.list:
        for fault in FAULTS.values():
            print(f"{fault.name:18} {fault.description}")
        return 0
    faults = expand(args.faults.split(",") if args.faults else (QUICK if args.quick else ["all"]))
    tasks = args.tasks or (QUICK_TASKS if args.quick else 3000)
    problems = _preflight(faults, args.broker)
    if problems:
        print("cannot run:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    procs.install()
    run_id = uuid.uuid4().hex
    root = Path(tempfile.mkdtemp(prefix="celery-anyio-faults-"))
    root.chmod(0o755)  # the private RabbitMQ node (user rabbitmq) lives below it
    procs.on_cleanup("run folder", lambda: shutil.rmtree(root, ignore_errors=True))

    def sweep_keys() -> None:
        """Keys a task wrote after its fault had deleted its own (a late duplicate)."""
        store = redis.Redis.from_url(STABLE_URL, socket_timeout=30)
        keys = list(store.scan_iter(match=f"celery-anyio-faults:{run_id}:*", count=1000))
        if keys:
            store.delete(*keys)

    procs.on_cleanup("stable keys", sweep_keys)

    def kill_strays() -> None:
        procs.kill_owned(run_id)

    procs.on_cleanup("stray processes", kill_strays)  # runs first: LIFO
    log_dir = args.log_dir or root / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    settings = Settings(
        run_id=run_id,
        pools=[POOLS[p] for p in args.pools.split(",")],
        tasks=tasks,
        soak_tasks=args.soak_tasks,
        concurrency=args.concurrency,
        visibility=args.visibility_timeout
        or (QUICK_VISIBILITY if args.quick else DEFAULT_VISIBILITY),
        broker=args.broker,
        stable_url=STABLE_URL,
        root=root,
        log_dir=log_dir,
        dedupe=args.dedupe,
    )
    meta = _meta(settings, faults)
    print(f"# Fault injection, {meta['date']}, commit {meta['commit']}", flush=True)
    if meta["celery_anyio_uncommitted"]:
        print(f"(celery_anyio has uncommitted changes: {meta['celery_anyio_uncommitted']})")
    if settings.dedupe:
        print("(every worker with worker_deduplicate_successful_tasks = True)")
    print(f"load {meta['load_at_start']}, {meta['cpus']} CPUs, {meta['versions']}\n", flush=True)
    results: list[FaultResult] = []
    started = time.monotonic()
    try:
        for name in faults:
            results.append(_run_one(settings, name))
            print(markdown(results[-1]) + "\n", flush=True)
    finally:
        meta["load_at_end"] = os.getloadavg()
        meta["seconds"] = time.monotonic() - started
        if args.json:
            write_json(args.json, meta, results)
        procs.run_cleanups()
    print(_summary(results))
    print(f"\n{meta['seconds']:.0f} s, load at the end {meta['load_at_end']}")
    if any(r.error for r in results):
        return 1
    return 1 if args.strict and any(row.misses for r in results for row in r.rows) else 0


def _run_one(settings: Settings, name: str) -> FaultResult:
    fault = FAULTS[name]
    broker = fault.needs or settings.broker
    print(f"... {name} ({broker})", file=sys.stderr, flush=True)
    started = time.monotonic()
    budget = FAULT_BUDGET + (
        settings.soak_tasks * len(settings.pools) / 50 if name == "soak" else 0
    )
    try:
        with procs.cleanup_scope(), procs.budget(budget):
            result = fault.run(settings, fault.description)
    except (Exception, procs.HarnessTimeout) as exc:  # noqa: BLE001 - reported, then the next fault
        result = FaultResult(name, broker, fault.description, error=f"{exc!r}")
        traceback.print_exc(file=sys.stderr)
    result.seconds = time.monotonic() - started
    result.judge()
    return result
