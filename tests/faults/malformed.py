"""Hostile messages, published raw to a running worker's queue one at a time.

For each: what the worker logged (its first ERROR/CRITICAL line, or "nothing"),
whether the broker still holds the message, the task's stored state, and whether
the worker survived. A worker that dies or stops processing is reported, the
message is purged (it would end the next worker too) and a fresh worker takes the
next one. Then 100 well-formed tasks must all succeed.
"""

from __future__ import annotations

import json
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import logscan
from .client import Client, Outgoing
from .context import FaultEnv, Settings
from .lanes import Lane, close, count, settle
from .pools import PoolSpec
from .report import Detail, FaultResult, Row
from .tally import Tally, delete_results, result_of

JSON = "application/json"
HANDLED_TIMEOUT = 20.0  # for the message after it (a sentinel) to run
BROKER_TIMEOUT = 5.0  # for the broker to let go of the hostile message
RESULT_TIMEOUT = 10.0
NEXT_TASKS = 100
EXIT_TIMEOUT = 30.0
GOING_DOWN = "Unrecoverable error"  # Celery logs it, then the worker stops
RESTART_LOOP = "Frequent restarts detected"
BIG = 5 * 1024 * 1024


@dataclass
class Raw:
    body: bytes
    content_type: str
    headers: dict[str, Any] | None
    properties: dict[str, Any]
    task_id: str | None  # whose state to read back, if the message names one


def _wellformed(client: Client, name: str, args: tuple[Any, ...] = ()) -> Raw:
    task_id, msg = client.task_message(name, args)
    return Raw(
        json.dumps(msg.body).encode(), JSON, dict(msg.headers), dict(msg.properties), task_id
    )


def _with(raw: Raw, **changes: Any) -> Raw:
    for key, value in changes.items():
        setattr(raw, key, value)
    return raw


def _without_header(raw: Raw, header: str) -> Raw:
    assert raw.headers is not None
    raw.headers.pop(header)
    if header == "id":
        raw.task_id = None
    return raw


def _protocol1(client: Client, name: str) -> Raw:
    task_id, _ = client.task_message(name)
    body = {"task": name, "id": task_id, "args": ["x"], "kwargs": {}, "retries": 0, "eta": None}
    return Raw(json.dumps(body).encode(), JSON, None, {"correlation_id": task_id}, task_id)


Build = Callable[[Client, PoolSpec], Raw]

MESSAGES: dict[str, Build] = {
    "JSON body {} (not [args, kwargs, embed])": lambda c, p: _with(
        _wellformed(c, p.task("size"), ("x",)), body=b"{}"
    ),
    "JSON body [1]": lambda c, p: _with(_wellformed(c, p.task("size"), ("x",)), body=b"[1]"),
    "body not JSON (application/json)": lambda c, p: _with(
        _wellformed(c, p.task("size"), ("x",)), body=b"\x80not json{"
    ),
    "content type application/x-unknown": lambda c, p: _with(
        _wellformed(c, p.task("size"), ("x",)), content_type="application/x-unknown"
    ),
    "pickle body (worker accepts json only)": lambda c, p: _with(
        _wellformed(c, p.task("size"), ("x",)),
        content_type="application/x-python-serialize",
        body=pickle.dumps((("x",), {}, {})),
    ),
    "unknown task name": lambda c, p: _wellformed(c, "faults.no_such_task"),
    "no task header": lambda c, p: _without_header(_wellformed(c, p.task("size"), ("x",)), "task"),
    "no id header": lambda c, p: _without_header(_wellformed(c, p.task("size"), ("x",)), "id"),
    "protocol 1 (all in the body, no headers)": lambda c, p: _protocol1(c, p.task("size")),
    "5 MB argument": lambda c, p: _wellformed(c, p.task("size"), ("x" * BIG,)),
    "arguments that do not fit the signature": lambda c, p: _wellformed(
        c, p.task("size"), ("a", "b", "c")
    ),
    "return value not serializable (object())": lambda c, p: _wellformed(
        c, p.task("unserializable")
    ),
    "raises an exception group of unpicklable exceptions": lambda c, p: _wellformed(
        c, p.task("group")
    ),
    "sync task raises GeneratorExit": lambda c, p: _wellformed(c, "faults.generator_exit_sync"),
}
# Messages whose right answer is a stored success, not a logged error (Celery still
# accepts protocol 1).
SUCCEEDS = {"5 MB argument", "protocol 1 (all in the body, no headers)"}


def _broker_state(lane: Lane) -> str:
    """Whether the broker let go of the message (it had nothing else for this queue)."""
    broker = lane.env.broker
    end = time.monotonic() + BROKER_TIMEOUT
    while True:
        ready, unacked = broker.ready(lane.queue), broker.unacked(lane.queue)
        if ready == unacked == 0:
            return "acked/rejected"
        if time.monotonic() > end:
            return f"still held: {ready} in queue, {unacked} unacked"
        time.sleep(0.2)


def _task_state(lane: Lane, task_id: str | None, wait: bool) -> str:
    if task_id is None:
        return "-"
    end = time.monotonic() + (RESULT_TIMEOUT if wait else 0)
    while True:
        meta = result_of(lane.env.store, task_id)
        if meta is not None or time.monotonic() >= end:
            break
        time.sleep(0.1)
    delete_results(lane.env.store, [task_id])
    if meta is None:
        return "no result"
    result = meta.get("result")
    if meta.get("status") == "FAILURE" and isinstance(result, dict):
        return f"FAILURE {result.get('exc_type')}: {str(result.get('exc_message'))[:80]}"
    if meta.get("status") == "SUCCESS" and isinstance(result, int) and result > 1000:
        return f"SUCCESS ({result:,} chars)"
    return f"{meta.get('status')} {str(result)[:60]}"


def _one(lane: Lane, sentinel: Tally, index: int, label: str, build: Build) -> Detail:
    worker = lane.worker
    assert worker is not None
    raw = build(lane.env.client, lane.pool)
    started = time.monotonic()
    before = worker.log_size()
    lane.env.client.publish_raw(lane.queue, raw.body, raw.content_type, raw.headers, raw.properties)
    marker = Outgoing.new(lane.pool.task("sleep"), sentinel.key, f"s{index}", 0.0)
    lane.env.client.publish(lane.queue, [marker])
    end = time.monotonic() + HANDLED_TIMEOUT
    while not sentinel.has(f"s{index}") and worker.alive() and time.monotonic() < end:
        if RESTART_LOOP in worker.log(before):
            break  # its consumer restarts over and over: it will not get to the next task
        time.sleep(0.05)
    if GOING_DOWN in worker.log(before):
        worker.wait_exit(EXIT_TIMEOUT)  # it may run the next task while it stops
    died = not worker.alive()
    stuck = not died and not sentinel.has(f"s{index}")
    log = worker.log(before)
    errors = logscan.error_lines(log)
    # Not an error, but what Celery says of some messages it drops: shown, not counted.
    logged = errors[0] if errors else (logscan.first_warning(log) or "nothing")
    if died:
        status = f"died (exit {worker.exit_code})"
        death = logscan.last_exception(log)
        if death and death not in logged:
            logged += f" … {death}"
    elif stuck and RESTART_LOOP in log:
        status = "stopped processing (its consumer restarts in a loop)"
    elif stuck:
        status = f"stopped processing (next task not run in {HANDLED_TIMEOUT:.0f}s)"
    else:
        status = "survived"
    # Only a task the worker accepted will store a result later: wait for that one.
    accepted = raw.task_id is not None and f"[{raw.task_id}] received" in log
    state = _task_state(lane, raw.task_id, wait=accepted and not (died or stuck))
    where = _broker_state(lane) if not (died or stuck) else "left to the next worker"
    delete_results(lane.env.store, [marker.task_id])
    if died or stuck:
        if stuck:
            worker.dump_stacks()
        worker.kill()
        lane.notes.append(f"worker {status.split(' (')[0]} at message {label!r}")
        held = lane.env.broker.ready(lane.queue) + lane.env.broker.unacked(lane.queue)
        lane.env.broker.purge(lane.queue)
        where = f"{held} message(s) still held: purged by the harness" if held else "gone"
        lane.start_worker()
    if label in SUCCEEDS:
        answered = state.startswith("SUCCESS")
    else:
        answered = bool(errors) or "FAILURE" in state
    clear = answered and status == "survived"
    seconds = time.monotonic() - started
    return Detail(label, lane.pool.name, status, logged, where, state, clear, seconds)


def run(settings: Settings, description: str) -> FaultResult:
    result = FaultResult("malformed", settings.broker, description)
    with FaultEnv(settings, "malformed", settings.broker) as env:
        for pool in settings.pools:
            lane = Lane(env, pool)
            sentinel = Tally(env.store, env.key(pool.name, "sentinel"))
            try:
                lane.start_worker()
                for index, (label, build) in enumerate(MESSAGES.items()):
                    result.details.append(_one(lane, sentinel, index, label, build))
                lane.publish(lane.drain_messages(NEXT_TASKS))
                settle([lane], settings.stall)
                row = count(lane)
                died = sum(
                    1 for d in result.details if d.pool == pool.name and d.worker != "survived"
                )
                row.notes.insert(
                    0, f"{died} of {len(MESSAGES)} messages ended or stopped the worker"
                )
            except Exception as exc:  # noqa: BLE001 - reported in the row, next pool
                row = Row(pool=pool.name, sent=lane.sent, alive="?")
                row.notes.append(f"harness error: {exc!r}")
            finally:
                close([lane])
                sentinel.delete()
            row.notes.extend(lane.closing_notes)
            result.rows.append(row)
    return result
