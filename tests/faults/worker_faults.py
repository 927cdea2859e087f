"""Faults of one worker (kill -9, SIGTERM, SIGTERM then SIGQUIT, a blocked loop), run
one pool after the other on one private broker, each pool on its own queue."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

from . import logscan
from .client import Outgoing
from .context import FaultEnv, Settings
from .lanes import Lane, close, count, rescue, settle, wait_mid_drain
from .report import FaultResult, Row
from .tally import Tally, delete_results

EXIT_TIMEOUT = 60.0
BLOCK_SECONDS = 5.0
COLD_AFTER = 1.0  # seconds between SIGTERM and SIGQUIT, as the fault is defined
# What count() notes of a broker fault; not what a blocked loop is judged by.
_BROKER_NOTES = (
    "no task started after the fault completed",
    "every task had run before the broker came back",
)

Stop = Callable[[Lane], str]  # stops the lane's worker; returns what happened


def _exited(lane: Lane, since: float, what: str) -> str:
    assert lane.worker is not None
    code = lane.worker.wait_exit(EXIT_TIMEOUT)
    if code is None:
        lane.worker.dump_stacks()
        lane.worker.kill()
        return f"{what}: did not exit in {EXIT_TIMEOUT:.0f}s, killed (stacks in its log)"
    return f"{what}: exited {code} after {time.time() - since:.1f}s"


def kill9(lane: Lane) -> str:
    assert lane.worker is not None
    lane.worker.kill()
    return "kill -9 of the worker's process group"


def sigterm(lane: Lane) -> str:
    assert lane.worker is not None
    since = time.time()
    lane.worker.send(signal.SIGTERM)
    return _exited(lane, since, "SIGTERM (warm shutdown)")


def sigterm_sigquit(lane: Lane) -> str:
    assert lane.worker is not None
    since = time.time()
    lane.worker.send(signal.SIGTERM)
    time.sleep(COLD_AFTER)
    lane.worker.send(signal.SIGQUIT)
    return _exited(lane, since, "SIGTERM, SIGQUIT 1s later (cold shutdown)")


def run_stop(
    settings: Settings, name: str, description: str, stop: Stop, task: str = "sleep"
) -> FaultResult:
    """Mid-drain, stop the worker; a fresh worker of the same pool drains the rest."""
    result = FaultResult(name, settings.broker, description)
    with FaultEnv(settings, name, settings.broker) as env:
        for pool in settings.pools:
            lane = Lane(env, pool)
            try:
                env.client.declare(lane.queue)
                lane.publish(lane.drain_messages(settings.tasks, task))
                lane.start_worker()
                wait_mid_drain([lane], low=0.3, high=0.3)
                before = lane.tally.ran()
                fault_at = time.time()
                note = stop(lane)
                fresh = lane.start_worker()
                settle([lane], settings.stall)
                rescue([lane], settings.stall)
                row = count(lane, recover_from=fresh.ready_at, expected_stop=True)
                row.notes.insert(0, f"at {before}/{lane.sent} ran; {note}")
                ends = [ended for _, ended in lane.tally.timings()]
                if ends:
                    row.extra["drained_after_s"] = max(ends) - fault_at
                    row.notes.insert(
                        1, f"last task ended {max(ends) - fault_at:.1f}s after the fault"
                    )
            except Exception as exc:  # noqa: BLE001 - reported in the row, next pool
                row = Row(pool=pool.name, sent=lane.sent, alive="?")
                row.notes.append(f"harness error: {exc!r}")
            finally:
                close([lane])
            row.notes.extend(lane.closing_notes)
            result.rows.append(row)
    return result


def run_block(settings: Settings, description: str) -> FaultResult:
    """A task that blocks the worker (its event loop, for celery_anyio) for ``BLOCK_SECONDS``,
    queued in the middle of a drain."""
    result = FaultResult("block-loop", settings.broker, description, recovery_applies=True)
    with FaultEnv(settings, "block-loop", settings.broker) as env:
        for pool in settings.pools:
            lane = Lane(env, pool)
            block_tally = Tally(env.store, env.key(pool.name, "block"))
            block = Outgoing.new(pool.task("block"), block_tally.key, "block", BLOCK_SECONDS)
            try:
                messages = lane.drain_messages(settings.tasks)
                half = len(messages) // 2
                env.client.declare(lane.queue)
                lane.publish(messages[:half])
                env.client.publish(lane.queue, [block])
                lane.publish(messages[half:])
                lane.start_worker()
                settle([lane], settings.stall)
                rescue([lane], settings.stall)
                timing = block_tally.timings()
                block_end = timing[0][1] if timing else None
                row = count(lane, recover_from=block_end)
                if timing:
                    start, end = timing[0]
                    during = sum(1 for _, e in lane.tally.timings() if start < e < end)
                    row.notes.insert(0, f"{during} tasks completed while it blocked")
                    if during and row.recover_s is None:
                        row.recover_s = 0.0  # it never stopped draining
                        # What count() says of a broker fault does not apply here
                        # (the pool finished everything while the task blocked).
                        row.drained_before_return = False
                        row.notes = [note for note in row.notes if note not in _BROKER_NOTES]
                    if len(timing) > 1:
                        row.notes.insert(0, f"the blocking task ran {len(timing)} times")
                else:
                    row.notes.insert(0, "the blocking task never ran")
                assert lane.worker is not None
                warned = logscan.first_match(lane.workers[0].log(), r"WARNING.*(block|lag).*$")
                row.notes.append(f"warning: {warned}" if warned else "no block warning logged")
            except Exception as exc:  # noqa: BLE001 - reported in the row, next pool
                row = Row(pool=pool.name, sent=lane.sent, alive="?")
                row.notes.append(f"harness error: {exc!r}")
            finally:
                close([lane])
                block_tally.delete()
                delete_results(env.store, [block.task_id])
            row.notes.extend(lane.closing_notes)
            result.rows.append(row)
    return result
