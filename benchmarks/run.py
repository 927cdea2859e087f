"""Run the benchmark cases and write every run's figures to one JSON file.

``python -m benchmarks.run [--profile full|quick|processes] [--broker redis|rabbitmq]``;
``python -m benchmarks.render <file>`` prints the tables. The method is in
benchmarks/README.md; the targets, and how a run meets them, in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

if __package__ in (None, ""):  # ``python benchmarks/run.py``: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil

from benchmarks.cases import Config, Workload, anyio
from benchmarks.drivers import forget_redis_bindings
from benchmarks.harness import Environment, LatencyPlan, measure
from benchmarks.kombu_raw import measure as kombu_raw_seconds
from benchmarks.workers import ROOT, BenchTimeout, NeighbourWatch, log_problems, stop_all_workers

REDIS_URL = os.environ.get("CELERY_ANYIO_BENCH_REDIS", "redis://127.0.0.1:6379/14")
AMQP_URL = os.environ.get("CELERY_ANYIO_BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
BROKERS = {"redis": REDIS_URL, "rabbitmq": AMQP_URL}
IO_SECONDS = 0.05


@dataclass
class Profile:
    """The cases of one kind of run, grouped by workload so compared cases run close in time."""

    runs: int
    latency: LatencyPlan
    drain_cap_seconds: float  # slow pools get fewer tasks, so their drain stays this short
    gevent_cap: int  # ... and gevent at most this many
    cases: list[tuple[Config, Workload]] = field(default_factory=list)

    def add(self, workload: Workload, *configs: Config) -> None:
        self.cases += [(config, workload) for config in configs]


def stock(concurrency: int = 500, workers: int = 1) -> Config:
    return Config("threads", concurrency, workers=workers)


def peers(*processes: int) -> list[Config]:
    return [Config(pool, 500, processes=p) for pool in ("taskiq", "saq") for p in processes]


def full_profile(n: int) -> Profile:
    profile = Profile(3, LatencyPlan(500, 3.0), 6.0, 1500)
    backends = ("asyncio", "uvloop", "trio")
    single = [anyio(b, c) for c in (100, 500) for b in backends]
    processes = [anyio("asyncio", 500, processes=2), anyio("trio", 500, processes=2)]
    pairs = [anyio("asyncio", 500, workers=2), stock(500, workers=2)]
    pools = [stock(100), stock(500), Config("gevent", 100), Config("gevent", 500)]
    pools += [Config("solo", 1), Config("prefork", 2)]
    for workload in (Workload("noop", n), Workload("io", n, io_seconds=IO_SECONDS)):
        huge = [anyio(b, 2 * n) for b in backends] if workload.name == "io" else []
        profile.add(workload, *single, *processes, *pairs, *pools, *huge, *peers(1, 2))
    mixed = Workload("mixed", n, io_seconds=IO_SECONDS, cpu_ms=5.0, cpu_every=10)
    profile.add(mixed, *single, *processes, *pairs, *pools)
    held = [anyio(b, 2 * n) for b in backends]
    held += [anyio(b, 2 * n, processes=2) for b in ("asyncio", "trio")]
    # The same tasks all in flight under gevent, for comparison.
    profile.add(Workload("inflight", 2 * n, io_seconds=10.0, hold=True), *held)
    profile.add(Workload("inflight", 2 * n, io_seconds=10.0, hold=True), Config("gevent", 2 * n))
    # Celery alone holding every message, none started: the floor under inflight's RSS.
    reserved = Config("threads", 1, prefetch=2 * n)
    profile.add(Workload("reserved", 2 * n, reserve=True), reserved)
    return profile


def processes_profile(n: int) -> Profile:
    """What ``--processes`` is judged by, and its references, in one shorter run."""
    profile = Profile(3, LatencyPlan(500, 3.0), 6.0, 1500)
    anyio_cases = [anyio(b, 500, processes=p) for p in (1, 2) for b in ("asyncio", "trio")]
    pairs = [anyio("asyncio", 500, workers=2), stock(500), stock(500, workers=2)]
    profile.add(Workload("noop", n), *anyio_cases, *pairs, Config("prefork", 2), *peers(1, 2))
    profile.add(Workload("io", n, io_seconds=IO_SECONDS), *anyio_cases, *pairs, *peers(1, 2))
    mixed = Workload("mixed", n, io_seconds=IO_SECONDS, cpu_ms=5.0, cpu_every=10)
    profile.add(mixed, *anyio_cases, *pairs)
    held = [anyio(b, 2 * n, processes=p) for p in (1, 2) for b in ("asyncio", "trio")]
    profile.add(Workload("inflight", 2 * n, io_seconds=10.0, hold=True), *held)
    return profile


def quick_profile(n: int) -> Profile:
    """Every kind of case once, small: a smoke test of every code path."""
    profile = Profile(1, LatencyPlan(500, 2.0, min_n=20), 4.0, 500)
    single = [anyio(b, 500) for b in ("asyncio", "uvloop", "trio")]
    more = [anyio("asyncio", 500, processes=2), anyio("asyncio", 500, workers=2)]
    pools = [stock(500), stock(500, workers=2), Config("gevent", 500), Config("solo", 1)]
    pools.append(Config("prefork", 2))
    for workload in (Workload("noop", n), Workload("io", n, io_seconds=IO_SECONDS)):
        profile.add(workload, *single, *more, *pools, *peers(1))
    held = [anyio("asyncio", n), anyio("asyncio", n, processes=2)]
    profile.add(Workload("inflight", n, io_seconds=2.0, hold=True), *held)
    profile.add(Workload("reserved", n, reserve=True), Config("threads", 1, prefetch=n))
    return profile


def pacing_profile(n: int) -> Profile:
    """celery_anyio with its start pacing and without, interleaved, beside threads."""
    profile = Profile(3, LatencyPlan(500, 3.0), 6.0, 1500)
    cases = [
        anyio(b, 500, processes=p, start_pacing=pacing)
        for p in (1, 2)
        for b in ("asyncio", "trio")
        for pacing in (None, 0.0)
    ]
    for workload in (
        Workload("noop", n),
        Workload("io", n, io_seconds=IO_SECONDS),
        Workload("mixed", n, io_seconds=IO_SECONDS, cpu_ms=5.0, cpu_every=10),
    ):
        profile.add(workload, *cases, stock(500))
    # Every task in flight at once: pacing must not hold back tasks that only wait.
    held = [
        anyio(b, 2 * n, start_pacing=pacing) for b in ("asyncio", "trio") for pacing in (None, 0.0)
    ]
    profile.add(Workload("inflight", 2 * n, io_seconds=10.0, hold=True), *held)
    return profile


PROFILES = {"full": (full_profile, 5000), "processes": (processes_profile, 5000)}
PROFILES["quick"] = (quick_profile, 1000)
PROFILES["pacing"] = (pacing_profile, 5000)


def total_concurrency(config: Config) -> int:
    per_worker = config.concurrency * (config.processes if config.system != "celery" else 1)
    return per_worker * config.workers


def sized(profile: Profile, config: Config, workload: Workload) -> int:
    """Fewer tasks where the ideal drain would pass the profile's cap (solo, prefork on io).

    gevent gets a fixed cap too: Celery caches the result backend per thread,
    i.e. per greenlet, so gevent opens a Redis connection per task.
    """
    if workload.waits_for_all:
        return workload.n
    n = min(workload.n, profile.gevent_cap) if config.pool == "gevent" else workload.n
    if workload.task_seconds <= 0:
        return n
    cap = int(profile.drain_cap_seconds * total_concurrency(config) / workload.task_seconds)
    return min(n, max(cap, 50))


def timeout(config: Config, workload: Workload, n: int) -> float:
    ideal = n * workload.task_seconds / total_concurrency(config)
    if workload.waits_for_all:  # every task waits until all n are taken in
        ideal += n / 50
    return 60 + 3 * ideal


def importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def skipped(config: Config, workload: Workload, broker: str) -> str:
    """Why a case cannot run here, or ''."""
    if config.system != "celery" and broker != "redis":
        return f"{config.pool}: Redis only here"
    module = {"uvloop": "uvloop", "gevent": "gevent", "taskiq": "taskiq_redis", "saq": "saq"}
    needed = module.get(config.backend or "") or module.get(config.pool)
    if needed and not importable(needed):
        return f"`import {needed}` fails in this environment"
    if config.pool == "gevent" and workload.hold and broker == "rabbitmq":
        return "gevent drains at a few tasks/s on RabbitMQ: 10,000 held tasks only time out"
    return ""


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def kombu_raw(env: Environment, n: int, run: int) -> float | str:
    """The raw consume+ack rate of one kombu consumer on this broker, or why it failed."""
    try:
        return n / kombu_raw_seconds(env.broker_url, n, queue_name=env.queue("kombu-raw", run))
    except Exception as exc:  # noqa: BLE001 - a missing baseline, noted
        return f"kombu raw run {run} failed: {exc!r}"


def git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def source_digest() -> str:
    """A digest of the pool's source as the workers import it: did it change during the run?"""
    files = sorted((ROOT / "celery_anyio").rglob("*.py"))
    return hashlib.sha1(b"".join(path.read_bytes() for path in files)).hexdigest()[:12]


def versions() -> dict[str, str]:
    names = ("celery", "kombu", "anyio", "trio", "uvloop", "gevent", "redis", "taskiq", "saq")
    found = {}
    for name in (*names, "taskiq-redis"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every worker's stop()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument("--quick", action="store_true", help="the same as --profile quick")
    parser.add_argument("--broker", choices=sorted(BROKERS), default="redis")
    parser.add_argument("--runs", type=int, default=None, help="runs per case")
    parser.add_argument("-n", type=int, default=None, help="tasks per drain")
    parser.add_argument("--only", default="", help="only configs whose label contains one of a,b")
    parser.add_argument("--no-kombu", action="store_true", help="skip the raw kombu baseline")
    parser.add_argument("--out", type=Path, default=None, help="the JSON file to write")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    name = "quick" if args.quick else args.profile
    build, default_n = PROFILES[name]
    profile = build(args.n or default_n)
    runs = args.runs or profile.runs
    run_id = uuid.uuid4().hex[:8]
    env = Environment(
        args.broker,
        BROKERS[args.broker],
        REDIS_URL,
        run_id,
        ROOT / "benchmarks/results/logs" / run_id,
    )
    wanted = [part for part in args.only.split(",") if part]
    notes: list[str] = []
    cases: list[dict[str, Any]] = []
    for config, workload in profile.cases:
        if wanted and not any(part in config.label for part in wanted):
            continue
        why = skipped(config, workload, args.broker)
        if why:
            notes.append(f"{config.label} / {workload.name}: skipped ({why})")
            continue
        n = sized(profile, config, workload)
        cases.append(
            {"config": asdict(config), "label": config.label, "workload": asdict(workload),
             "n": n, "timeout": timeout(config, workload, n), "runs": [], "errors": []}
        )  # fmt: skip
    meta: dict[str, Any] = {
        "profile": name,
        "broker": args.broker,
        "broker_url": env.broker_url.replace("guest:guest@", "guest:***@"),
        "results_url": REDIS_URL,
        "runs": runs,
        "run_id": run_id,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(
            ["python -m benchmarks.run", *(sys.argv[1:] if argv is None else argv)]
        ),
        "worker_env": {k: v for k, v in os.environ.items() if k.startswith("CELERY_ANYIO_BENCH_")},
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted": git(
            "status", "--porcelain", "--", "celery_anyio", "benchmarks"
        ).splitlines(),
        "machine": {
            "cpus": psutil.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(),
            "versions": versions(),
        },
        "load_start": os.getloadavg(),
        "source_digest_start": source_digest(),
        "log_dir": str(env.log_dir.relative_to(ROOT)),
    }
    neighbours = NeighbourWatch()
    neighbours.start()
    started = time.monotonic()
    kombu: list[float] = []
    noop_n = next((w.n for _, w in profile.cases if w.name == "noop"), 5000)
    progress(f"{len(cases)} cases x {runs} runs on {args.broker}, run id {run_id}")
    try:
        # Run r of every case before run r + 1 of any: a burst of activity elsewhere
        # on the machine then hits one run of many cases, not every run of one.
        for run in range(runs):
            if not args.no_kombu:
                stop_all_workers()
                rate = kombu_raw(env, noop_n, run)
                if isinstance(rate, float):
                    kombu.append(rate)
                else:
                    notes.append(rate)
                progress(f"kombu raw: {rate}")
            for index, case in enumerate(cases, 1):
                where = f"run {run + 1}/{runs}, case {index}/{len(cases)}: {case['label']}"
                if any(error.startswith("BenchTimeout") for error in case["errors"]):
                    continue  # it timed out before: it would only take as long again
                progress(f"{where} / {case['workload']['name']} (n={case['n']})")
                run_one(env, profile, case, run)
    except KeyboardInterrupt:
        notes.append("interrupted: the results are incomplete")
    finally:
        neighbours.stop()
        stop_all_workers()
        if args.broker == "redis":
            forget_redis_bindings(REDIS_URL, run_id)
    meta.update(
        load_end=os.getloadavg(),
        source_digest_end=source_digest(),
        wall_minutes=(time.monotonic() - started) / 60,
        neighbours=neighbours.summary(5),
    )
    notes += [
        f"worker log {log}: " + " / ".join(f"`{line[:200]}`" for line in lines)
        for log, lines in log_problems(env.log_dir, limit=2).items()
    ]
    out = args.out or ROOT / "benchmarks/results" / f"{name}-{args.broker}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {"meta": meta, "kombu_raw": kombu, "cases": cases, "notes": notes}
    out.write_text(json.dumps(document, indent=1) + "\n")
    progress(f"wrote {out}; tables: python -m benchmarks.render {out}")
    return 0 if all(case["runs"] for case in cases) else 1


def run_one(env: Environment, profile: Profile, case: dict[str, Any], run: int) -> None:
    config, workload = Config(**case["config"]), Workload(**case["workload"])
    plan = None if workload.waits_for_all else profile.latency
    try:
        result = measure(env, config, workload, case["n"], run, case["timeout"], plan)
    except Exception as exc:  # noqa: BLE001 - recorded with the case
        case["errors"].append(f"{type(exc).__name__}: {exc}")
        if isinstance(exc, BenchTimeout):
            case["errors"][-1] = "BenchTimeout: " + str(exc)
        progress(f"  FAILED {case['errors'][-1]}")
        return
    result["load_1min"] = os.getloadavg()[0]  # how busy the machine was, run by run
    case["runs"].append(result)
    line = (
        f"  {result['tasks'] / result['seconds']:,.0f}/s, {result['cpu_ms_per_task']:.2f} CPU "
        f"ms/task, {result['peak_rss_mb']:.0f} MB, {result['peak_in_flight']} in flight"
    )
    if "lag_p99_ms" in result:
        line += f", lag p99 {result['lag_p99_ms']:.1f} ms"
    if "latency" in result:
        line += f", done p50 {result['latency']['done_p50']:.1f} ms"
    progress(line + "".join(f"; {k}: {result[k]}" for k in result if k.endswith("error")))


if __name__ == "__main__":
    raise SystemExit(main())
