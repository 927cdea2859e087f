"""Where a worker's CPU goes while it drains a queue: per thread, per package.

``python -m benchmarks.profile`` pre-loads ``-n`` messages, starts each pool's
worker (the same ``celery worker`` subprocess as the benchmarks), reads every
thread's user and system CPU time from ``/proc`` around the drain, and attaches
``py-spy record --gil`` meanwhile.  The GIL samples (Python code running) split
each thread's user time between packages: a sample is charged to the innermost
frame that belongs to a package; standard-library frames (``socket``, ``json``,
``logging``...) are charged to their caller, except the event loop's own
(``asyncio``, ``selectors``).  System time (the kernel's share: sockets,
futexes, epoll) is reported as is.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from .harness import (
    ANYIO_POOL,
    CHUNK,
    RESULT_PREFIX,
    ROOT,
    BenchError,
    Environment,
    PoolConfig,
    Publisher,
    Results,
    Worker,
    Workload,
    stop_all_workers,
)
from .run import BROKERS, IO_SECONDS, REDIS_URL, source_revision

POOLS = {
    "anyio-asyncio": PoolConfig(ANYIO_POOL, 500, "asyncio"),
    "anyio-trio": PoolConfig(ANYIO_POOL, 500, "trio"),
    "threads": PoolConfig("threads", 500),
    "solo": PoolConfig("solo", 1),
}
WORKLOADS = {"noop": Workload("noop", 0), "io": Workload("io", 0, io_seconds=IO_SECONDS)}

# Who a package's time counts for.
CELERY_SIDE = {"celery", "kombu", "billiard", "vine", "amqp", "redis", "click"}
POOL_SIDE = {"celery_anyio", "anyio", "trio", "asyncio", "selectors", "greenlet", "sniffio"}
LOOP_MODULES = {"asyncio", "selectors"}  # standard library, but the loop's own work
STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()
FRAME = re.compile(r"^(?P<func>.*) \((?P<path>.*):(?P<line>\d+)\)$")
THREAD = re.compile(r"^thread \((?P<tid>\w+)\): (?P<name>.*)$")


def package_of(path: str) -> str | None:
    """The package a frame's file belongs to; None for other standard-library code."""
    parts = Path(path).parts
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1].removesuffix(".py")
    if "celery_anyio" in parts:
        return "celery_anyio"
    if "benchmarks" in parts:
        return "task bodies"
    try:
        module = Path(path).resolve().relative_to(STDLIB).parts[0].removesuffix(".py")
    except ValueError:
        return "other"
    return module if module in LOOP_MODULES else None


def owner_of(frames: Sequence[str]) -> str:
    """The package of the innermost frame that has one."""
    for frame in reversed(frames):
        match = FRAME.match(frame)
        if match is None:
            continue
        package = package_of(match.group("path"))
        if package is not None:
            return package
    return "other"


def thread_group(name: str) -> str:
    """Celery's pool threads and the result threads counted together."""
    if name.startswith("ThreadPoolExecutor"):
        return "threads pool workers"
    return re.sub(r"-\d+$", "", name)


@dataclass
class Profile:
    """GIL samples per thread and package, and CPU seconds per thread."""

    samples: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    cpu: dict[int, tuple[float, float]] = field(default_factory=dict)  # (user, system) by tid
    threads: dict[int, str] = field(default_factory=dict)  # thread group by native id
    tasks: int = 0
    seconds: float = 0.0
    machine_busy: float = 0.0  # cores busy on average during the drain
    neighbours: dict[str, float] = field(default_factory=dict)  # CPU seconds per process name

    def add_raw(self, text: str) -> None:
        for line in text.splitlines():
            stack, _, count = line.rpartition(" ")
            head, *frames = stack.split(";")
            match = THREAD.match(head)
            if match is None or not count.isdigit():
                continue
            group = thread_group(match.group("name"))
            self.threads[int(match.group("tid"), 0)] = group
            self.samples[group][owner_of(frames)] += int(count)

    def cpu_of(self, group: str) -> tuple[float, float]:
        mine = [cpu for tid, cpu in self.cpu.items() if self.threads.get(tid) == group]
        return sum(user for user, _ in mine), sum(system for _, system in mine)


def thread_cpu(pid: int) -> dict[int, tuple[float, float]]:
    """CPU seconds (user, system) per native thread id, from ``/proc/<pid>/task``."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[float, float]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # the thread ended
        out[int(task.name)] = (int(fields[11]) / ticks, int(fields[12]) / ticks)
    return out


def profile_once(
    env: Environment, config: PoolConfig, workload: Workload, n: int, rate: int, spy: str
) -> Profile:
    queue = env.queue("profile", config.slug)
    publisher = Publisher(env.broker_url, queue)
    results = Results(env.results_url)
    worker = Worker(env, config, queue, env.log_dir / f"{config.slug}.log")
    raw = env.log_dir / f"{config.slug}.raw"
    spying: subprocess.Popen[bytes] | None = None
    try:
        publisher.reset_queue()
        ids = publisher.preload(workload.messages(config.is_async, n))
        worker.start().wait_ready()
        before = thread_cpu(worker.pid)
        machine = psutil.cpu_times()
        others = process_cpu(worker.pid)
        started = time.monotonic()
        spying = subprocess.Popen(
            [spy, "record", "--pid", str(worker.pid), "--format", "raw", "--threads", "--gil",
             "--nonblocking", "--full-filenames", "--rate", str(rate), "-o", str(raw)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        done_before = sum(int(results.client.exists(*chunk)) for chunk in _chunks(ids))
        results.wait_all(ids, timeout=600, alive=worker.alive)
        profile = Profile(tasks=n - done_before, seconds=time.monotonic() - started)
        after = thread_cpu(worker.pid)
        profile.cpu = {
            tid: (user - before.get(tid, (0.0, 0.0))[0], system - before.get(tid, (0.0, 0.0))[1])
            for tid, (user, system) in after.items()
        }
        busy = psutil.cpu_times()
        idle = (busy.idle + busy.iowait) - (machine.idle + machine.iowait)
        profile.machine_busy = psutil.cpu_count() - idle / profile.seconds
        for name, seconds in process_cpu(worker.pid).items():
            profile.neighbours[name] = seconds - others.get(name, 0.0)
        spying.send_signal(signal.SIGINT)
        _, spy_errors = spying.communicate(timeout=30)
        if not raw.exists():
            raise BenchError(f"py-spy wrote no profile: {spy_errors.decode(errors='replace')}")
        profile.add_raw(raw.read_text())
        results.delete(ids)
        return profile
    finally:
        if spying is not None and spying.poll() is None:
            spying.kill()
        worker.stop()
        publisher.reset_queue(delete=True)
        publisher.close()
        results.close()


def process_cpu(worker: int) -> dict[str, float]:
    """CPU seconds of every other process, per name (the broker, py-spy, ...)."""
    out: dict[str, float] = defaultdict(float)
    for process in psutil.process_iter(["name", "cpu_times"]):
        times = process.info["cpu_times"]
        if process.pid != worker and times is not None:
            out[process.info["name"]] += times.user + times.system
    return out


def _chunks(ids: Sequence[str]) -> list[list[str]]:
    return [[RESULT_PREFIX + i for i in ids[k : k + CHUNK]] for k in range(0, len(ids), CHUNK)]


def side_of(package: str) -> str:
    if package in POOL_SIDE:
        return "the pool (celery_anyio, AnyIO, event loop, greenlet)"
    if package in CELERY_SIDE:
        return "Celery, kombu, broker/backend clients"
    return "other (task bodies, standard library, ...)"


def report(label: str, profile: Profile) -> str:
    """One Markdown section: CPU per thread, and who it went to.

    py-spy's GIL samples are too few to time anything (fewer than the
    ``--rate`` asks for, even single-threaded), so they only split each
    thread's user CPU time, measured exactly, between packages.
    """
    tasks = max(profile.tasks, 1)
    title = f"### {label}: {profile.tasks} tasks in {profile.seconds:.2f} s"
    lines = [
        f"{title} ({profile.tasks / profile.seconds:.0f}/s)",
        "",
        f"Machine: {profile.machine_busy:.2f} of {psutil.cpu_count()} cores busy; other "
        "processes' CPU ms/task: "
        + ", ".join(
            f"{name} {seconds / tasks * 1000:.2f}"
            for name, seconds in sorted(profile.neighbours.items(), key=lambda item: -item[1])[:4]
        ),
        "",
        "| thread | CPU ms/task: user + system | user time by package (GIL samples) |",
        "|---|---:|---|",
    ]
    sides: dict[str, float] = defaultdict(float)  # µs of user time per task
    threads = sorted(profile.samples, key=lambda thread: -sum(profile.cpu_of(thread)))
    for thread in threads:
        counter = profile.samples[thread]
        count = sum(counter.values())
        user, system = (seconds / tasks * 1000 for seconds in profile.cpu_of(thread))
        if count == 0 or user + system < 0.005:
            continue
        top = ", ".join(f"{pkg} {share / count:.0%}" for pkg, share in counter.most_common(5))
        lines.append(f"| {thread} | {user:.2f} + {system:.2f} | {top} |")
        for package, share in counter.items():
            sides[side_of(package)] += user * 1000 * share / count
    total = sum(sides.values())
    lines += ["", "| user time of | µs/task | share |", "|---|---:|---:|"]
    for side, micros in sorted(sides.items(), key=lambda item: -item[1]):
        lines.append(f"| {side} | {micros:.0f} | {micros / total:.0%} |")
    system = sum(system for _, system in profile.cpu.values()) / tasks * 1e6
    lines += [f"| system time (kernel: sockets, futexes, epoll) | {system:.0f} | |", ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--broker", choices=sorted(BROKERS), default="redis")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="noop")
    parser.add_argument(
        "--pools", default=None, help=f"comma-separated, of {', '.join(POOLS)} (io: no solo)"
    )
    parser.add_argument("-n", type=int, default=5000)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        print("py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    run_id = uuid.uuid4().hex[:8]
    env = Environment(
        broker=args.broker,
        broker_url=BROKERS[args.broker],
        results_url=REDIS_URL,
        run_id=run_id,
        log_dir=ROOT / "benchmarks/results/logs" / f"profile-{run_id}",
    )
    workload = WORKLOADS[args.workload]
    print(
        f"## {args.workload} x {args.n} on {args.broker}, -c 500, py-spy --gil at {args.rate}/s"
        f"\n\n{time.strftime('%Y-%m-%d %H:%M %Z')}, {source_revision()}, load average "
        f"{os.getloadavg()[0]:.2f}, Python {sys.version.split()[0]}\n"
    )
    try:
        pools = args.pools or ",".join(p for p in POOLS if args.workload == "noop" or p != "solo")
        for name in pools.split(","):
            profile = profile_once(env, POOLS[name], workload, args.n, args.rate, spy)
            print(report(POOLS[name].label, profile), flush=True)
    finally:
        stop_all_workers()
    return 0


if __name__ == "__main__":
    sys.exit(main())
