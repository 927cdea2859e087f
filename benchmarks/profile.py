"""Where a worker's CPU goes while it drains a queue: per process, per thread, per package.

``python -m benchmarks.profile`` pre-loads ``-n`` tasks, starts each pool's
worker (the same ``celery worker`` subprocess as the benchmarks), reads every
thread's user and system CPU time from ``/proc`` around the drain (in the
worker and in each task process of ``--processes N``), and attaches
``py-spy record --gil --subprocesses`` meanwhile. The GIL samples (Python code
running) split each thread's user time between packages: a sample goes to the
innermost frame that belongs to a package; standard-library frames
(``socket``, ``json``, ``logging``...) go to their caller, except the event
loop's own (``asyncio``, ``selectors``). py-spy's samples are too few to time
anything by themselves, so only the ``/proc`` figures are times.
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

from .cases import Config, Workload, anyio
from .drivers import CeleryDriver
from .harness import Environment, wait_done
from .run import BROKERS, IO_SECONDS, REDIS_URL, git
from .workers import ROOT, BenchError, Worker, stop_all_workers

POOLS = {
    "anyio-asyncio": anyio("asyncio", 500),
    "anyio-trio": anyio("trio", 500),
    "anyio-asyncio-p2": anyio("asyncio", 500, processes=2),
    "anyio-trio-p2": anyio("trio", 500, processes=2),
    "threads": Config("threads", 500),
    "solo": Config("solo", 1),
}
DEFAULT_POOLS = ("anyio-asyncio", "anyio-asyncio-p2", "anyio-trio", "anyio-trio-p2", "threads")
WORKLOADS = {"noop": Workload("noop", 0), "io": Workload("io", 0, io_seconds=IO_SECONDS)}

# Who a package's time counts for.
CELERY_SIDE = {"celery", "kombu", "billiard", "vine", "amqp", "redis", "click"}
POOL_SIDE = {"celery_anyio", "anyio", "trio", "asyncio", "selectors", "greenlet", "sniffio"}
LOOP_MODULES = {"asyncio", "selectors"}  # standard library, but the loop's own work
STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()
FRAME = re.compile(r"^(?P<func>.*) \((?P<path>.*):(?P<line>\d+)\)$")
THREAD = re.compile(r"^thread \((?P<tid>\w+)\): (?P<name>.*)$")
PROCESS = re.compile(r'^process (?P<pid>\d+):".*"$')


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
        package = package_of(match.group("path")) if match else None
        if package is not None:
            return package
    return "other"


def side_of(package: str) -> str:
    if package in POOL_SIDE:
        return "the pool (celery_anyio, AnyIO, event loop, greenlet)"
    if package in CELERY_SIDE:
        return "Celery, kombu, broker/backend clients"
    return "other (task bodies, standard library, ...)"


def thread_group(name: str) -> str:
    """Celery's pool threads counted together, and each kind of numbered thread."""
    if name.startswith("ThreadPoolExecutor"):
        return "threads pool workers"
    return re.sub(r"-\d+$", "", name)


Thread = tuple[str, str]  # (process role: main, child 1, ...; thread group)


@dataclass
class Profile:
    """GIL samples per thread and package, and CPU seconds per thread."""

    roles: dict[int, str] = field(default_factory=dict)  # pid -> main, child 1, ...
    samples: dict[Thread, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    names: dict[int, str] = field(default_factory=dict)  # native thread id -> group
    cpu: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict)
    tasks: int = 0
    seconds: float = 0.0
    machine_busy: float = 0.0  # cores busy on average during the drain
    others: dict[str, float] = field(default_factory=dict)  # CPU seconds per process name

    def add_raw(self, text: str) -> None:
        for line in text.splitlines():
            stack, _, count = line.rpartition(" ")
            pid, parts = None, stack.split(";")
            while parts and (match := PROCESS.match(parts[0])):
                pid, parts = int(match.group("pid")), parts[1:]
            thread = THREAD.match(parts[0]) if parts else None
            if thread is None or not count.isdigit():
                continue
            group = thread_group(thread.group("name"))
            self.names[int(thread.group("tid"), 0)] = group
            role = self.roles.get(pid or 0, "main")
            self.samples[(role, group)][owner_of(parts[1:])] += int(count)

    def cpu_of(self, thread: Thread) -> tuple[float, float]:
        mine = [
            cpu
            for (pid, tid), cpu in self.cpu.items()
            if (self.roles.get(pid), self.names.get(tid, "(no samples)")) == thread
        ]
        return sum(user for user, _ in mine), sum(system for _, system in mine)

    def threads(self) -> list[Thread]:
        found = {(self.roles[pid], self.names.get(tid, "(no samples)")) for pid, tid in self.cpu}
        return sorted(found, key=lambda thread: (thread[0], -sum(self.cpu_of(thread))))

    def process_cpu(self, role: str) -> float:
        return sum(u + s for (pid, _), (u, s) in self.cpu.items() if self.roles.get(pid) == role)


def thread_cpu(pids: Sequence[int]) -> dict[tuple[int, int], tuple[float, float]]:
    """CPU seconds (user, system) per (process, native thread id), from ``/proc``."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[tuple[int, int], tuple[float, float]] = {}
    for pid in pids:
        with_tasks = Path(f"/proc/{pid}/task")
        for task in with_tasks.iterdir() if with_tasks.exists() else ():
            try:
                fields = (task / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue  # the thread ended
            out[(pid, int(task.name))] = (int(fields[11]) / ticks, int(fields[12]) / ticks)
    return out


def process_cpu(skip: Sequence[int]) -> dict[str, float]:
    """CPU seconds of every other process, per name (the broker, py-spy, ...)."""
    out: dict[str, float] = defaultdict(float)
    for process in psutil.process_iter(["name", "cpu_times"]):
        times = process.info["cpu_times"]
        if process.pid not in skip and times is not None:
            out[process.info["name"]] += times.user + times.system
    return out


def profile_once(
    env: Environment, config: Config, workload: Workload, n: int, rate: int, spy: str
) -> Profile:
    queue = env.queue("profile", config.slug)
    driver = CeleryDriver(config, queue, env.broker_url, env.results_url)
    raw = env.log_dir / f"{config.slug}.raw"
    spying: subprocess.Popen[bytes] | None = None
    ids = driver.preload(workload.tasks(n))
    worker = Worker(driver.command(0), driver.env(), env.log_dir / f"{config.slug}.log")
    try:
        worker.wait_ready()
        children = sorted(c.pid for c in psutil.Process(worker.pid).children(recursive=True))
        pids = [worker.pid, *children]
        profile = Profile(roles={worker.pid: "main"})
        profile.roles.update({pid: f"child {k}" for k, pid in enumerate(children, 1)})
        before, machine, others = thread_cpu(pids), psutil.cpu_times(), process_cpu(pids)
        started = time.monotonic()
        spying = subprocess.Popen(
            [spy, "record", "--pid", str(worker.pid), "--format", "raw", "--threads", "--gil",
             "--subprocesses", "--nonblocking", "--full-filenames", "--rate", str(rate),
             "-o", str(raw)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        profile.tasks = driver.remaining(ids)  # those not done before the clock started
        wait_done(driver, ids, 600, worker.alive)
        profile.seconds = time.monotonic() - started
        after = thread_cpu(pids)
        profile.cpu = {
            key: (user - before.get(key, (0.0, 0.0))[0], system - before.get(key, (0.0, 0.0))[1])
            for key, (user, system) in after.items()
        }
        busy = psutil.cpu_times()
        idle = (busy.idle + busy.iowait) - (machine.idle + machine.iowait)
        profile.machine_busy = (psutil.cpu_count() or 1) - idle / profile.seconds
        profile.others = {
            name: seconds - others.get(name, 0.0) for name, seconds in process_cpu(pids).items()
        }
        spying.send_signal(signal.SIGINT)
        _, spy_errors = spying.communicate(timeout=30)
        if not raw.exists():
            raise BenchError(f"py-spy wrote no profile: {spy_errors.decode(errors='replace')}")
        profile.add_raw(raw.read_text())
        return profile
    finally:
        if spying is not None and spying.poll() is None:
            spying.kill()
        worker.stop()
        driver.cleanup(ids)
        driver.close()


def report(label: str, profile: Profile) -> str:
    """One Markdown section: CPU per process and thread, and who it went to."""
    tasks = max(profile.tasks, 1)

    def ms(seconds: float) -> float:
        return seconds / tasks * 1000

    top_others = sorted(profile.others.items(), key=lambda item: -item[1])[:4]
    rate = profile.tasks / profile.seconds
    lines = [
        f"### {label}: {profile.tasks} tasks in {profile.seconds:.2f} s ({rate:.0f}/s)",
        "",
        f"Machine: {profile.machine_busy:.2f} of {psutil.cpu_count()} cores busy; other "
        "processes' CPU ms/task: " + ", ".join(f"{k} {ms(v):.2f}" for k, v in top_others),
        "",
        "| process | thread | CPU ms/task: user + system | user time by package (GIL samples) |",
        "|---|---|---:|---|",
    ]
    sides: dict[str, float] = defaultdict(float)  # µs of user time per task
    for thread in profile.threads():
        user, system = map(ms, profile.cpu_of(thread))
        if user + system < 0.005:
            continue
        counter = profile.samples.get(thread, Counter())
        count = sum(counter.values())
        top = ", ".join(f"{pkg} {share / count:.0%}" for pkg, share in counter.most_common(5))
        lines.append(f"| {thread[0]} | {thread[1]} | {user:.3f} + {system:.3f} | {top or '—'} |")
        for package, share in counter.items():
            sides[side_of(package)] += user * 1000 * share / count
    roles = sorted(set(profile.roles.values()))
    lines += ["", "| process | CPU ms/task |", "|---|---:|"]
    lines += [f"| {role} | {ms(profile.process_cpu(role)):.3f} |" for role in roles]
    total = sum(sides.values()) or 1.0
    lines += ["", "| user time of | µs/task | share |", "|---|---:|---:|"]
    for side, micros in sorted(sides.items(), key=lambda item: -item[1]):
        lines.append(f"| {side} | {micros:.0f} | {micros / total:.0%} |")
    system = sum(system for _, system in profile.cpu.values()) / tasks * 1e6
    lines += [f"| system time (kernel: sockets, futexes, epoll) | {system:.0f} | |", ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", choices=sorted(BROKERS), default="redis")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="noop")
    parser.add_argument("--pools", default=",".join(DEFAULT_POOLS), help=f"of {', '.join(POOLS)}")
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
    log_dir = ROOT / "benchmarks/results/logs" / f"profile-{run_id}"
    env = Environment(args.broker, BROKERS[args.broker], REDIS_URL, run_id, log_dir)
    dirty = " + uncommitted changes" if git("status", "--porcelain", "celery_anyio") else ""
    print(
        f"## {args.workload} x {args.n} on {args.broker}, py-spy --gil at {args.rate}/s\n\n"
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}, commit {git('rev-parse', '--short', 'HEAD')}"
        f"{dirty}, load average {' / '.join(f'{v:.2f}' for v in os.getloadavg())}, "
        f"Python {sys.version.split()[0]}\n"
    )
    try:
        for name in args.pools.split(","):
            profile = profile_once(
                env, POOLS[name], WORKLOADS[args.workload], args.n, args.rate, spy
            )
            print(report(POOLS[name].label, profile), flush=True)
    finally:
        stop_all_workers()
    print(f"load average at end {' / '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
