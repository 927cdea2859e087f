"""The faults by name, what each does, and the groups ``--faults`` and ``--quick`` use."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import broker_faults, malformed, soak, worker_faults
from .context import Settings
from .report import FaultResult


@dataclass(frozen=True)
class Fault:
    name: str
    description: str
    run: Callable[[Settings, str], FaultResult]
    needs: str | None = None  # the broker it is about (None: --broker)


def _restart(broker: str) -> Callable[[Settings, str], FaultResult]:
    return lambda s, d: broker_faults.run(
        s, f"{broker}-restart", broker, d, broker_faults.restart, proxy=False
    )


def _cut(seconds: int, broker: str) -> Callable[[Settings, str], FaultResult]:
    return lambda s, d: broker_faults.run(
        s, f"cut-{seconds}s-{broker}", broker, d, broker_faults.cut(seconds), proxy=True
    )


def _stop(name: str, stop: worker_faults.Stop, task: str = "sleep") -> Callable[..., FaultResult]:
    return lambda s, d: worker_faults.run_stop(s, name, d, stop, task)


_SIDE_BY_SIDE = "The three pools side by side, each on its own queue of one private broker."
FAULTS = {
    f.name: f
    for f in (
        Fault(
            "redis-restart",
            "Private Redis (`appendonly yes`) stopped with SIGTERM mid-drain, started again on "
            f"the same port and folder {broker_faults.OUTAGE:.0f} s later. " + _SIDE_BY_SIDE,
            _restart("redis"),
            "redis",
        ),
        Fault(
            "rabbitmq-restart",
            "Private RabbitMQ node stopped with `rabbitmqctl stop` (the whole node) mid-drain, "
            f"started again {broker_faults.OUTAGE:.0f} s after it exited. " + _SIDE_BY_SIDE,
            _restart("rabbitmq"),
            "rabbitmq",
        ),
        *(
            Fault(
                f"cut-{sec}s-{broker}",
                f"The proxy in front of the private {broker} aborts every connection and "
                f"refuses new ones for {sec} s, then restores. " + _SIDE_BY_SIDE,
                _cut(sec, broker),
                broker,
            )
            for sec in (2, 30)
            for broker in ("redis", "rabbitmq")
        ),
        Fault(
            "kill9-late",
            "`kill -9` of the worker's process group mid-drain (acks_late tasks); a fresh "
            "worker of the same pool drains what is redelivered. Pools one after the other.",
            _stop("kill9-late", worker_faults.kill9),
        ),
        Fault(
            "kill9-reject",
            "As kill9-late, with `reject_on_worker_lost=True` tasks.",
            _stop("kill9-reject", worker_faults.kill9, "reject"),
        ),
        Fault(
            "sigterm",
            "SIGTERM (warm shutdown) mid-drain; a fresh worker drains the rest.",
            _stop("sigterm", worker_faults.sigterm),
        ),
        Fault(
            "sigterm-sigquit",
            "SIGTERM, then SIGQUIT 1 s later (cold shutdown) mid-drain; a fresh worker "
            "drains the rest.",
            _stop("sigterm-sigquit", worker_faults.sigterm_sigquit),
        ),
        Fault(
            "block-loop",
            f"A task that blocks for {worker_faults.BLOCK_SECONDS:.0f} s (`time.sleep` inside "
            "`async def` for celery_anyio: the whole loop; a `def` task for threads) queued "
            "in the middle of the drain. Recovery: from the end of the block to the first "
            "task started after it completing.",
            lambda s, d: worker_faults.run_block(s, d),
        ),
        Fault(
            "malformed",
            "Hostile messages published raw to the running worker's queue, one at a time, "
            f"then {malformed.NEXT_TASKS} well-formed tasks. Rows count those "
            f"{malformed.NEXT_TASKS}; the second table is each message.",
            malformed.run,
        ),
        Fault(
            "soak",
            "No-op tasks pre-loaded into the queue, drained at -c 500 with the worker at "
            "`-l warning`; its RSS sampled every second.",
            soak.run,
        ),
    )
}
GROUPS = {
    "cut-2s": ["cut-2s-redis", "cut-2s-rabbitmq"],
    "cut-30s": ["cut-30s-redis", "cut-30s-rabbitmq"],
    "cut": ["cut-2s-redis", "cut-2s-rabbitmq", "cut-30s-redis", "cut-30s-rabbitmq"],
    "kill9": ["kill9-late", "kill9-reject"],
    "restart": ["redis-restart", "rabbitmq-restart"],
    "all": list(FAULTS),
}
QUICK = ["redis-restart", "cut-2s-redis", "kill9-late", "malformed"]
QUICK_TASKS = 500
QUICK_VISIBILITY = 10  # so the Redis transport redelivers after kill -9 sooner


def expand(names: list[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        for fault in GROUPS.get(name, [name]):
            if fault not in FAULTS:
                raise KeyError(f"unknown fault {fault!r}: choose from {', '.join(FAULTS)}")
            if fault not in out:
                out.append(fault)
    return out
