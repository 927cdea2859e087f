"""Task-aware logging: each log line names the task that wrote it."""

from __future__ import annotations

import re
import time

import pytest

from .harness import Client, Worker, send

pytestmark = pytest.mark.worker

LINE = re.compile(r"tests\.limitsapp\.logs_its_id\[([0-9a-f-]+)\]: my id is ([0-9a-f-]+) \(round")


def test_task_logger_lines_carry_their_own_task_id(limits: Client, limits_worker: Worker) -> None:
    results = [send(limits, "logs_its_id", 5) for _ in range(100)]
    ids = {r.get(timeout=60) for r in results}
    assert ids == {r.id for r in results}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pairs = [m.groups() for m in LINE.finditer(limits_worker.log()) if m.group(2) in ids]
        if len(pairs) >= 500:
            break
        time.sleep(0.1)
    assert len(pairs) == 500
    assert all(prefix == message for prefix, message in pairs)
