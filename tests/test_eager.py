"""Eager mode and direct calls of async tasks, outside any worker."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from celery import Celery

import celery_anyio
from celery_anyio.context import job_identity

from .harness import selected_backends

celery_anyio.install()  # eager mode for async tasks, as an app outside the worker would


@pytest.fixture(params=selected_backends())
def app(request: pytest.FixtureRequest) -> Iterator[Celery]:
    app = Celery("eager", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.worker_anyio_backend = request.param

    @app.task(bind=True, shared=False)
    async def double(self: Any, x: int) -> dict[str, Any]:
        before = self.request.id
        await anyio.sleep(0.01)
        return {"value": 2 * x, "id": self.request.id, "before": before}

    @app.task(shared=False)
    async def fail() -> None:
        await anyio.lowlevel.checkpoint()
        raise KeyError("nope")

    app.finalize()
    yield app
    app.close()


def test_apply_runs_the_body_and_returns_its_value(app: Celery) -> None:
    result = app.tasks[f"{__name__}.double"].apply(args=(21,), task_id="t-1")
    assert result.get() == {"value": 42, "id": "t-1", "before": "t-1"}


def test_apply_leaves_the_callers_context_as_it_was(app: Celery) -> None:
    # The eager body runs as a job of its own; that identity must not stay behind
    # in the calling thread, where threads started later would inherit it.
    assert job_identity.get() is None
    app.tasks[f"{__name__}.double"].apply(args=(1,))
    assert job_identity.get() is None


def test_apply_reports_failures(app: Celery) -> None:
    result = app.tasks[f"{__name__}.fail"].apply()
    assert result.state == "FAILURE"
    with pytest.raises(KeyError):
        result.get()


def test_always_eager_delay(app: Celery) -> None:
    app.conf.task_always_eager = True
    assert app.tasks[f"{__name__}.double"].delay(5).get()["value"] == 10


def test_task_defined_after_finalize_is_wrapped_too(app: Celery) -> None:
    from celery_anyio.patches import wrap_async_tasks

    @app.task(shared=False)
    async def late(x: int) -> int:
        await anyio.lowlevel.checkpoint()
        return x + 1

    wrap_async_tasks(app)  # what a worker does at start
    assert late.apply(args=(1,)).get() == 2


@pytest.mark.anyio
async def test_direct_await_is_a_plain_call(app: Celery) -> None:
    double = app.tasks[f"{__name__}.double"]
    assert (await double(4))["value"] == 8


@pytest.mark.anyio
async def test_apply_inside_a_running_loop(app: Celery) -> None:
    result = app.tasks[f"{__name__}.double"].apply(args=(3,), task_id="inner")
    assert result.get() == {"value": 6, "id": "inner", "before": "inner"}


@pytest.mark.parametrize("always_eager", [False, True])
def test_eager_before_the_app_is_finalized(always_eager: bool) -> None:
    app = Celery("lazy", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.task_always_eager = always_eager

    @app.task(shared=False)
    async def triple(x: int) -> int:
        await anyio.lowlevel.checkpoint()
        return 3 * x

    assert not app.finalized  # type: ignore[attr-defined]  # not in celery-types
    result = triple.delay(3) if always_eager else triple.apply(args=(3,))
    assert result.get() == 9
    app.close()
