"""The pools a fault runs against, and which twin of each task they execute."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PoolSpec:
    name: str
    args: tuple[str, ...]
    is_async: bool

    def task(self, base: str) -> str:
        """The task ``faults.<base>_async`` or ``faults.<base>_sync`` this pool can run."""
        return f"faults.{base}_{'async' if self.is_async else 'sync'}"


POOLS = {
    spec.name: spec
    for spec in (
        PoolSpec("anyio-asyncio", ("-P", "celery_anyio:Pool", "--backend=asyncio"), True),
        PoolSpec("anyio-trio", ("-P", "celery_anyio:Pool", "--backend=trio"), True),
        # Two task processes under one worker: kill -9 and signals hit the main process.
        PoolSpec(
            "anyio-p2",
            ("-P", "celery_anyio:Pool", "--backend=asyncio", "--processes", "2"),
            True,
        ),
        # Celery's threads pool cannot await: it runs the ``def`` twins.
        PoolSpec("threads", ("-P", "threads"), False),
    )
}
BASELINE = "threads"  # "ran twice" is compared with this pool's count in the same run
