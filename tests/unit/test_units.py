"""Small parts on their own: outcomes, settings, messages, the consumer thread, IPC."""

from __future__ import annotations

import json
import pickle
import sys
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from celery.exceptions import Ignore, Reject, Retry
from kombu.asynchronous import Hub
from kombu.message import Message

from celery_anyio import TaskExceptionGroup, TaskExited
from celery_anyio.child import _with_shared_keys
from celery_anyio.consumer_thread import ConsumerThread, guard_prefetch_restore, route_acks
from celery_anyio.ipc import Frames, frame
from celery_anyio.messages import protocol_problem
from celery_anyio.outcomes import translate
from celery_anyio.settings import PoolSettings, SettingError

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup


# -- outcomes.translate ----------------------------------------------------------------


# translate() runs on the worker's loop: it asks AnyIO for the loop's cancellation class.


@pytest.mark.anyio
@pytest.mark.parametrize("exit_type", [SystemExit, KeyboardInterrupt, GeneratorExit])
async def test_exits_become_task_exited(exit_type: type[BaseException], anyio_backend: Any) -> None:
    translated = translate(exit_type("why"))
    assert isinstance(translated, TaskExited)
    assert translated.exc_type == exit_type.__name__


@pytest.mark.anyio
async def test_a_control_exception_in_a_group_wins(anyio_backend: Any) -> None:
    retry = Retry("again")
    group = ExceptionGroup("g", [ValueError("a"), ExceptionGroup("h", [retry, Ignore()])])
    assert translate(group) is not retry and isinstance(translate(group), Ignore)
    assert isinstance(translate(ExceptionGroup("g", [Reject("no"), Ignore()])), Reject)


@pytest.mark.anyio
async def test_one_leaf_is_itself_and_several_are_a_task_exception_group(
    anyio_backend: Any,
) -> None:
    leaf = KeyError("k")
    group = ExceptionGroup("g", [leaf])
    assert translate(group) is leaf and leaf.__cause__ is group
    several = translate(ExceptionGroup("g", [ValueError("v"), KeyError("k")]))
    assert isinstance(several, TaskExceptionGroup)
    assert several.types == ["ValueError", "KeyError"]
    assert pickle.loads(pickle.dumps(several)).types == several.types


@pytest.mark.anyio
async def test_a_cancellation_in_a_group_is_left_alone(anyio_backend: Any) -> None:
    with anyio.CancelScope() as scope:
        scope.cancel()
        try:
            await anyio.sleep(1)
        except anyio.get_cancelled_exc_class() as cancelled:
            group = BaseExceptionGroup("g", [cancelled, ValueError("v")])
            assert translate(group) is group
            assert translate(cancelled) is cancelled
            raise


# -- settings ----------------------------------------------------------------------


def test_settings_defaults_and_checks() -> None:
    settings = PoolSettings.from_conf({})
    assert (settings.backend, settings.processes, settings.result_threads) == ("asyncio", 1, 4)
    assert settings.threads_for(500) == 40 and settings.threads_for(3) == 3
    assert PoolSettings.from_conf({"worker_anyio_thread_limit": 7}).threads_for(500) == 7
    for bad in (
        {"worker_anyio_backend": "curio"},
        {"worker_anyio_result_threads": -1},
        {"worker_anyio_thread_limit": "many"},
        {"worker_anyio_processes": 0},
        {"worker_anyio_block_warning": "soon"},
        {"worker_anyio_backend_options": ["use_uvloop"]},
    ):
        with pytest.raises(SettingError, match=next(iter(bad))):
            PoolSettings.from_conf(bad)


# -- messages.protocol_problem --------------------------------------------------------


def _message(body: Any, headers: dict[str, Any] | None) -> Message:
    return Message(
        body=json.dumps(body).encode(),  # type: ignore[arg-type]  # kombu-stubs: str only
        content_type="application/json",
        content_encoding="utf-8",
        headers=headers or {},
    )


@pytest.mark.parametrize(
    ("body", "headers", "problem"),
    [
        ([[1], {}, {}], {"task": "t", "id": "i"}, None),
        ({}, {"task": "t", "id": "i"}, "[args, kwargs, embed]"),
        ([1], {"task": "t", "id": "i"}, "[args, kwargs, embed]"),
        ([[1], {}, {}], {"task": "t"}, "'id' header"),
        ({"task": "t", "id": "i", "args": [], "kwargs": {}}, None, None),
        ({"task": "t", "args": []}, None, "protocol 1 body needs a task 'id'"),
        ({"task": "t", "id": "i", "args": {}}, None, "args must be a list"),
        ([1, 2, 3], None, "no task name"),
    ],
)
def test_protocol_problems(body: Any, headers: dict[str, Any] | None, problem: str | None) -> None:
    found = protocol_problem(_message(body, headers))
    assert (found is None) if problem is None else (found is not None and problem in found)


# -- consumer_thread ---------------------------------------------------------------


def test_the_prefetch_restore_runs_on_the_consumer_thread() -> None:
    hub = Hub()
    ConsumerThread().register(hub)  # this thread is the consumer's
    ran_on: list[str] = []

    class Consumer:
        """Where Celery keeps the restore it chains onto acks after a reconnect."""

        def __init__(self) -> None:
            self.hub = hub

        def _restore_prefetch_count_after_connection_restart(self, promise: Any) -> None:
            ran_on.append(threading.current_thread().name)

    guard_prefetch_restore(Consumer)
    consumer = Consumer()
    consumer._restore_prefetch_count_after_connection_restart(None)  # here: at once
    loop = threading.Thread(
        target=consumer._restore_prefetch_count_after_connection_restart, args=(None,), name="loop"
    )
    loop.start()
    loop.join()
    assert ran_on == ["MainThread"]  # the loop thread's call waits for the hub
    for callback in hub._pop_ready():  # type: ignore[union-attr]  # kombu-stubs: one callback
        callback()
    assert ran_on == ["MainThread", "MainThread"]
    # Inside the consumer's read of a message (the pool taking it), the restore's
    # basic_qos would read and handle more messages in there: it waits for the hub.
    consumer_thread = ConsumerThread()
    consumer.pool = type("Pool", (), {"consumer_thread": consumer_thread})()  # type: ignore[attr-defined]
    consumer_thread.taking_message = True
    consumer._restore_prefetch_count_after_connection_restart(None)
    assert ran_on == ["MainThread", "MainThread"]
    assert _hub_pass(hub) == 1
    assert ran_on == ["MainThread"] * 3
    hub.close()


def _hub_pass(hub: Hub) -> int:
    """Run what is queued on the hub, as its next pass does; how many callbacks."""
    ready: Any = hub._pop_ready()  # kombu-stubs: one callback; kombu: a set of them
    for callback in ready:
        callback()
    return len(ready)


@pytest.fixture
def hub() -> Iterator[Hub]:
    hub = Hub()
    yield hub
    hub.close()


@pytest.fixture
def consumer_thread(hub: Hub) -> ConsumerThread:
    """Registered with ``hub`` from this thread, which is then the consumer's."""
    consumer_thread = ConsumerThread()
    consumer_thread.register(hub)
    return consumer_thread


def _in_thread(target: Any, *args: Any) -> None:
    thread = threading.Thread(target=target, args=args, name="loop")
    thread.start()
    thread.join()


def test_acks_from_another_thread_go_out_in_order_on_the_consumer_thread(
    hub: Hub, consumer_thread: ConsumerThread
) -> None:
    sent: list[tuple[int, str]] = []
    for n in range(3):
        _in_thread(
            consumer_thread.queue_ack, lambda n=n: sent.append((n, threading.current_thread().name))
        )
    assert sent == []
    assert _hub_pass(hub) == 1  # one callback for the batch
    assert sent == [(0, "MainThread"), (1, "MainThread"), (2, "MainThread")]


def test_queued_acks_go_out_when_the_consumer_takes_a_message_and_the_hub_finds_none(
    hub: Hub, consumer_thread: ConsumerThread
) -> None:
    sent: list[str] = []
    _in_thread(consumer_thread.queue_ack, lambda: sent.append("ack"))
    consumer_thread.send_acks()  # what the pool does before it takes a message
    assert sent == ["ack"]
    _hub_pass(hub)  # nothing left
    assert sent == ["ack"]


def test_an_ack_that_fails_propagates_and_leaves_the_rest_for_the_next_pass(
    hub: Hub, consumer_thread: ConsumerThread
) -> None:
    sent: list[str] = []

    def broken() -> None:
        raise BrokenPipeError("the connection is gone")

    consumer_thread.queue_ack(broken)
    consumer_thread.queue_ack(lambda: sent.append("next"))
    hub._pop_ready()  # the pass scheduled above: taken by hand below
    with pytest.raises(BrokenPipeError):
        consumer_thread.send_acks()
    assert sent == []
    _hub_pass(hub)
    assert sent == ["next"]


def test_a_pass_the_hub_dropped_is_scheduled_again_when_the_consumer_loop_restarts(
    hub: Hub, consumer_thread: ConsumerThread
) -> None:
    """A callback that raises ends the hub's pass and drops the rest of its batch;
    Celery then resets the hub, reconnects and registers the pool again."""
    sent: list[str] = []
    consumer_thread.queue_ack(lambda: sent.append("a"))
    hub._pop_ready()  # dropped with the old connection's callbacks
    consumer_thread.queue_ack(lambda: sent.append("b"))
    assert _hub_pass(hub) == 0  # a pass is thought to be on its way: none is
    hub.reset()
    consumer_thread.register(hub)
    assert _hub_pass(hub) == 1
    assert sent == ["a", "b"]
    consumer_thread.queue_ack(lambda: sent.append("c"))
    assert _hub_pass(hub) == 1  # and the next ack schedules a pass again
    assert sent == ["a", "b", "c"]


@pytest.mark.parametrize("celery_method", ["call_soon_ack", "call_soon"])
def test_only_acks_of_this_pools_jobs_take_the_consumer_threads_queue(
    celery_method: str, consumer_thread: ConsumerThread
) -> None:
    stock: list[Any] = []

    def queue_on_hub(self: Any, p: Any, *args: Any) -> None:
        stock.append(p)

    consumer_cls = type("Consumer", (), {celery_method: queue_on_hub})
    route_acks(consumer_cls)
    route_acks(consumer_cls)  # idempotent
    ours = consumer_cls()
    ours.pool = type("Pool", (), {"consumer_thread": consumer_thread})()
    other = consumer_cls()
    other.pool = object()  # another pool: Celery's way
    acked: list[str] = []

    class Acked(Message):
        def ack_log_error(self, logger: Any, errors: Any, multiple: bool = False) -> None:
            acked.append("ack")

    message = Acked(body="[]", headers={"task": "t", "id": "a"})
    getattr(ours, celery_method)(message.ack_log_error, None, ())
    getattr(other, celery_method)(message.ack_log_error, None, ())
    assert len(stock) == 1  # the other pool's ack
    consumer_thread.send_acks()
    assert acked == ["ack"]
    if celery_method == "call_soon":  # Celery < 5.7: the other callbacks stay Celery's
        getattr(ours, celery_method)(print)
        assert stock[-1] is print


# -- ipc -----------------------------------------------------------------------------


def test_frames_survive_any_cut_of_the_stream() -> None:
    messages = [("job", i, "x" * (i * 37), {"n": i}) for i in range(50)]
    stream = b"".join(frame(m) for m in messages)
    for step in (1, 7, 4096, len(stream)):
        frames = Frames()
        got = [
            m
            for start in range(0, len(stream), step)
            for m in frames.feed(stream[start : start + step])
        ]
        assert got == messages


def test_a_task_process_keeps_one_copy_of_the_request_keys() -> None:
    request = {
        "id": "a",
        "delivery_info": {"routing_key": "celery"},
        "retries": 0,
        "kwargs": {"user": {"deep": {}}},
    }
    sent = frame(("job", ("tasks.add", "a", request, b"[]", "application/json", "utf-8")))
    jobs = [_with_shared_keys(next(Frames().feed(sent))[1]) for _ in range(2)]
    assert jobs[0] == jobs[1] and jobs[0][2] == request
    first, second = (list(job[2]) + list(job[2]["delivery_info"]) for job in jobs)
    assert all(a is b for a, b in zip(first, second, strict=True))
    assert jobs[0][0] is jobs[1][0]  # the task name too
    assert jobs[0][2]["kwargs"] == request["kwargs"]  # the task's own data, as it came
    assert _with_shared_keys(("not", "a tracer")) == ("not", "a tracer")


# -- patches: reconnect --------------------------------------------------------------


def test_closing_a_lost_channel_that_raises_attribute_error_lets_the_consumer_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from kombu import Connection

    from celery_anyio.patches import tolerate_closing_a_lost_channel

    tolerate_closing_a_lost_channel()
    connection = Connection("memory://")
    channel = connection.channel()

    def close() -> None:  # what kombu's Redis channel does on a cleared transport
        raise AttributeError("'NoneType' object has no attribute 'hostname'")

    channel.close = close  # type: ignore[attr-defined]  # kombu-stubs: StdChannel has none
    connection.maybe_close_channel(channel)  # no "Unrecoverable error"
    assert "kombu#582" in caplog.text
    connection.release()


def test_an_ack_on_a_lost_channel_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from kombu import Connection

    from celery_anyio.patches import tolerate_closing_a_lost_channel

    tolerate_closing_a_lost_channel()
    connection = Connection("memory://")
    channel = connection.channel()
    message = Message(body=b"x", channel=channel, delivery_tag=1)  # type: ignore[arg-type]  # stubs: str

    def ack(*_: Any, **__: Any) -> None:  # kombu's Redis channel on a cleared transport
        raise AttributeError("'NoneType' object has no attribute 'hostname'")

    # kombu-stubs type the channel as the abstract StdChannel, without these.
    channel.basic_ack = ack  # type: ignore[attr-defined]
    channel.closed = True  # type: ignore[attr-defined]
    message.ack_log_error(logging.getLogger("test"), connection.connection_errors)
    assert "Couldn't ack" in caplog.text
    channel.closed = False  # type: ignore[attr-defined]  # an open channel's AttributeError is a bug: it propagates
    message._state = "RECEIVED"  # type: ignore[attr-defined]  # private: no stub
    with pytest.raises(AttributeError):
        message.ack_log_error(logging.getLogger("test"), connection.connection_errors)
    connection.release()
