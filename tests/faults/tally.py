"""What the tasks wrote on the stable Redis: execution counts, timings, result states.

The stable Redis is the machine's shared one (a database of its own, keys unique to
the run), so the counts survive whatever a fault does to the private broker. The
harness deletes every key it caused at the end of each fault.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence

import redis

RESULT_PREFIX = "celery-task-meta-"
CHUNK = 500


class Tally:
    """The hash ``key`` (member: task index, value: executions) and ``key:done``
    (one ``"<started> <ended> <member>"`` entry per execution, epoch seconds)."""

    def __init__(self, store: redis.Redis, key: str) -> None:
        self.store = store
        self.key = key

    def ran(self) -> int:
        return int(self.store.hlen(self.key))

    def has(self, member: str) -> bool:
        return bool(self.store.hexists(self.key, member))

    def counts(self) -> dict[str, int]:
        return {_text(k): int(v) for k, v in self.store.hgetall(self.key).items()}

    def timings(self) -> list[tuple[float, float]]:
        out = []
        for entry in self.store.lrange(f"{self.key}:done", 0, -1):
            started, ended = _text(entry).split()[:2]
            out.append((float(started), float(ended)))
        return out

    def first_ends(self) -> dict[str, float]:
        """When each task's first execution ended."""
        return {member: ended for member, (_, ended) in self.first_runs().items()}

    def first_runs(self) -> dict[str, tuple[float, float]]:
        """When each task's first execution started and ended."""
        runs: dict[str, tuple[float, float]] = {}
        for entry in self.store.lrange(f"{self.key}:done", 0, -1):
            started, ended, member = _text(entry).split()
            run = (float(started), float(ended))
            runs[member] = min(run, runs.get(member, run))
        return runs

    def delete(self) -> None:
        self.store.delete(self.key, f"{self.key}:done")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def result_states(store: redis.Redis, ids: Sequence[str]) -> Counter[str]:
    """How many of ``ids`` have each state in the result backend (PENDING: no result)."""
    states: Counter[str] = Counter()
    for start in range(0, len(ids), CHUNK):
        keys = [f"{RESULT_PREFIX}{i}" for i in ids[start : start + CHUNK]]
        for raw in store.mget(keys):
            if raw is None:
                states["PENDING"] += 1
                continue
            try:
                states[str(json.loads(raw)["status"])] += 1
            except (ValueError, KeyError, TypeError):
                states["UNREADABLE"] += 1
    return states


def result_of(store: redis.Redis, task_id: str) -> dict[str, object] | None:
    raw = store.get(f"{RESULT_PREFIX}{task_id}")
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return {"status": "UNREADABLE"}
    return value if isinstance(value, dict) else {"status": "UNREADABLE"}


def delete_results(store: redis.Redis, ids: Iterable[str]) -> None:
    batch: list[str] = []
    for task_id in ids:
        batch.append(f"{RESULT_PREFIX}{task_id}")
        if len(batch) >= CHUNK:
            store.delete(*batch)
            batch.clear()
    if batch:
        store.delete(*batch)


def first_completion_after(timings: Iterable[tuple[float, float]], moment: float) -> float | None:
    """Seconds from ``moment`` to the end of the first task that started after it."""
    ends = [ended for started, ended in timings if started >= moment]
    return min(ends) - moment if ends else None
