"""Async signal receivers outside a worker: a plain thread and a running event loop."""

from __future__ import annotations

import logging
import threading
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from celery.utils.dispatch import Signal

import celery_anyio

celery_anyio.install()  # async receivers outside a worker, as a client app would


@pytest.fixture
def signal() -> Signal:
    return Signal(name="celery_anyio_test_signal")


def connect_recorders(signal: Signal, calls: list[str]) -> list[Any]:
    """Sync and async receivers interleaved: they must run in this order."""

    def first(**_: Any) -> str:
        calls.append("sync 1")
        return "one"

    async def second(**_: Any) -> str:
        await anyio.lowlevel.checkpoint()
        calls.append(f"async 2 on {threading.current_thread().name}")
        return "two"

    def third(**_: Any) -> str:
        calls.append("sync 3")
        return "three"

    receivers = [first, second, third]
    for receiver in receivers:
        signal.connect(receiver, weak=False)
    return receivers


def test_async_receiver_runs_in_order_from_a_plain_thread(signal: Signal) -> None:
    calls: list[str] = []
    connect_recorders(signal, calls)
    responses = signal.send(sender=None)
    assert [value for _, value in responses] == ["one", "two", "three"]
    assert calls == ["sync 1", f"async 2 on {threading.current_thread().name}", "sync 3"]


@pytest.mark.anyio
async def test_async_receiver_sent_from_inside_a_running_loop(signal: Signal) -> None:
    calls: list[str] = []
    connect_recorders(signal, calls)
    responses = signal.send(sender=None)  # e.g. after_task_publish from an async web view
    assert [value for _, value in responses] == ["one", "two", "three"]
    assert calls == ["sync 1", "async 2 on celery-anyio-own-loop", "sync 3"]


def test_failing_async_receiver_is_logged_and_the_others_run(
    signal: Signal, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []

    async def broken(**_: Any) -> None:
        await anyio.lowlevel.checkpoint()
        raise RuntimeError("receiver failed")

    signal.connect(broken, weak=False)
    connect_recorders(signal, calls)
    with caplog.at_level(logging.ERROR):
        responses = signal.send(sender=None)
    assert isinstance(responses[0][1], RuntimeError)
    assert len(calls) == 3
    assert "receiver failed" in caplog.text
