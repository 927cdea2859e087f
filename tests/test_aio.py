"""The async client API: send tasks and canvas, await results, from any AnyIO program.

Worker tests run against the session's real `celery worker -P celery_anyio:Pool`
on Redis and RabbitMQ (both pool backends), from a client on asyncio and trio.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import anyio.to_thread
import celery
import pytest
import trio
from celery import Celery, chain, chord, group
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult, GroupResult, ResultSet

import celery_anyio
from celery_anyio import aio, patches

from . import workerapp
from .harness import ROOT, Client, Namespace, Worker, selected_backends

# The async client methods, as a client app would have them: patched onto Celery's
# classes at run time, so mypy (reading celery-types) sees none of them: the lines
# that call one say so ("an aio method").
celery_anyio.install_aio()
celery_anyio.install()  # eager mode for async tasks (test_eager_mode), on its own too

EXAMPLES = ROOT / "docs" / "examples"
worker_test = pytest.mark.worker


@pytest.fixture(autouse=True)
def _no_garbage_collection_inside_publishes() -> Iterator[None]:
    """On Celery < 5.7, collect garbage between tests only.

    There a cyclic collection that finalizes an ``AsyncResult`` while the same
    thread subscribes to a result on Redis deadlocks on the pub/sub lock of
    redis-py >= 5.3 (celery/celery#10477, fixed in 5.7); pytest's exception info
    makes such cycles.
    """
    if celery.VERSION >= (5, 7):
        yield
        return
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()


async def revoke(client: Client, result: AsyncResult[Any]) -> None:
    """Stop a long task we no longer wait for, so the worker's warm stop is quick."""
    control = client.app.control
    await anyio.to_thread.run_sync(lambda: control.revoke(result.id, terminate=True))


async def sync_outcome(get: Callable[..., Any], **kwargs: Any) -> Any:
    """What a blocking ``.get()`` returns or raises, called off the loop."""
    try:
        return await anyio.to_thread.run_sync(lambda: get(**kwargs))
    except Exception as exc:  # noqa: BLE001 - compared with aget's
        return exc


# -- sending and waiting -------------------------------------------------------


@worker_test
@pytest.mark.anyio
async def test_task_and_app_methods_send_and_aget_waits(client: Client) -> None:
    # Importing tests.workerapp registered its shared tasks with every app, the
    # client's too, as importing a project's tasks module does.
    add = client.app.tasks["tests.workerapp.add"]
    assert add.app is client.app
    sent = [
        await add.adelay(1, 2),  # type: ignore[attr-defined]  # an aio method
        await add.aapply_async((3, 4), countdown=0.2),  # type: ignore[attr-defined]  # an aio method
        await client.app.asend_task("tests.workerapp.add", (5, 6)),  # type: ignore[attr-defined]  # an aio method
        await client.sig("add", 7).adelay(8),  # partial args, as Signature.delay
        await aio.adelay(add, 9, 10),
        await aio.asend_task(client.app, "tests.workerapp.add", kwargs={"a": 1, "b": 1}),
    ]
    assert all(isinstance(r, AsyncResult) for r in sent)
    assert [await r.aget(timeout=30) for r in sent] == [3, 7, 11, 15, 19, 2]
    assert await aio.aget(sent[0], timeout=5) == 3
    assert {r.state for r in sent} == {"SUCCESS"}  # stored by the worker, read by the client

    ignored = await client.sig("mark", f"celery-anyio-test:{uuid.uuid4().hex}").aapply_async(
        ignore_result=True
    )
    with anyio.fail_after(5):  # .get() returns None at once for an ignored result (not at 30 s)
        assert await ignored.aget(timeout=30) is None


@worker_test
@pytest.mark.anyio
async def test_canvas_chain_group_chord(client: Client) -> None:
    pipeline = await chain(client.sig("add", 1), client.sig("add", 3)).adelay(2)  # type: ignore[attr-defined]  # an aio method
    assert await pipeline.aget(timeout=30) == 6  # add(2, 1) -> add(3, 3)

    doubles = await group(client.sig("add", i, i) for i in range(10)).aapply_async()  # type: ignore[attr-defined]  # an aio method
    assert isinstance(doubles, GroupResult)
    assert await doubles.aget(timeout=30) == [2 * i for i in range(10)]  # type: ignore[attr-defined]  # an aio method

    header = [client.sig("add", i, 1) for i in range(10)]
    summed = await chord(header, client.sig("total")).aapply_async()  # type: ignore[attr-defined]  # an aio method
    assert await summed.aget(timeout=30) == sum(range(1, 11))

    pair = ResultSet(
        [await client.sig("add", 1, 1).adelay(), await client.sig("add", 2, 2).adelay()]
    )
    assert await pair.aget(timeout=30) == [2, 4]  # type: ignore[attr-defined]  # an aio method

    nested = await group(  # type: ignore[attr-defined]  # an aio method
        group(client.sig("add", 1, 1), client.sig("add", 2, 2)), client.sig("add", 3, 3)
    ).aapply_async()
    # join(), not get(): Celery resolves a group's backend per thread, so a
    # group sent from one thread can't be get() from another (aget can).
    expected = await sync_outcome(nested.join, timeout=30)
    assert await nested.aget(timeout=30) == expected == [2, 4, 6]


# -- deadlines and cancellation ------------------------------------------------


@worker_test
@pytest.mark.anyio
async def test_timeout_raises_celery_timeout_error(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = await client.sig("sleepy", 1, 30).adelay()
    # Pauses of 60 s between looks: only a deadline that cuts the first pause ends
    # these waits on time (bounds: never early, and long before the next look).
    monkeypatch.setattr(aio, "FIRST_DELAY", 60.0)
    try:
        started = time.monotonic()
        with pytest.raises(CeleryTimeoutError, match="timed out"):
            await slow.aget(timeout=1.0, interval=60)
        elapsed = time.monotonic() - started
        assert 0.99 <= elapsed < 4.0, elapsed

        done = await client.sig("add", 1, 1).adelay()
        started = time.monotonic()
        with pytest.raises(CeleryTimeoutError):
            await ResultSet([done, slow]).aget(timeout=0.5, interval=60)  # type: ignore[attr-defined]  # an aio method
        elapsed = time.monotonic() - started
        assert 0.49 <= elapsed < 3.5, elapsed

        monkeypatch.undo()  # the usual pauses again
        assert await done.aget(timeout=30) == 2
        # timeout=0: one look, as .get(timeout=0) takes (not a wait for the 30 s task).
        with anyio.fail_after(5), pytest.raises(CeleryTimeoutError):
            await slow.aget(timeout=0)
        assert await client.app.AsyncResult(done.id).aget(timeout=0) == 2  # type: ignore[attr-defined]  # an aio method
    finally:
        await revoke(client, slow)


@worker_test
@pytest.mark.anyio
async def test_cancellation_ends_the_wait_at_once(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = await client.sig("sleepy", 1, 30).adelay()
    # Pauses of 60 s between looks: cancelled 1 s into the first one, only a
    # cancellable wait leaves it on time (the next look would be at 60 s).
    monkeypatch.setattr(aio, "FIRST_DELAY", 60.0)
    try:
        started = time.monotonic()
        with anyio.move_on_after(1.0) as scope:
            await slow.aget(interval=60)
        elapsed = time.monotonic() - started
        assert scope.cancelled_caught
        assert 1.0 <= elapsed < 4.0, elapsed
    finally:
        await revoke(client, slow)


@worker_test
@pytest.mark.anyio
async def test_the_loop_keeps_running_while_aget_waits(client: Client) -> None:
    result = await client.sig("sleepy", 3, 5.0).adelay()
    gaps: list[float] = []

    async def tick() -> None:
        last = time.monotonic()
        while True:
            await anyio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async with anyio.create_task_group() as tg:
        tg.start_soon(tick)
        assert await result.aget(timeout=30) == 3
        tg.cancel_scope.cancel()
    assert len(gaps) >= 100, len(gaps)  # ~5 s of 10 ms ticks
    assert max(gaps) < 2.5, max(gaps)  # a blocking wait would stall one tick for ~5 s


# -- failures --------------------------------------------------------------------


@worker_test
@pytest.mark.anyio
async def test_failures_propagate_like_get(client: Client) -> None:
    boom = await client.sig("boom", "kaput!").adelay()
    with pytest.raises(ValueError, match="kaput!") as raised:
        await boom.aget(timeout=30)
    blocking = await sync_outcome(client.app.AsyncResult(boom.id).get, timeout=30)
    assert type(raised.value) is type(blocking) is ValueError
    assert raised.value.args == blocking.args

    returned = await boom.aget(timeout=30, propagate=False)
    assert isinstance(returned, ValueError)
    assert returned.args == ("kaput!",)
    assert boom.state == "FAILURE"

    # The task's own exception type, as .get() rebuilds it from the backend.
    own = await client.sig("kaput", "own type").adelay()
    with pytest.raises(workerapp.Kaput, match="own type"):
        await own.aget(timeout=30)
    blocking = await sync_outcome(client.app.AsyncResult(own.id).get, timeout=30)
    assert type(blocking) is workerapp.Kaput


@worker_test
@pytest.mark.anyio
async def test_chain_and_group_failures_are_raised_early(client: Client) -> None:
    # The chain's last task never runs: aget raises the failed parent's error,
    # as .get() does, instead of waiting for the deadline.
    broken = await chain(client.sig("boom", "first link"), client.sig("add", 1)).aapply_async()  # type: ignore[attr-defined]  # an aio method
    with anyio.fail_after(10), pytest.raises(ValueError, match="first link"):
        await broken.aget(timeout=30)

    # A result whose parent failed: .get() raises the parent's error at once,
    # or, with follow_parents=False, waits for the result itself.
    failed = await client.sig("boom", "parent").adelay()
    orphan: AsyncResult[Any] = AsyncResult(uuid.uuid4().hex, parent=failed, app=client.app)
    with anyio.fail_after(10), pytest.raises(ValueError, match="parent"):
        await orphan.aget(timeout=30)  # type: ignore[attr-defined]  # an aio method
    with pytest.raises(CeleryTimeoutError):
        await orphan.aget(timeout=0.5, follow_parents=False)  # type: ignore[attr-defined]  # an aio method

    slow_and_bad = await group(  # type: ignore[attr-defined]  # an aio method
        client.sig("sleepy", 0, 5), client.sig("boom", "member")
    ).aapply_async()
    started = time.monotonic()
    with pytest.raises(ValueError, match="member"):
        await slow_and_bad.aget(timeout=30)
    assert time.monotonic() - started < 4.0  # not after the 5 s sibling
    assert not await anyio.to_thread.run_sync(slow_and_bad.results[0].ready)  # still running
    values = await slow_and_bad.aget(timeout=30, propagate=False)
    assert values[0] == 0
    assert isinstance(values[1], ValueError)


# -- inside a worker task ----------------------------------------------------------


@worker_test
@pytest.mark.anyio
async def test_worker_task_sends_and_awaits_with_lineage(client: Client) -> None:
    root = await client.sig("lineage", 2).adelay()
    levels = await root.aget(timeout=60)
    assert len(levels) == 3
    assert levels[0]["id"] == root.id
    assert levels[0]["parent_id"] is None
    for parent, child in itertools.pairwise(levels):
        assert child["parent_id"] == parent["id"]
        assert child["root_id"] == root.id  # not the parent's id: the root's
    # add_to_parent: the child is recorded in the parent's result, as with delay().
    assert [child.id for child in root.children] == [levels[1]["id"]]

    fanned = await client.sig("fan_out", 20).adelay()
    assert await fanned.aget(timeout=60) == [2 * i for i in range(20)]


# -- any AnyIO program -------------------------------------------------------------


@worker_test
@pytest.mark.parametrize("run", [f"{backend}.run" for backend in selected_backends()])
def test_plain_scripts(client: Client, run: str) -> None:
    async def main() -> Any:
        result = await client.sig("add", 20, 22).adelay()
        return await result.aget(timeout=30)

    value = trio.run(main) if run == "trio.run" else asyncio.run(main())
    assert value == 42


@worker_test
@pytest.mark.anyio
async def test_starlette_app(client: Client) -> None:
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def add(request: Request) -> JSONResponse:
        a, b = int(request.query_params["a"]), int(request.query_params["b"])
        result = await client.app.asend_task("tests.workerapp.sleepy", (a + b, 5.0))  # type: ignore[attr-defined]  # an aio method
        try:
            return JSONResponse({"id": result.id, "sum": await result.aget(timeout=30)})
        except CeleryTimeoutError:
            return JSONResponse({"id": result.id}, status_code=504)

    async def ping(request: Request) -> JSONResponse:
        return JSONResponse("pong")

    app = Starlette(routes=[Route("/add", add), Route("/ping", ping)])
    bodies: dict[int, dict[str, Any]] = {}
    pings: list[float] = []
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:

        async def ask(i: int) -> None:
            response = await http.get("/add", params={"a": i, "b": 1})
            assert response.status_code == 200, response.text
            bodies[i] = response.json()

        async def keep_pinging() -> None:
            while True:
                sent = time.monotonic()
                assert (await http.get("/ping")).json() == "pong"
                pings.append(time.monotonic() - sent)
                await anyio.sleep(0.05)

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(keep_pinging)
            async with anyio.create_task_group() as asks:
                for i in range(20):
                    asks.start_soon(ask, i)
            tg.cancel_scope.cancel()
        elapsed = time.monotonic() - started
    assert {i: body["sum"] for i, body in bodies.items()} == {i: i + 1 for i in range(20)}
    assert elapsed < 25, elapsed  # 20 requests waiting 5 s each, at once (100 s one by one)
    # The app answers other requests while those wait (a blocking wait: ~5 s).
    assert len(pings) >= 10, pings
    assert max(pings) < 2.5, max(pings)


# -- the documented example --------------------------------------------------------


@pytest.fixture(scope="session")
def example_worker(namespace: Namespace) -> Iterator[Worker]:
    """A worker for docs/examples/tasks.py, started the documented way."""
    queue = namespace.queue("example")
    with pytest.MonkeyPatch.context() as env:
        env.setenv(
            "PYTHONPATH",
            os.pathsep.join(filter(None, [str(EXAMPLES), os.environ.get("PYTHONPATH")])),
        )
        env.setenv("CELERY_BROKER_URL", namespace.broker_url)
        env.setenv("CELERY_RESULT_BACKEND", namespace.results_url)
        env.setenv("CELERY_QUEUE", queue)
        worker = Worker(
            namespace, queue, ["-P", "celery_anyio:Pool", "--backend=trio"], app_module="tasks"
        )
        worker.start()
    try:
        yield worker
    finally:
        worker.stop()


@worker_test
@pytest.mark.parametrize("loop", selected_backends())
def test_docs_example_runs(example_worker: Worker, namespace: Namespace, loop: str) -> None:
    env = dict(
        os.environ,
        CELERY_BROKER_URL=namespace.broker_url,
        CELERY_RESULT_BACKEND=namespace.results_url,
        CELERY_QUEUE=example_worker.queue,
    )
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "async_client.py"), loop],
        cwd=EXAMPLES,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "add: 5",
        "chain: 13",
        "group: [0, 2, 4, 6, 8]",
        "chord: 20",
        "add_twice: 5",
        "timeout: not ready after 0.5 s",
        "cancelled: after 0.5 s",
        "sleepy: 2.0",
    ]


# -- without a worker --------------------------------------------------------------


@pytest.mark.anyio
async def test_rpc_backend_is_a_clear_error() -> None:
    app = Celery("aio-rpc", broker="memory://", backend="rpc://", set_as_current=False)
    try:
        result = app.AsyncResult(uuid.uuid4().hex)
        with pytest.raises(aio.UnsupportedResultBackend, match=r"rpc://"):
            await result.aget(timeout=5)  # type: ignore[attr-defined]  # an aio method
        with pytest.raises(aio.UnsupportedResultBackend):
            await GroupResult(uuid.uuid4().hex, [result], app=app).aget(timeout=5)  # type: ignore[attr-defined]  # an aio method
    finally:
        app.close()


@pytest.mark.anyio
async def test_eager_mode(anyio_backend_name: str) -> None:
    app = Celery("aio-eager", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.task_always_eager = True
    app.conf.worker_anyio_backend = anyio_backend_name

    @app.task(shared=False)
    async def double(x: int) -> int:
        await anyio.sleep(0.01)
        return 2 * x

    app.finalize()  # celery_anyio wraps async tasks when their app is finalized
    try:
        result = await double.adelay(21)  # type: ignore[attr-defined]  # an aio method
        assert await result.aget(timeout=5) == 42
    finally:
        app.close()


def test_aio_patch_only_adds(monkeypatch: pytest.MonkeyPatch) -> None:
    async def own(self: Any) -> str:
        return "celery's own"

    monkeypatch.setattr(AsyncResult, "aget", own)
    patches.install_aio_methods()
    assert AsyncResult.aget is own  # type: ignore[attr-defined]  # an aio method


@pytest.mark.parametrize("disabled", ["", "aio", "all"])
def test_aio_patch_is_switchable(disabled: str) -> None:
    names = [
        "celery.app.task:Task.adelay",
        "celery.app.task:Task.aapply_async",
        "celery.canvas:Signature.adelay",
        "celery.canvas:Signature.aapply_async",
        "celery.canvas:_chord.aapply_async",
        "celery.app.base:Celery.asend_task",
        "celery.result:AsyncResult.aget",
        "celery.result:GroupResult.aget",
    ]
    code = (
        "import importlib, celery_anyio\n"
        "celery_anyio.install_aio()\n"
        f"for name in {names!r}:\n"
        "    module, attr = name.split(':')\n"
        "    cls, method = attr.split('.')\n"
        "    print(hasattr(getattr(importlib.import_module(module), cls), method))\n"
    )
    env = dict(os.environ, CELERY_ANYIO_DISABLE_PATCHES=disabled)
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == [str(not disabled)] * len(names)
