"""Benchmark celery_anyio against Celery's stock pools; print and save a Markdown table.

``python benchmarks/run.py --quick --broker redis --out benchmarks/results/latest.md``
(see benchmarks/README.md for what is measured).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import celery
import psutil

from benchmarks.harness import (
    ANYIO_POOL,
    ROOT,
    DrainResult,
    Environment,
    LatencyResult,
    NeighbourWatch,
    PoolConfig,
    Workload,
    forget_redis_bindings,
    log_problems,
    measure_drain,
    measure_latency,
    percentile,
    stop_all_workers,
)

REDIS_URL = os.environ.get("CELERY_ANYIO_BENCH_REDIS", "redis://127.0.0.1:6379/14")
AMQP_URL = os.environ.get("CELERY_ANYIO_BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
BROKERS = {"redis": REDIS_URL, "rabbitmq": AMQP_URL}
BASELINE = ("threads", 500)
IO_SECONDS = 0.05


@dataclass(frozen=True)
class Profile:
    name: str
    workloads: tuple[Workload, ...]
    runs: int
    latency_n: int
    drain_cap_seconds: float  # slow pools get fewer messages (ideal drain <= this)
    latency_cap_seconds: float  # ... and fewer latency messages (publishing <= this)
    huge: bool  # -c 10000 for io, and the inflight workload


def make_profile(quick: bool, n: int | None) -> Profile:
    if quick:
        size = n or 2000
        workloads: tuple[Workload, ...] = (
            Workload("noop", size),
            Workload("io", size, io_seconds=IO_SECONDS),
        )
        return Profile("quick", workloads, 1, min(1000, size), 5.0, 2.0, huge=False)
    size = n or 5000
    workloads = (
        Workload("noop", size),
        Workload("io", size, io_seconds=IO_SECONDS),
        Workload("mixed", size, io_seconds=IO_SECONDS, cpu_ms=5.0, cpu_every=10),
        Workload("inflight", 2 * size, io_seconds=10.0),
    )
    return Profile("full", workloads, 3, min(2000, size), 10.0, 15.0, huge=True)


def gevent_available() -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", "import gevent"], check=False, capture_output=True
    )
    return probe.returncode == 0


def build_cases(profile: Profile, with_gevent: bool) -> list[tuple[PoolConfig, Workload]]:
    by_name = {workload.name: workload for workload in profile.workloads}
    regular = [w for w in profile.workloads if w.name != "inflight"]
    configs = [
        PoolConfig(ANYIO_POOL, c, backend) for backend in ("asyncio", "trio") for c in (100, 500)
    ]
    configs += [PoolConfig("threads", 100), PoolConfig("threads", 500)]
    configs += [PoolConfig("solo", 1), PoolConfig("prefork", 2)]
    if with_gevent:
        configs.append(PoolConfig("gevent", 500))
    cases = [(config, workload) for config in configs for workload in regular]
    if profile.huge:
        for backend in ("asyncio", "trio"):
            config = PoolConfig(ANYIO_POOL, by_name["inflight"].n, backend)
            cases += [(config, by_name["io"]), (config, by_name["inflight"])]
    return cases


def sized(profile: Profile, config: PoolConfig, workload: Workload) -> int:
    """Fewer messages where the ideal drain would exceed the profile's cap."""
    if workload.task_seconds <= 0 or workload.name == "inflight":
        return workload.n
    cap = int(profile.drain_cap_seconds * config.concurrency / workload.task_seconds)
    return min(workload.n, max(cap, 50))


# -- running ----------------------------------------------------------------------------


@dataclass
class Case:
    config: PoolConfig
    workload: Workload
    n: int
    drains: list[DrainResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    latency: LatencyResult | None = None
    latency_error: str = ""

    @property
    def median_seconds(self) -> float:
        return statistics.median(d.seconds for d in self.drains)

    @property
    def rate(self) -> float:
        return self.n / self.median_seconds


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_case(env: Environment, profile: Profile, case: Case, runs: int) -> None:
    ideal = case.n * case.workload.task_seconds / case.config.concurrency
    timeout = 60 + 3 * ideal
    for run in range(runs):
        try:
            drain = measure_drain(env, case.config, case.workload, case.n, run, timeout)
        except Exception as exc:  # noqa: BLE001 - recorded in the table
            case.errors.append(f"{type(exc).__name__}: {exc}")
            progress(f"  drain run {run}: FAILED {case.errors[-1]}")
            continue
        case.drains.append(drain)
        progress(
            f"  drain run {run}: {drain.seconds:.2f}s, {drain.rate:,.0f}/s, "
            f"{drain.cpu_ms_per_task:.2f} CPU ms/task, {drain.peak_rss / 2**20:.0f} MB"
        )
    if not case.drains or case.workload.name == "inflight":
        return
    rate = case.rate / 2
    n = min(profile.latency_n, max(50, int(rate * profile.latency_cap_seconds)))
    try:
        case.latency = measure_latency(
            env, case.config, case.workload, n, rate, timeout=60 + 3 * n / rate
        )
    except Exception as exc:  # noqa: BLE001 - recorded in the table
        case.latency_error = f"{type(exc).__name__}: {exc}"
        progress(f"  latency: FAILED {case.latency_error}")
        return
    lat = case.latency
    progress(
        f"  latency: {lat.n} at {lat.achieved_rate:,.0f}/s (target {lat.target_rate:,.0f}/s): "
        f"start p50 {percentile(lat.start_ms, 50):.1f} ms, p99 {percentile(lat.start_ms, 99):.1f}"
        f" ms; done p50 {percentile(lat.done_ms, 50):.1f} ms, p99 "
        f"{percentile(lat.done_ms, 99):.1f} ms"
    )


def run_kombu_raw(env: Environment, n: int, runs: int) -> tuple[list[float], str]:
    rates: list[float] = []
    for run in range(runs):
        command = [
            sys.executable, "-m", "benchmarks.kombu_raw", "--broker-url", env.broker_url,
            "-n", str(n), "--queue", env.queue("kombu-raw", f"r{run}"),
        ]  # fmt: skip
        try:
            proc = subprocess.run(
                command, cwd=ROOT, capture_output=True, text=True, timeout=180, check=True
            )
            rates.append(float(json.loads(proc.stdout.strip().splitlines()[-1])["rate"]))
        except (subprocess.SubprocessError, ValueError, KeyError, IndexError) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            return rates, f"kombu raw failed: {detail.strip().splitlines()[-1:]}"
        progress(f"  kombu raw run {run}: {rates[-1]:,.0f}/s")
    return rates, ""


# -- report -----------------------------------------------------------------------------

HEADER = (
    "| config | workload | drain s (median [min-max]) | tasks/s | vs threads -c 500 "
    "| CPU ms/task | peak RSS MB | start p50/p99 ms | done p50/p99 ms |"
)


def _row(case: Case, baselines: dict[str, float], latency_n: int) -> str:
    workload = case.workload.name
    sizes = [f"n={case.n}"] if case.n != case.workload.n else []
    if case.latency is not None and case.latency.n != latency_n:
        sizes.append(f"latency n={case.latency.n}")
    if sizes:
        workload += f" ({', '.join(sizes)})"
    cells = [case.config.label, workload]
    if not case.drains:
        error = "; ".join(dict.fromkeys(case.errors)).replace("|", "/")
        return "| " + " | ".join([*cells, f"ERROR: {error}", *["—"] * 6]) + " |"
    seconds = [d.seconds for d in case.drains]
    drain = f"{case.median_seconds:.2f} [{min(seconds):.2f}-{max(seconds):.2f}]"
    if case.errors:
        drain += f" ({len(case.errors)} failed)"
    baseline = baselines.get(case.workload.name)
    ratio = f"{case.rate / baseline:.2f}x" if baseline else "—"
    cpu = statistics.median(d.cpu_ms_per_task for d in case.drains)
    rss = max(d.peak_rss for d in case.drains) / 2**20
    start = done = "—"
    if case.latency is not None:
        lat = case.latency
        start = f"{percentile(lat.start_ms, 50):.1f} / {percentile(lat.start_ms, 99):.1f}"
        done = f"{percentile(lat.done_ms, 50):.1f} / {percentile(lat.done_ms, 99):.1f}"
    elif case.latency_error:
        start = done = "ERROR"
    cells += [drain, f"{case.rate:,.0f}", ratio, f"{cpu:.2f}", f"{rss:.0f}", start, done]
    return "| " + " | ".join(cells) + " |"


def render(
    cases: Sequence[Case],
    env: Environment,
    profile: Profile,
    runs: int,
    kombu_rates: list[float],
    notes: list[str],
    wall_seconds: float,
) -> str:
    baselines = {
        case.workload.name: case.rate
        for case in cases
        if (case.config.pool, case.config.concurrency) == BASELINE and case.drains
    }
    lines = [
        f"# celery_anyio benchmarks ({profile.name} profile, broker: {env.broker})",
        "",
        (
            f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, run id `{env.run_id}`, "
            f"wall time {wall_seconds:.0f} s"
        ),
        (
            f"- machine: {psutil.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"Celery {celery.__version__}, runs per drain: {runs}"
        ),
        f"- broker `{_redact(env.broker_url)}`, results `{env.results_url}`",
        "",
        HEADER,
        "|" + "---|" * HEADER.count(" | ") + "---|",
        *(_row(case, baselines, profile.latency_n) for case in cases),
        "",
    ]
    if kombu_rates:
        kombu = statistics.median(kombu_rates)
        lines.append(f"**kombu raw** (one consumer, prefetch 100, ack each): {kombu:,.0f} msgs/s")
        best = max(
            (c for c in cases if c.config.is_async and c.workload.name == "io" and c.drains),
            key=lambda c: c.rate,
            default=None,
        )
        if best is not None:
            lines.append(
                f"**best celery_anyio io rate / kombu raw**: {best.rate / kombu:.2f} "
                f"({best.config.label}: {best.rate:,.0f}/s vs {kombu:,.0f}/s)"
            )
        lines.append("")
    if notes:
        lines += ["## Notes", "", *(f"- {note}" for note in notes), ""]
    return "\n".join(lines)


def _redact(url: str) -> str:
    return url.replace("guest:guest@", "guest:***@")


# -- main -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="noop + io, 2000 tasks, 1 run")
    parser.add_argument("--broker", choices=sorted(BROKERS), default="redis")
    parser.add_argument("--runs", type=int, default=None, help="drains per case (3 full/1 quick)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/latest.md")
    parser.add_argument("-n", type=int, default=None, help="override the task count")
    parser.add_argument("--only", default="", help="only configs whose label contains this")
    parser.add_argument("--no-kombu", action="store_true", help="skip the raw kombu baseline")
    return parser.parse_args(argv)


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every worker's ``finally: stop()``


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    profile = make_profile(args.quick, args.n)
    runs = args.runs or profile.runs
    run_id = uuid.uuid4().hex[:8]
    env = Environment(
        broker=args.broker,
        broker_url=BROKERS[args.broker],
        results_url=REDIS_URL,
        run_id=run_id,
        log_dir=ROOT / "benchmarks/results/logs" / run_id,
    )
    notes: list[str] = []
    with_gevent = gevent_available()
    if not with_gevent:
        notes.append("gevent: skipped (`import gevent` fails in this environment)")
    neighbours = NeighbourWatch()
    neighbours.start()
    cases = [
        Case(config, workload, sized(profile, config, workload))
        for config, workload in build_cases(profile, with_gevent)
        if args.only in config.label
    ]
    started = time.monotonic()
    kombu_rates: list[float] = []
    try:
        if not args.no_kombu:
            progress(f"kombu raw on {args.broker}")
            kombu_n = next(w.n for w in profile.workloads if w.name == "noop")
            kombu_rates, error = run_kombu_raw(env, kombu_n, runs)
            if error:
                notes.append(error)
        for case in cases:
            progress(f"{case.config.label} / {case.workload.name} (n={case.n})")
            run_case(env, profile, case, runs)
    except KeyboardInterrupt:
        notes.append("interrupted: the table is incomplete")
    finally:
        neighbours.stop()
        stop_all_workers()
        if args.broker == "redis":
            try:
                forget_redis_bindings(REDIS_URL, run_id)
            except Exception as exc:  # noqa: BLE001 - only tidying up
                notes.append(f"could not remove this run's kombu bindings: {exc!r}")
    if any(c.n != c.workload.n for c in cases):
        notes.append(
            f"(n=…): fewer tasks for slow pools, so the ideal drain stays under "
            f"{profile.drain_cap_seconds:.0f} s"
        )
    if any(c.latency is not None and c.latency.n != profile.latency_n for c in cases):
        notes.append(
            f"(latency n=…): latency runs publish {profile.latency_n} tasks, or for at most "
            f"{profile.latency_cap_seconds:.0f} s (at least 50 tasks) at half the drain rate"
        )
    for case in cases:
        lat = case.latency
        if lat is not None and lat.achieved_rate < 0.9 * lat.target_rate:
            notes.append(
                f"{case.config.label} / {case.workload.name}: latency publisher reached only "
                f"{lat.achieved_rate:,.0f}/s of {lat.target_rate:,.0f}/s"
            )
        if case.latency_error:
            notes.append(
                f"{case.config.label} / {case.workload.name}: latency {case.latency_error}"
            )
    busy = neighbours.summary()
    if busy:
        notes.append("other busy processes during the run (numbers are skewed): " + busy)
    for log, lines in log_problems(env.log_dir).items():
        notes.append(f"worker log `{log}`: " + " / ".join(f"`{line[:160]}`" for line in lines))
    notes.append(f"worker logs: `{env.log_dir.relative_to(ROOT)}`")
    report = render(cases, env, profile, runs, kombu_rates, notes, time.monotonic() - started)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report + "\n")
    progress(f"wrote {args.out}")
    return 0 if all(case.drains for case in cases) else 1


if __name__ == "__main__":
    raise SystemExit(main())
