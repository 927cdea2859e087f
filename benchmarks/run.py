"""Benchmark celery_anyio against Celery's stock pools; print and save Markdown tables.

``python benchmarks/run.py [--quick] [--broker redis|rabbitmq] [--out PATH]``
measures every case of issue 5 in one run and ends with a "targets" table
(see benchmarks/README.md for the method).
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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil

from benchmarks.harness import (
    ANYIO_POOL,
    ROOT,
    BenchTimeout,
    Environment,
    LatencyPlan,
    NeighbourWatch,
    PoolConfig,
    RunResult,
    Workload,
    forget_redis_bindings,
    log_problems,
    measure_run,
    percentile,
    stop_all_workers,
)

REDIS_URL = os.environ.get("CELERY_ANYIO_BENCH_REDIS", "redis://127.0.0.1:6379/14")
AMQP_URL = os.environ.get("CELERY_ANYIO_BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
BROKERS = {"redis": REDIS_URL, "rabbitmq": AMQP_URL}
IO_SECONDS = 0.05
HUGE = 10_000  # -c for the inflight workload (and one more io case) in the full profile

# Issue 5's targets.
IO_VS_THREADS = 1.5
IO_VS_GEVENT = 3.0
IO_VS_KOMBU = 0.85
NOOP_VS_SOLO = 1.2
INFLIGHT_MB = 150.0
LAG_P99_MS = 5.0
TRIO_WITHIN = 1.25


@dataclass(frozen=True)
class Profile:
    name: str
    workloads: tuple[Workload, ...]
    runs: int
    latency: LatencyPlan  # per run
    drain_cap_seconds: float  # slow pools get fewer messages (ideal drain <= this)
    pool_caps: dict[str, int]  # ... and at most this many for pools known to be slow
    anyio_concurrency: tuple[int, ...]  # celery_anyio, for every workload but inflight
    huge_concurrency: int  # celery_anyio -c for inflight (and io)
    huge_workloads: tuple[str, ...]
    huge_variants: tuple[str, ...]  # which of asyncio/uvloop/trio run the huge cases
    stock: tuple[PoolConfig, ...]  # Celery's own pools, with the sync tasks
    references: dict[str, tuple[PoolConfig, ...]]  # extra configs for one workload only


def make_profile(quick: bool, n: int | None) -> Profile:
    if quick:
        size = n or 1000
        return Profile(
            name="quick",
            workloads=(
                Workload("noop", size),
                Workload("io", size, io_seconds=IO_SECONDS),
                Workload("inflight", size, io_seconds=2.0, hold=True),
                Workload("reserved", size, reserve=True),
            ),
            runs=1,
            latency=LatencyPlan(max_n=500, max_seconds=2.0, min_n=20),
            drain_cap_seconds=4.0,
            pool_caps={"gevent": 500},
            anyio_concurrency=(500,),
            huge_concurrency=size,
            huge_workloads=("inflight",),
            huge_variants=("asyncio",),
            stock=(
                PoolConfig("threads", 500),
                PoolConfig("gevent", 500),
                PoolConfig("solo", 1),
                PoolConfig("prefork", 2),
            ),
            references={"reserved": (PoolConfig("threads", 1, prefetch=size),)},
        )
    size = n or 5000
    return Profile(
        name="full",
        workloads=(
            Workload("noop", size),
            Workload("io", size, io_seconds=IO_SECONDS),
            Workload("mixed", size, io_seconds=IO_SECONDS, cpu_ms=5.0, cpu_every=10),
            Workload("inflight", 2 * size, io_seconds=10.0, hold=True),
            Workload("reserved", 2 * size, reserve=True),
        ),
        runs=3,
        latency=LatencyPlan(max_n=500, max_seconds=3.0),
        drain_cap_seconds=6.0,
        pool_caps={"gevent": 1500},
        anyio_concurrency=(100, 500),
        huge_concurrency=2 * size,
        huge_workloads=("io", "inflight"),
        huge_variants=("asyncio", "uvloop", "trio"),
        stock=(
            PoolConfig("threads", 100),
            PoolConfig("threads", 500),
            PoolConfig("gevent", 100),
            PoolConfig("gevent", 500),
            PoolConfig("solo", 1),
            PoolConfig("prefork", 2),
        ),
        references={
            # The same 10,000 tasks all in flight under gevent, and Celery alone
            # holding 10,000 received messages (none started): what the inflight
            # target's RSS compares with.
            "inflight": (PoolConfig("gevent", 2 * size),),
            "reserved": (PoolConfig("threads", 1, prefetch=2 * size),),
        },
    )


def worker_settings_env() -> str:
    """``CELERY_ANYIO_BENCH_*`` variables that change the workers' settings, as a prefix."""
    names = ("CELERY_ANYIO_BENCH_RESULT_THREADS",)
    return "".join(f"{name}={os.environ[name]} " for name in names if os.environ.get(name))


def importable(module: str) -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", f"import {module}"], check=False, capture_output=True
    )
    return probe.returncode == 0


def anyio_config(variant: str, concurrency: int) -> PoolConfig:
    if variant == "uvloop":
        return PoolConfig(ANYIO_POOL, concurrency, "asyncio", uvloop=True)
    return PoolConfig(ANYIO_POOL, concurrency, variant)


def build_cases(
    profile: Profile,
    variants: Sequence[str],
    stock: Sequence[PoolConfig],
    references: dict[str, tuple[PoolConfig, ...]],
) -> list[tuple[PoolConfig, Workload]]:
    """Every (config, workload), grouped by workload so compared cases run close in time."""
    cases: list[tuple[PoolConfig, Workload]] = []
    for workload in profile.workloads:
        configs: list[PoolConfig] = []
        if not workload.waits_for_all:
            for concurrency in profile.anyio_concurrency:
                configs += [anyio_config(variant, concurrency) for variant in variants]
            configs += stock
        if workload.name in profile.huge_workloads:
            configs += [
                anyio_config(variant, profile.huge_concurrency)
                for variant in variants
                if variant in profile.huge_variants
            ]
        configs += references.get(workload.name, ())
        cases += [(config, workload) for config in configs]
    return cases


def sized(profile: Profile, config: PoolConfig, workload: Workload) -> int:
    """Fewer messages where the ideal drain would exceed the profile's cap.

    gevent also gets a fixed cap: Celery caches the result backend per thread,
    i.e. per greenlet, so it opens a Redis connection per task and drains at a
    fraction of the other pools' rate.
    """
    if workload.waits_for_all:
        return workload.n
    n = min(workload.n, profile.pool_caps.get(config.pool, workload.n))
    if workload.task_seconds <= 0:
        return n
    cap = int(profile.drain_cap_seconds * config.concurrency / workload.task_seconds)
    return min(n, max(cap, 50))


# -- running ----------------------------------------------------------------------------


@dataclass
class Case:
    config: PoolConfig
    workload: Workload
    n: int
    runs: list[RunResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    timed_out: bool = False  # then its remaining runs are skipped

    @property
    def label(self) -> str:
        return f"{self.config.label} / {self.workload.name}"

    @property
    def ok(self) -> bool:
        return bool(self.runs)

    @property
    def median_seconds(self) -> float:
        return statistics.median(r.drain.seconds for r in self.runs)

    @property
    def rate(self) -> float:
        return self.n / self.median_seconds

    @property
    def rss_mb(self) -> list[float]:
        return [r.drain.peak_rss / 2**20 for r in self.runs]

    @property
    def lag_p99(self) -> list[float]:
        return [r.drain.loop_lag_ms["p99"] for r in self.runs if r.drain.loop_lag_ms]

    @property
    def peak_in_flight(self) -> int:
        return min(r.drain.peak_in_flight for r in self.runs)

    @property
    def timeout(self) -> float:
        ideal = self.n * self.workload.task_seconds / self.config.concurrency
        if self.workload.waits_for_all:  # every task waits for the worker to take in all n
            ideal += self.n / 50
        return 60 + 3 * ideal


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_once(env: Environment, profile: Profile, case: Case, run: int) -> None:
    plan = None if case.workload.waits_for_all else profile.latency
    try:
        result = measure_run(env, case.config, case.workload, case.n, run, case.timeout, plan)
    except Exception as exc:  # noqa: BLE001 - recorded in the table
        case.errors.append(f"{type(exc).__name__}: {exc}")
        case.timed_out = isinstance(exc, BenchTimeout)
        progress(f"  FAILED {case.errors[-1]}")
        return
    case.runs.append(result)
    drain = result.drain
    line = (
        f"  drain {drain.seconds:.2f}s, {drain.rate:,.0f}/s, "
        f"{drain.cpu_ms_per_task:.2f} CPU ms/task, {drain.peak_rss / 2**20:.0f} MB"
    )
    if drain.loop_lag_ms:
        line += f", loop {drain.loop} lag p99 {drain.loop_lag_ms['p99']:.1f} ms"
    if drain.stats_error:
        line += f", no stats ({drain.stats_error})"
    lat = result.latency
    if lat is not None:
        line += (
            f"; latency {lat.n} at {lat.achieved_rate:,.0f}/s: start p50/p99 "
            f"{percentile(lat.start_ms, 50):.1f}/{percentile(lat.start_ms, 99):.1f} ms, done "
            f"{percentile(lat.done_ms, 50):.1f}/{percentile(lat.done_ms, 99):.1f} ms"
        )
    elif result.latency_error:
        line += f"; latency FAILED {result.latency_error}"
    progress(line)


def run_kombu_raw(env: Environment, n: int, run: int) -> tuple[float | None, str]:
    command = [
        sys.executable, "-m", "benchmarks.kombu_raw", "--broker-url", env.broker_url,
        "-n", str(n), "--queue", env.queue("kombu-raw", f"r{run}"),
    ]  # fmt: skip
    stop_all_workers()
    try:
        proc = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=180, check=True
        )
        rate = float(json.loads(proc.stdout.strip().splitlines()[-1])["rate"])
    except (subprocess.SubprocessError, ValueError, KeyError, IndexError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        return None, f"kombu raw run {run} failed: {detail.strip().splitlines()[-1:]}"
    progress(f"kombu raw run {run}: {rate:,.0f}/s")
    return rate, ""


# -- report -----------------------------------------------------------------------------


def _spread(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    """``median [min-max]`` (just the value for one run)."""
    if not values:
        return "—"
    med = fmt.format(statistics.median(values))
    if len(values) == 1:
        return med
    return f"{med} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def _latency_cell(runs: Sequence[RunResult], attr: str) -> str:
    lats = [r.latency for r in runs if r.latency is not None]
    if not lats:
        return "ERROR" if any(r.latency_error for r in runs) else "—"
    p50 = [percentile(getattr(lat, attr), 50) for lat in lats]
    p99 = [percentile(getattr(lat, attr), 99) for lat in lats]
    return f"{statistics.median(p50):.1f} / {_spread(p99, '{:.1f}')}"


class Figures:
    """Look-ups over the finished cases: rates, baselines, ratios."""

    def __init__(self, cases: Sequence[Case], kombu_rates: Sequence[float]) -> None:
        self.cases = [case for case in cases if case.ok]
        self.kombu = statistics.median(kombu_rates) if kombu_rates else None

    def find(self, workload: str, pool: str, concurrency: int | None = None) -> Case | None:
        for case in self.cases:
            if case.workload.name != workload:
                continue
            config = case.config
            if config.variant == pool and concurrency in (None, config.concurrency):
                return case
        return None

    def anyio(self, workload: str) -> list[Case]:
        return [c for c in self.cases if c.config.is_async and c.workload.name == workload]

    def anyio_all(self) -> list[Case]:
        return [c for c in self.cases if c.config.is_async]

    def best_anyio(self, workload: str) -> Case | None:
        return max(self.anyio(workload), key=lambda c: c.rate, default=None)

    def vs(self, case: Case, pool: str, concurrency: int | None = None) -> float | None:
        other = self.find(case.workload.name, pool, concurrency)
        return case.rate / other.rate if other is not None else None


def _rate(case: Case | None) -> str:
    return "—" if case is None else f"{case.rate:,.0f}"


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def results_table(cases: Sequence[Case], figures: Figures) -> list[str]:
    header = (
        "| config | workload | drain s | tasks/s | vs threads -c 500 | CPU ms/task "
        "| peak RSS MB | loop lag p99 ms | start p50 / p99 ms | done p50 / p99 ms |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for case in cases:
        workload = case.workload.name
        if case.n != case.workload.n:
            workload += f" (n={case.n})"
        if case.ok and case.workload.hold:
            workload += f" (peak {case.peak_in_flight:,} in flight)"
        if case.ok and case.workload.reserve:
            workload += f" ({case.n:,} received before the first returned)"
        cells = [case.config.label, workload]
        if not case.ok:
            error = "; ".join(dict.fromkeys(case.errors)).replace("|", "/")
            lines.append("| " + " | ".join([*cells, f"ERROR: {error}", *["—"] * 7]) + " |")
            continue
        drain = _spread([r.drain.seconds for r in case.runs])
        if case.errors:
            drain += f" ({len(case.errors)} failed)"
        cells += [
            drain,
            f"{case.rate:,.0f}",
            _x(figures.vs(case, "threads", 500)),
            _spread([r.drain.cpu_ms_per_task for r in case.runs]),
            _spread(case.rss_mb, "{:.0f}"),
            _spread(case.lag_p99, "{:.1f}") if case.config.is_async else "—",
            _latency_cell(case.runs, "start_ms"),
            _latency_cell(case.runs, "done_ms"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def ratios_tables(figures: Figures, variants: Sequence[str]) -> list[str]:
    lines = [
        "celery_anyio against the stock pools (tasks/s ratios, same run):",
        "",
        (
            "| config | io ÷ threads -c 500 | io ÷ gevent -c 500 | io ÷ kombu raw "
            "| noop ÷ solo | noop ÷ threads -c 500 | mixed ÷ threads -c 500 |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    configs = list(dict.fromkeys(c.config for c in figures.cases if c.config.is_async))
    for config in configs:
        cells = [config.label]
        io = next((c for c in figures.anyio("io") if c.config == config), None)
        noop = next((c for c in figures.anyio("noop") if c.config == config), None)
        mixed = next((c for c in figures.anyio("mixed") if c.config == config), None)
        kombu = io.rate / figures.kombu if io is not None and figures.kombu else None
        cells += [
            _x(figures.vs(io, "threads", 500)) if io else "—",
            _x(figures.vs(io, "gevent", 500)) if io else "—",
            _x(kombu),
            _x(figures.vs(noop, "solo")) if noop else "—",
            _x(figures.vs(noop, "threads", 500)) if noop else "—",
            _x(figures.vs(mixed, "threads", 500)) if mixed else "—",
        ]
        if any(cell != "—" for cell in cells[1:]):
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Backends at the same -c (tasks/s; ratios of tasks/s):",
        "",
        "| workload | -c | " + " | ".join(f"{v}/s" for v in variants) + " | trio ÷ asyncio "
        "| uvloop ÷ asyncio |",
        "|" + "---|" * (4 + len(variants)),
    ]
    keys = dict.fromkeys((c.workload.name, c.config.concurrency) for c in figures.anyio_all())
    for workload, concurrency in keys:
        found = {v: figures.find(workload, v, concurrency) for v in variants}
        asyncio = found.get("asyncio")
        cells = [workload, str(concurrency)]
        cells += [_rate(found[v]) for v in variants]
        for other in ("trio", "uvloop"):
            case = found.get(other)
            cells.append(_x(case.rate / asyncio.rate) if case and asyncio else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


@dataclass
class Target:
    name: str
    measured: str
    value: float | None
    passed: bool | None  # None: not measured in this run


def _ratio_target(
    name: str, case: Case | None, other: Case | None, other_label: str, limit: float
) -> Target:
    if case is None or other is None:
        return Target(name, f"not measured ({other_label} or celery_anyio missing)", None, None)
    ratio = case.rate / other.rate
    measured = (
        f"{ratio:.2f}x: {case.config.label} {case.rate:,.0f}/s vs {other_label} {other.rate:,.0f}/s"
    )
    return Target(name, measured, ratio, ratio >= limit)


def targets(figures: Figures) -> list[Target]:
    best_io = figures.best_anyio("io")
    best_noop = figures.best_anyio("noop")
    out = [
        _ratio_target(
            f"io ≥ {IO_VS_THREADS}x threads -c 500",
            best_io,
            figures.find("io", "threads", 500),
            "threads -c 500",
            IO_VS_THREADS,
        ),
        _ratio_target(
            f"io ≥ {IO_VS_GEVENT:.0f}x gevent -c 500",
            best_io,
            figures.find("io", "gevent", 500),
            "gevent -c 500",
            IO_VS_GEVENT,
        ),
    ]
    name = f"io ≥ {IO_VS_KOMBU}x kombu raw consume+ack"
    if best_io is None or figures.kombu is None:
        out.append(Target(name, "not measured", None, None))
    else:
        ratio = best_io.rate / figures.kombu
        out.append(
            Target(
                name,
                f"{ratio:.2f}x: {best_io.config.label} {best_io.rate:,.0f}/s vs kombu raw "
                f"{figures.kombu:,.0f} msgs/s",
                ratio,
                ratio >= IO_VS_KOMBU,
            )
        )
    out.append(
        _ratio_target(
            f"noop ≥ {NOOP_VS_SOLO}x solo",
            best_noop,
            figures.find("noop", "solo"),
            "solo",
            NOOP_VS_SOLO,
        )
    )
    for case in figures.anyio("inflight"):
        name = f"inflight ≤ {INFLIGHT_MB:.0f} MB RSS ({case.config.variant})"
        peak = max(case.rss_mb)
        held = case.peak_in_flight
        size = f"{held:,} of {case.n:,} tasks in flight at once, -c {case.config.concurrency:,}"
        if held < HUGE:
            out.append(
                Target(name, f"{peak:.0f} MB with {size}: not the target's size", peak, None)
            )
        else:
            measured = f"{peak:.0f} MB (max of {len(case.runs)} runs), {size}"
            measured += _memory_references(figures, case)
            out.append(Target(name, measured, peak, peak <= INFLIGHT_MB))
    variants = dict.fromkeys(c.config.variant for c in figures.anyio("io"))
    for variant in variants:
        name = f"loop lag p99 ≤ {LAG_P99_MS:.0f} ms under io ({variant})"
        lags = [
            (statistics.median(c.lag_p99), c) for c in figures.anyio("io")
            if c.config.variant == variant and c.lag_p99
        ]  # fmt: skip
        if not lags:
            out.append(Target(name, "not measured (no `inspect stats` reply)", None, None))
            continue
        worst, case = max(lags, key=lambda item: item[0])
        each = ", ".join(f"-c {c.config.concurrency}: {lag:.1f}" for lag, c in lags)
        measured = f"worst {worst:.1f} ms at -c {case.config.concurrency} ({each} ms; medians)"
        out.append(Target(name, measured, worst, worst <= LAG_P99_MS))
    name = f"trio within {TRIO_WITHIN}x asyncio (tasks/s, same -c)"
    pairs = []
    for case in figures.anyio_all():
        if case.config.variant == "trio":
            asyncio = figures.find(case.workload.name, "asyncio", case.config.concurrency)
            if asyncio is not None:
                pairs.append((case.rate / asyncio.rate, case))
    if not pairs:
        out.append(Target(name, "not measured", None, None))
    else:
        worst_ratio, worst_case = min(pairs, key=lambda item: item[0])
        best_ratio = max(ratio for ratio, _ in pairs)
        measured = (
            f"worst trio ÷ asyncio {worst_ratio:.2f}x ({worst_case.workload.name} -c "
            f"{worst_case.config.concurrency}); range {worst_ratio:.2f}-{best_ratio:.2f}x "
            f"over {len(pairs)} pairs"
        )
        out.append(Target(name, measured, worst_ratio, worst_ratio >= 1 / TRIO_WITHIN))
    return out


def _memory_references(figures: Figures, case: Case) -> str:
    """The same run's references for an inflight peak: Celery's floor and gevent."""
    text = ""
    floor = figures.find("reserved", "threads")
    if floor is not None:
        floor_mb = max(floor.rss_mb)
        text += (
            f"; Celery alone, holding {floor.n:,} received messages with none started "
            f"(threads -c 1): {floor_mb:.0f} MB, so {_kb_per_task(max(case.rss_mb), floor_mb, case.n)} "
            "per task above that"
        )
    gevent = figures.find("inflight", "gevent")
    if gevent is not None:
        text += f"; gevent -c {gevent.config.concurrency:,}: {max(gevent.rss_mb):.0f} MB"
        if floor is not None:
            text += f" ({_kb_per_task(max(gevent.rss_mb), max(floor.rss_mb), gevent.n)} per task)"
    return text


def _kb_per_task(peak_mb: float, floor_mb: float, n: int) -> str:
    return f"{(peak_mb - floor_mb) * 1024 / n:.1f} KB"


def targets_table(items: Iterable[Target]) -> list[str]:
    lines = ["| target (issue 5) | measured | result |", "|---|---|---|"]
    for item in items:
        result = "—" if item.passed is None else ("PASS" if item.passed else "FAIL")
        lines.append(f"| {item.name} | {item.measured} | {result} |")
    return lines


def versions() -> str:
    names = ("celery", "kombu", "anyio", "trio", "uvloop", "gevent", "redis")
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def render(
    cases: Sequence[Case],
    env: Environment,
    profile: Profile,
    variants: Sequence[str],
    kombu_rates: list[float],
    notes: list[str],
    header: Sequence[str],
) -> tuple[str, list[Target]]:
    figures = Figures(cases, kombu_rates)
    goals = targets(figures)
    lines = [
        f"# celery_anyio benchmarks ({profile.name} profile, broker: {env.broker})",
        "",
        *header,
        "",
        "## Targets",
        "",
        *targets_table(goals),
        "",
        "## Results",
        "",
        *results_table(cases, figures),
        "",
    ]
    if figures.kombu is not None:
        each = ", ".join(f"{rate:,.0f}" for rate in kombu_rates)
        kombu = f"{figures.kombu:,.0f} msgs/s (median of {len(kombu_rates)}: {each})"
        lines += [f"**kombu raw** (one consumer, prefetch 100, ack each): {kombu}", ""]
    lines += ["## Ratios", "", *ratios_tables(figures, variants), ""]
    if notes:
        lines += ["## Notes", "", *(f"- {note}" for note in notes), ""]
    return "\n".join(lines), goals


def _redact(url: str) -> str:
    return url.replace("guest:guest@", "guest:***@")


# -- main -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke test: ~2-3 min, 1 run")
    parser.add_argument("--broker", choices=sorted(BROKERS), default="redis")
    parser.add_argument("--runs", type=int, default=None, help="runs per case (3 full/1 quick)")
    parser.add_argument("--out", type=Path, default=None, help="Markdown report path")
    parser.add_argument("-n", type=int, default=None, help="override the task count")
    parser.add_argument("--only", default="", help="only configs whose label contains this")
    parser.add_argument("--no-kombu", action="store_true", help="skip the raw kombu baseline")
    return parser.parse_args(argv)


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every worker's ``finally: stop()``


def source_revision() -> str:
    """The commit the workers run, and whether celery_anyio/ or benchmarks/ differ from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "celery_anyio", "benchmarks"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return f"{ROOT} (not a git checkout)"
    changed = sorted({line[3:] for line in dirty if line.strip()})
    if not changed:
        return f"commit {commit}"
    return f"commit {commit} + uncommitted changes in {', '.join(changed)}"


def _loadavg() -> str:
    return " / ".join(f"{value:.2f}" for value in os.getloadavg())


def _without_gevent(
    references: dict[str, tuple[PoolConfig, ...]],
) -> dict[str, tuple[PoolConfig, ...]]:
    return {
        name: tuple(c for c in configs if c.pool != "gevent")
        for name, configs in references.items()
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    profile = make_profile(args.quick, args.n)
    runs = args.runs or profile.runs
    run_id = uuid.uuid4().hex[:8]
    out = args.out or ROOT / "benchmarks/results" / f"{profile.name}-{args.broker}.md"
    env = Environment(
        broker=args.broker,
        broker_url=BROKERS[args.broker],
        results_url=REDIS_URL,
        run_id=run_id,
        log_dir=ROOT / "benchmarks/results/logs" / run_id,
    )
    notes: list[str] = []
    variants = ["asyncio", "uvloop", "trio"]
    stock = list(profile.stock)
    if not importable("uvloop"):
        variants.remove("uvloop")
        notes.append("uvloop: skipped (`import uvloop` fails in this environment)")
    references = dict(profile.references)
    if not importable("gevent"):
        stock = [config for config in stock if config.pool != "gevent"]
        references = _without_gevent(references)
        notes.append("gevent: skipped (`import gevent` fails in this environment)")
    elif args.broker == "rabbitmq" and _without_gevent(references) != references:
        # gevent drains ~10 tasks/s on RabbitMQ (see benchmarks/README.md): 10,000
        # held tasks would only time out, after ~12 minutes.
        references = _without_gevent(references)
        notes.append(
            "gevent -c 10000 inflight: skipped on RabbitMQ (gevent drains ~10 tasks/s there)"
        )
    cases = [
        Case(config, workload, sized(profile, config, workload))
        for config, workload in build_cases(profile, variants, stock, references)
        if args.only in config.label
    ]
    load_start = _loadavg()
    date = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    neighbours = NeighbourWatch()
    neighbours.start()
    started = time.monotonic()
    kombu_rates: list[float] = []
    kombu_n = next(w.n for w in profile.workloads if w.name == "noop")
    progress(f"{len(cases)} cases x {runs} runs on {args.broker}, run id {run_id}")
    try:
        # Round robin: run r of every case before run r+1 of any, so a burst of
        # neighbour activity hits one run of many cases, not every run of one.
        for run in range(runs):
            if not args.no_kombu:
                rate, error = run_kombu_raw(env, kombu_n, run)
                if rate is not None:
                    kombu_rates.append(rate)
                if error:
                    notes.append(error)
            for index, case in enumerate(cases, 1):
                where = f"run {run + 1}/{runs}, case {index}/{len(cases)}: {case.label}"
                if case.timed_out:
                    progress(f"{where}: skipped (timed out before)")
                    continue
                progress(f"{where} (n={case.n})")
                run_once(env, profile, case, run)
    except KeyboardInterrupt:
        notes.append("interrupted: the tables are incomplete")
    finally:
        neighbours.stop()
        stop_all_workers()
        if args.broker == "redis":
            try:
                forget_redis_bindings(REDIS_URL, run_id)
            except Exception as exc:  # noqa: BLE001 - only tidying up
                notes.append(f"could not remove this run's kombu bindings: {exc!r}")
    wall = time.monotonic() - started
    notes += collect_notes(cases, profile, env, neighbours)
    header = [
        f"- date: {date}, run id `{run_id}`, wall time {wall / 60:.1f} min",
        (
            f"- command: `{worker_settings_env()}python benchmarks/run.py "
            f"{' '.join(sys.argv[1:] if argv is None else argv)}`"
        ),
        (
            f"- machine: {psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.1f} GiB, "
            f"Python {platform.python_version()}; {versions()}"
        ),
        f"- source: {source_revision()}",
        f"- load average (1/5/15 min) at start: {load_start}; at end: {_loadavg()}",
        f"- neighbours: {neighbours.summary() or 'no other process seen above 20% CPU'}",
        f"- broker `{_redact(env.broker_url)}`, results `{env.results_url}`; runs per case: {runs}",
    ]
    report, goals = render(cases, env, profile, variants, kombu_rates, notes, header)
    print(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report + "\n")
    out.with_suffix(".json").write_text(
        json.dumps(raw_results(cases, kombu_rates, goals, header), indent=1) + "\n"
    )
    progress(f"wrote {out} and {out.with_suffix('.json').name}")
    return 0 if all(case.ok for case in cases) else 1


def collect_notes(
    cases: Sequence[Case], profile: Profile, env: Environment, neighbours: NeighbourWatch
) -> list[str]:
    notes: list[str] = []
    if any(c.n != c.workload.n for c in cases):
        notes.append(
            f"(n=…): fewer tasks for slow pools, so the ideal drain stays under "
            f"{profile.drain_cap_seconds:.0f} s; at most "
            + ", ".join(f"{n} for {pool}" for pool, n in profile.pool_caps.items())
        )
    for case in cases:
        if case.errors:
            skipped = ", later runs skipped" if case.timed_out else ""
            notes.append(
                f"{case.label}: {len(case.errors)} failed run(s){skipped}: {case.errors[0]}"
            )
        for result in case.runs:
            lat = result.latency
            if lat is not None and lat.achieved_rate < 0.9 * lat.target_rate:
                notes.append(
                    f"{case.label}: latency publisher reached only {lat.achieved_rate:,.0f}/s "
                    f"of {lat.target_rate:,.0f}/s"
                )
            if result.latency_error:
                notes.append(f"{case.label}: latency {result.latency_error}")
            if result.drain.stats_error:
                notes.append(f"{case.label}: loop lag missing: {result.drain.stats_error}")
    if neighbours.busy:
        notes.append(
            "other busy processes during the run (numbers are skewed): " + neighbours.summary(5)
        )
    for log, lines in log_problems(env.log_dir).items():
        notes.append(f"worker log `{log}`: " + " / ".join(f"`{line[:160]}`" for line in lines))
    notes.append(f"worker logs: `{env.log_dir.relative_to(ROOT)}`")
    return notes


def raw_results(
    cases: Sequence[Case],
    kombu_rates: Sequence[float],
    goals: Sequence[Target],
    header: Sequence[str],
) -> dict[str, Any]:
    def summary(values: Callable[[RunResult], list[float]], result: RunResult) -> dict[str, float]:
        data = values(result)
        return {"p50": percentile(data, 50), "p99": percentile(data, 99)} if data else {}

    return {
        "header": list(header),
        "kombu_raw": list(kombu_rates),
        "targets": [asdict(goal) for goal in goals],
        "cases": [
            {
                "config": case.config.label,
                "workload": case.workload.name,
                "n": case.n,
                "errors": case.errors,
                "runs": [
                    {
                        "drain": asdict(result.drain),
                        "start_ms": summary(
                            lambda r: r.latency.start_ms if r.latency else [], result
                        ),
                        "done_ms": summary(
                            lambda r: r.latency.done_ms if r.latency else [], result
                        ),
                        "latency_n": result.latency.n if result.latency else 0,
                        "latency_rate": result.latency.achieved_rate if result.latency else None,
                        "latency_error": result.latency_error,
                    }
                    for result in case.runs
                ],
            }
            for case in cases
        ],
    }


if __name__ == "__main__":
    raise SystemExit(main())
