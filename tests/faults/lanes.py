"""A lane is one pool's worker, queue and tally within a fault: start it, feed it,
wait until it has drained (or stopped draining), rescue it, probe it, count it."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from . import logscan
from .client import Outgoing
from .context import FaultEnv
from .pools import PoolSpec
from .report import Row
from .tally import Tally, delete_results, first_completion_after, result_states
from .workers import FaultWorker

POLL = 0.25
UNACKED_CHECK_EVERY = 2.0  # each rabbitmqctl call boots an Erlang VM
QUIET = 10.0  # broker empty and no task ran for this long: nothing more will run
PROBE_TIMEOUT = 60.0
DRAIN_DEADLINE = 900.0


@dataclass(eq=False)
class Lane:
    env: FaultEnv
    pool: PoolSpec
    suffix: str = ""
    loglevel: str = "info"
    ignore_results: bool = False
    worker: FaultWorker | None = None
    workers: list[FaultWorker] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    closing_notes: list[str] = field(default_factory=list)  # from close(), after the row
    state: str = "new"  # draining, settled, stalled, dead
    stopped_draining: str = ""  # why the first worker was replaced, if it was
    _seen: tuple[int, int] = (-1, -1)  # (ran, ready) at the last progress
    _progress_at: float = 0.0
    _unacked_at: float = 0.0
    _unacked: int = -1  # at the last look (-1: not looked yet)

    def __post_init__(self) -> None:
        self.queue = self.env.queue(self.pool.name, self.suffix)
        self.tally = Tally(self.env.store, self.env.key(self.pool.name, self.suffix))
        self.probe_tally = Tally(
            self.env.store, self.env.key(self.pool.name, self.suffix + "probe")
        )

    @property
    def sent(self) -> int:
        return len(self.ids)

    # -- workers ----------------------------------------------------------------------

    def new_worker(self) -> FaultWorker:
        s = self.env.settings
        worker = FaultWorker(
            self.pool, self.queue, self.env.worker_url, s.stable_url, self.env.log_dir,
            s.run_id, s.concurrency, s.visibility, self.loglevel, s.dedupe,
        )  # fmt: skip
        self.workers.append(worker)
        self.worker = worker
        return worker

    def start_worker(self) -> FaultWorker:
        worker = self.new_worker().start()
        self._progress_at = time.monotonic()
        return worker

    def drain_messages(self, n: int, base: str = "sleep") -> list[Outgoing]:
        key, seconds = self.tally.key, self.env.settings.task_seconds
        if base == "noop":
            return [Outgoing.new(self.pool.task("noop"), key, str(i)) for i in range(n)]
        return [Outgoing.new(self.pool.task(base), key, str(i), seconds) for i in range(n)]

    def publish(self, messages: Sequence[Outgoing]) -> None:
        self.env.client.publish(self.queue, messages)
        self.ids.extend(m.task_id for m in messages)

    # -- draining ---------------------------------------------------------------------

    def poll(self, stall: float) -> None:
        """Advance ``state`` from "draining" by one look at the tally and the broker."""
        assert self.worker is not None
        now = time.monotonic()
        if not self.worker.alive():
            self.state = "dead"
            return
        broker = self.env.broker
        ran, ready = self.tally.ran(), broker.ready(self.queue)
        moved = (ran, ready) != self._seen
        empty = False
        look_every = UNACKED_CHECK_EVERY if broker.kind == "rabbitmq" else 0.0
        if (
            ready == 0
            and (ran >= self.sent or now - self._progress_at > QUIET)
            and now - self._unacked_at >= look_every
        ):
            self._unacked_at = now
            unacked = broker.unacked(self.queue)
            moved = moved or self._unacked not in (-1, unacked)  # the first look is no news
            self._unacked = unacked
            empty = unacked == 0
        if moved:
            self._seen, self._progress_at = (ran, ready), now
        if empty and ran >= self.sent:
            self.state = "settled"
        elif empty and now - self._progress_at > QUIET:
            self.state = "settled"
            self.notes.append(f"broker empty, {self.sent - ran} never ran")
        elif now - self._progress_at > stall:
            self.state = "stalled"


def settle(
    lanes: Sequence[Lane],
    stall: float,
    deadline: float = DRAIN_DEADLINE,
    on_tick: Callable[[], None] | None = None,
) -> None:
    """Wait until every lane has drained, stopped draining, or lost its worker."""
    for lane in lanes:
        lane.state = "draining"
        lane._progress_at = time.monotonic()
        lane._seen, lane._unacked = (-1, -1), -1
    end = time.monotonic() + deadline
    while True:
        active = [lane for lane in lanes if lane.state == "draining"]
        if not active:
            return
        if time.monotonic() > end:
            for lane in active:
                lane.state = "stalled"
                lane.notes.append(f"still draining after {deadline:.0f}s")
            return
        for lane in active:
            lane.poll(stall)
        if on_tick is not None:
            on_tick()
        time.sleep(POLL)


def rescue(lanes: Sequence[Lane], stall: float) -> None:
    """Replace each lane's stalled or dead worker by a fresh one, and drain again.

    A stalled worker's threads are dumped to its log first (a deadlock's traceback).
    """
    stuck = [lane for lane in lanes if lane.state in ("stalled", "dead")]
    for lane in stuck:
        worker = lane.worker
        assert worker is not None
        log = worker.log()
        if lane.state == "dead":
            why = f"worker died (exit {worker.exit_code})"
            death = logscan.last_exception(log)
            if death:
                why += f": {death}"
        else:
            why = f"deadlocked / not draining ({lane.tally.ran()}/{lane.sent} ran)"
            stacks = logscan.stack_summary(worker.dump_stacks())
            worker.kill()
        lane.stopped_draining = lane.stopped_draining or why
        lane.notes.append(why)
        if lane.state == "stalled":
            lane.notes.extend(f"{worker.name} stack: {line}" for line in stacks)
        lane.start_worker()
        lane.notes.append("a fresh worker drained the rest")
    if stuck:
        settle(stuck, stall)
        for lane in stuck:
            if lane.state != "settled":
                lane.notes.append(f"the fresh worker also {lane.state}")


def wait_mid_drain(lanes: Sequence[Lane], low: float, high: float, timeout: float = 180) -> None:
    """Until every lane ran ``low`` of its tasks, or one ran ``high``: mid-drain for all."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        fractions = [lane.tally.ran() / max(1, lane.sent) for lane in lanes]
        if min(fractions) >= low or max(fractions) >= high:
            return
        if any(lane.worker is not None and not lane.worker.alive() for lane in lanes):
            return
        time.sleep(0.05)
    for lane in lanes:
        lane.notes.append(f"fault injected at {lane.tally.ran()}/{lane.sent} (slow drain)")


# -- the end: is it alive, and what ran ------------------------------------------------


def probe(lane: Lane) -> str:
    """ "yes" if the lane's current worker answers a ping and drains new tasks."""
    worker = lane.worker
    if worker is None or not worker.alive():
        code = worker.exit_code if worker else None
        return f"no: exited ({code})"
    pinged = lane.env.client.ping(worker.node)
    n = lane.env.settings.probe_tasks
    messages = [
        Outgoing.new(lane.pool.task("sleep"), lane.probe_tally.key, f"p{i}", 0.01) for i in range(n)
    ]
    lane.env.client.publish(lane.queue, messages)
    end = time.monotonic() + PROBE_TIMEOUT
    while lane.probe_tally.ran() < n and time.monotonic() < end and worker.alive():
        time.sleep(0.1)
    ran = lane.probe_tally.ran()
    delete_results(lane.env.store, [m.task_id for m in messages])
    if pinged and ran == n:
        return "yes"
    drained = "drains new tasks" if ran == n else f"ran {ran}/{n} new tasks"
    return f"no: {'answers ping' if pinged else 'no reply to ping'}, {drained}"


def count(
    lane: Lane,
    recover_from: float | None = None,
    expected_stop: bool = False,
    fault_at: float | None = None,
) -> Row:
    """The lane's row: ran, succeeded, lost, twice, alive, recovery, notes.

    With ``fault_at``, the tasks that ran twice are split by when their first run
    ended: before the fault (finished, but the ack had not reached the broker) or
    after it (running when the fault came).
    """
    alive = probe(lane)
    if lane.stopped_draining:
        alive = f"no: {lane.stopped_draining}" + (" (fresh worker: yes)" if alive == "yes" else "")
    elif expected_stop and alive == "yes":
        alive = "yes (fresh worker)"
    counts = lane.tally.counts()
    row = Row(pool=lane.pool.name, sent=lane.sent, alive=alive)
    row.ran = sum(1 for v in counts.values() if v >= 1)
    row.twice = sum(1 for v in counts.values() if v >= 2)
    row.lost = lane.sent - row.ran
    if not lane.ignore_results:
        states = result_states(lane.env.store, lane.ids)
        row.succeeded = states.pop("SUCCESS", 0)
        if states:
            row.notes.append("results: " + ", ".join(f"{n} {s}" for s, n in states.most_common()))
    if recover_from is not None:
        timings = lane.tally.timings()
        row.recover_s = first_completion_after(timings, recover_from)
        if row.recover_s is None and row.lost == 0 and timings:
            # A broker that takes seconds to stop (rabbitmqctl stop) serves until then.
            row.drained_before_return = max(ended for _, ended in timings) < recover_from
        if row.drained_before_return:
            row.notes.append("every task had run before the broker came back")
        elif row.recover_s is None:
            row.notes.append("no task started after the fault completed")
    if fault_at is not None:
        runs = lane.tally.first_runs()
        spans = sorted(
            ended - started for started, ended in runs.values() if started < fault_at < ended
        )
        running = len(spans)
        row.extra["running_at_fault"] = running
        if spans:
            # Far above the task's own time: the bodies waited (on the loop, the GIL).
            row.extra["running_at_fault_body_p50_s"] = round(spans[len(spans) // 2], 3)
            every = sorted(ended - started for started, ended in runs.values())
            row.notes.append(
                f"{running} running when the fault came (their bodies took "
                f"{spans[len(spans) // 2]:.2f}s p50, {spans[-1]:.2f}s max; every first "
                f"run's body {every[len(every) // 2]:.2f}s p50, {every[-1]:.2f}s max)"
            )
        else:
            row.notes.append("0 running when the fault came")
    if fault_at is not None and row.twice:
        ends = lane.tally.first_ends()
        before = sorted(fault_at - ends[m] for m, n in counts.items() if n >= 2 and m in ends)
        before = [seconds for seconds in before if seconds > 0]
        row.extra["twice_finished_before_fault"] = len(before)
        if before:
            row.notes.append(
                f"of those run twice, {len(before)} had finished before the fault "
                f"(by up to {max(before):.2f}s, median {before[len(before) // 2]:.2f}s: "
                "their acks had not reached the broker), the rest were running"
            )
    if max(counts.values(), default=0) > 2:
        row.notes.append(f"max executions of one task: {max(counts.values())}")
    row.notes.extend(lane.notes)
    row.notes.extend(_traces(lane, counts))
    for worker in lane.workers:
        for line in logscan.summary(worker.log(), 2):
            row.notes.append(f"{worker.name} log: {line}")
    return row


def _traces(lane: Lane, counts: dict[str, int], limit: int = 2) -> list[str]:
    """How often a few lost and twice-run tasks were received, by which worker."""
    lost = [i for i in range(lane.sent) if str(i) not in counts][:limit]
    twice = [i for i in range(lane.sent) if counts.get(str(i), 0) >= 2][:1]
    if not lost and not twice:
        return []
    logs = [(w.name, w.log().splitlines()) for w in lane.workers]
    out = []
    for i, what in [(i, "lost") for i in lost] + [(i, "ran twice") for i in twice]:
        task_id = lane.ids[i]
        by = [
            name for name, lines in logs for line in lines if task_id in line and "received" in line
        ]
        out.append(
            f"{what}: #{i} {task_id} received {len(by)}x"
            + (f" by {', '.join(sorted(set(by)))}" if by else "")
        )
    return out


def close(lanes: Sequence[Lane]) -> None:
    """Stop every worker (killing the ones that do not stop) and delete the run's keys."""
    for lane in lanes:
        for worker in lane.workers:
            if worker.alive():
                worker.send(signal.SIGTERM)
        for worker in lane.workers:
            if worker.process is None:
                continue
            if worker.wait_exit(30) is None:
                worker.dump_stacks()
                lane.closing_notes.append(f"{worker.name} did not stop in 30s at the end: killed")
            worker.kill()
        lane.tally.delete()
        lane.probe_tally.delete()
        delete_results(lane.env.store, lane.ids)
