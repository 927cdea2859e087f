"""What ``task_prerun`` receivers put in the context is the async body's context.

OpenTelemetry's Celery instrumentation (and any ``ContextVar``-based library)
starts its work in ``task_prerun`` and ends it in ``task_postrun``: the body
must run in between, in that context, as a sync body would.
"""

from __future__ import annotations

import random
import time

import pytest

from .harness import Client, key, tallies

pytestmark = pytest.mark.worker


def test_prerun_context_reaches_the_body_and_postrun_sees_the_body(client: Client) -> None:
    k = key()
    n = 200
    results = [client.send("context_probe", k, random.random() / 5) for _ in range(n)]
    assert [r.get(timeout=60) for r in results] == ["ok"] * n
    deadline = time.monotonic() + 30  # postrun runs just after the result is stored
    while tallies(client, k, 2) != {"body saw prerun": n, "postrun saw the body": n}:
        assert time.monotonic() < deadline, tallies(client, k)
        time.sleep(0.05)
