"""Django on PostgreSQL with django-celery-results: connections per task, not per worker.

A database of its own per test run; the worker is the stock CLI on the project's
Celery app (``-A tests.djangoproj``). Connections are counted in PostgreSQL's
``pg_stat_activity`` by the project's ``application_name``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import psutil
import psycopg
import pytest

from .harness import ROOT, Namespace, PoolBackend, Worker, pool_args

pytestmark = pytest.mark.worker

ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
APP = "tests.djangoproj"


@pytest.fixture(scope="session")
def database(run_id: str) -> Iterator[str]:
    name = f"celery_anyio_{run_id}"
    with psycopg.connect(ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
    env = dict(os.environ, DJANGO_SETTINGS_MODULE=f"{APP}.settings", CELERY_ANYIO_TEST_PG_DB=name)
    subprocess.run(
        [sys.executable, "-m", "django", "migrate", "-v", "0"], cwd=ROOT, env=env, check=True
    )
    yield name
    with psycopg.connect(ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _sessions(database: str, app_name: str) -> list[int]:
    with psycopg.connect(ADMIN, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
            (database, app_name),
        ).fetchall()
    return [int(pid) for (pid,) in rows]


def _describe(database: str, pid: int) -> str:
    """A session left open, with what it last ran: which code path opened it."""
    with psycopg.connect(ADMIN, autocommit=True) as admin:
        row = admin.execute(
            "SELECT client_port, state, backend_start, state_change, left(query, 200)"
            " FROM pg_stat_activity WHERE datname = %s AND pid = %s",
            (database, pid),
        ).fetchone()
    if row is None:
        return f"session {pid}: gone"
    owner = next(
        (
            f"process {c.pid} (child of {psutil.Process(c.pid).ppid()})"
            for c in psutil.net_connections("tcp")
            if c.laddr and c.laddr.port == row[0] and c.pid
        ),
        "an unknown process",
    )
    return f"session {pid} of {owner}: {row[1:]}"


def _terminate(database: str, app_name: str) -> None:
    with psycopg.connect(ADMIN, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND application_name = %s",
            (database, app_name),
        )


def _stored(database: str, task_ids: list[str], timeout: float = 60) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        with psycopg.connect(f"host=127.0.0.1 user=postgres dbname={database}") as conn:
            rows = conn.execute(
                "SELECT task_id, status FROM django_celery_results_taskresult"
                " WHERE task_id = ANY(%s)",
                (task_ids,),
            ).fetchall()
        if len(rows) == len(task_ids) or time.monotonic() > deadline:
            return dict(rows)
        time.sleep(0.2)


class Project:
    def __init__(self, namespace: Namespace, database: str, app_name: str, worker: Worker):
        self.database, self.app_name, self.worker = database, app_name, worker
        self.client = namespace.client(worker.queue)

    def send(self, task: str, *args: Any) -> str:
        return str(self.client.app.send_task(f"{APP}.notes.tasks.{task}", args=args).id)

    def settle(self, timeout: float = 30) -> list[str]:
        """Wait until the worker holds no database session; describe what is left."""
        deadline = time.monotonic() + timeout
        while (left := _sessions(self.database, self.app_name)) and time.monotonic() < deadline:
            time.sleep(0.2)
        return [_describe(self.database, pid) for pid in left]


def _worker(
    namespace: Namespace, database: str, backend: str, app_name: str, conf: dict[str, Any] | None
) -> Worker:
    os.environ.update(CELERY_ANYIO_TEST_PG_DB=database, CELERY_ANYIO_TEST_PG_APP=app_name)
    queue = namespace.queue(f"django-{app_name}")
    args = [*pool_args(backend), "-c", "50"]
    return Worker(namespace, queue, args, conf=conf, app_module=APP)


@pytest.fixture
def project(
    namespace: Namespace, database: str, pool_backend: PoolBackend, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Project]:
    app_name = f"worker-{pool_backend.tag}-{time.monotonic_ns()}"
    monkeypatch.setenv("CELERY_ANYIO_TEST_PG_APP", app_name)
    with _worker(namespace, database, pool_backend, app_name, None) as worker:
        project = Project(namespace, database, app_name, worker)
        try:
            yield project
        finally:
            project.client.close()


@pytest.mark.parametrize("broker", ["redis"], scope="session")
@pytest.mark.parametrize("task", ["add_note", "add_note_in_thread", "add_note_sync"])
def test_each_task_closes_its_connections(
    project: Project, pool_backend: PoolBackend, task: str
) -> None:
    if task == "add_note" and pool_backend == "trio":
        pytest.skip("Django's async ORM needs asyncio (docs/django.md)")
    extra = () if task == "add_note_sync" else (0.01,)
    ids = [project.send(task, f"note {i}", *extra) for i in range(100)]
    assert set(_stored(project.database, ids).values()) == {"SUCCESS"}
    assert project.settle() == []  # CONN_MAX_AGE = 0: nothing is kept open
    # A connection that goes bad is replaced: kill every session, then go on.
    _terminate(project.database, project.app_name)
    more = [project.send(task, f"after {i}", *extra) for i in range(20)]
    assert set(_stored(project.database, more).values()) == {"SUCCESS"}
    assert "InterfaceError" not in project.worker.log()
    assert "connection already closed" not in project.worker.log()


@pytest.mark.parametrize("broker", ["redis"], scope="session")
def test_results_on_the_loop_with_django_db_are_refused(
    namespace: Namespace, database: str, pool_backend: PoolBackend
) -> None:
    app_name = f"refused-{pool_backend.tag}-{time.monotonic_ns()}"
    worker = _worker(
        namespace, database, pool_backend, app_name, {"worker_anyio_result_threads": 0}
    )
    try:
        with pytest.raises(RuntimeError, match="worker exited"):
            worker.start()
    finally:
        worker.stop()  # a worker that came up after all must not outlive the test
    assert "worker_anyio_result_threads = 0 stores async tasks' results" in worker.log()


@pytest.mark.parametrize("broker", ["redis"], scope="session")
def test_trio_with_django_warns_at_start(project: Project, pool_backend: PoolBackend) -> None:
    warned = "Django is set up and the backend is trio" in project.worker.log()
    assert warned == (pool_backend == "trio")
