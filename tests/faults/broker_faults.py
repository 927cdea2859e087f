"""Faults of the broker, which hit the three pools at the same moment: each pool has
its own worker and queue on one private broker (behind a proxy for the cuts)."""

from __future__ import annotations

import time
from collections.abc import Callable

from .context import FaultEnv, Settings
from .lanes import Lane, close, count, rescue, settle, wait_mid_drain
from .report import FaultResult

OUTAGE = 2.0  # seconds a restarted broker stays down
CHUNK = 500  # messages per pool per publish round

Inject = Callable[[FaultEnv], tuple[float, float, str]]  # -> (fault at, back at, note)


def restart(env: FaultEnv) -> tuple[float, float, str]:
    fault_at = time.time()
    env.broker.stop()
    stopped = time.time()
    time.sleep(OUTAGE)
    env.broker.start()
    back = env.broker.up_at
    return fault_at, back, f"down {back - fault_at:.1f}s (stopping took {stopped - fault_at:.1f}s)"


def cut(seconds: float) -> Inject:
    def inject(env: FaultEnv) -> tuple[float, float, str]:
        assert env.proxy is not None
        fault_at = env.proxy.cut()
        time.sleep(seconds)
        back = env.proxy.restore()
        return fault_at, back, f"connections cut, refused for {back - fault_at:.1f}s"

    return inject


def run(
    settings: Settings, name: str, broker: str, description: str, inject: Inject, proxy: bool
) -> FaultResult:
    result = FaultResult(name, broker, description, recovery_applies=True)
    with FaultEnv(settings, name, broker, proxy=proxy) as env:
        lanes = [Lane(env, pool) for pool in settings.pools]
        try:
            # Queues filled first, then the workers started together: every pool
            # drains the same backlog from the same moment.
            batches = {lane.pool.name: lane.drain_messages(settings.tasks) for lane in lanes}
            for lane in lanes:
                env.client.declare(lane.queue)
            for start in range(0, settings.tasks, CHUNK):
                for lane in lanes:
                    lane.publish(batches[lane.pool.name][start : start + CHUNK])
            for lane in lanes:
                lane.new_worker().launch()
            for lane in lanes:
                assert lane.worker is not None
                lane.worker.wait_ready()
            wait_mid_drain(lanes, low=0.2, high=0.6)
            at_fault = {lane.pool.name: lane.tally.ran() for lane in lanes}
            fault_at, back_at, note = inject(env)
            settle(lanes, settings.stall)
            rescue(lanes, settings.stall)
            for lane in lanes:
                row = count(lane, recover_from=back_at, fault_at=fault_at)
                row.notes.insert(0, f"fault at {at_fault[lane.pool.name]}/{lane.sent} ran; {note}")
                row.extra.update(fault_at=fault_at, back_at=back_at)
                result.rows.append(row)
        finally:
            close(lanes)
            for row, lane in zip(result.rows, lanes, strict=False):
                row.notes.extend(lane.closing_notes)
    return result
