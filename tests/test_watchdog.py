"""The blocked-loop warning's verdict from the watchdog's stack samples."""

from __future__ import annotations

import logging

import pytest

from celery_anyio.watchdog import LoopMonitor

BLOCKER = "tests.blocker[1]"
OTHER = "tests.other[2]"


def _verdict(caplog: pytest.LogCaptureFixture, culprits: list[tuple[str | None, str]]) -> str:
    monitor = LoopMonitor(0.1, None)
    monitor._culprits = list(culprits)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="celery_anyio.watchdog"):
        monitor._report(0.6)
    (record,) = caplog.records
    return f"{record.levelname}: {record.getMessage()}"


def test_one_task_in_every_sample_is_named(caplog: pytest.LogCaptureFixture) -> None:
    verdict = _verdict(caplog, [(BLOCKER, "app.py:3 in blocker")] * 20)
    assert verdict.startswith("WARNING")
    assert f"blocked for 0.60s by task {BLOCKER} (at app.py:3 in blocker)" in verdict


def test_a_sample_in_the_loops_own_code_does_not_hide_the_task(
    caplog: pytest.LogCaptureFixture,
) -> None:
    culprits = [(BLOCKER, "app.py:3 in blocker")] * 20 + [(None, "trio/_run.py:1 in run")]
    verdict = _verdict(caplog, culprits)
    assert verdict.startswith("WARNING")
    assert f"by task {BLOCKER} (at app.py:3 in blocker)" in verdict


@pytest.mark.parametrize(
    "culprits",
    [
        [(BLOCKER, "app.py:3 in blocker")] * 10 + [(OTHER, "app.py:9 in other")] * 10,
        [(None, "selectors.py:1 in select")] * 10 + [(BLOCKER, "app.py:3 in blocker")] * 2,
        [(None, "selectors.py:1 in select")] * 5,
        [],
    ],
    ids=["two tasks", "task now and then", "no task", "no sample"],
)
def test_lag_without_one_culprit_is_only_debug(
    caplog: pytest.LogCaptureFixture, culprits: list[tuple[str | None, str]]
) -> None:
    assert _verdict(caplog, culprits).startswith("DEBUG: celery_anyio: the event loop lagged")
