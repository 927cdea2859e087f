"""Sessions: `nox -s ci` (what .ci/run runs), `nox -s tests` (the full matrix),
`nox -s lint`, `nox -s typecheck`, `nox -s bench`."""

from __future__ import annotations

import nox

nox.options.error_on_missing_interpreters = True
nox.options.sessions = ["ci", "lint", "typecheck"]

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
CELERY = {
    # redis-py 5.3.0 added a non-reentrant lock around PubSub commands. Celery 5.3's
    # Redis result consumer unsubscribes from AsyncResult.__del__, which the garbage
    # collector can run inside the client's own SUBSCRIBE (send_task -> on_task_call):
    # the nested UNSUBSCRIBE then waits forever for the lock its own thread holds
    # (celery/celery#10477; Celery 5.7 serializes pub/sub access itself). Celery 5.3
    # was released against redis-py < 5.3, so test it with that.
    "5.3": ["celery[redis]>=5.3,<5.4", "kombu>=5.3,<5.4", "redis<5.3"],
    "5.7": ["celery[redis]>=5.7,<5.8", "kombu>=5.7,<5.8"],
}
BACKENDS = ["asyncio", "trio"]
CI_PYTHON = "3.11"
# The benchmark harness (psutil, redis) and the gevent pool it compares against.
BENCH_DEPS = ["celery[redis]", "gevent>=24.2", "psutil>=5.9", "redis>=4.5"]


def _install(session: nox.Session, celery: str | None = None) -> None:
    session.install("-e", ".", *nox.project.dependency_groups(nox.project.load_toml(), "test"))
    if celery:
        session.install(*CELERY[celery])


def _pytest(session: nox.Session, *args: str) -> None:
    session.run("python", "-m", "pytest", "--durations=10", *args, *session.posargs)


@nox.session(python=CI_PYTHON)
def ci(session: nox.Session) -> None:
    """The suite on both backends and both brokers, newest Celery: what CI runs."""
    _install(session)
    _pytest(session)


@nox.session(python=PYTHONS)
@nox.parametrize("celery", list(CELERY))
@nox.parametrize("backend", BACKENDS)
def tests(session: nox.Session, celery: str, backend: str) -> None:
    """Full matrix: Python x Celery x backend; each run covers Redis and RabbitMQ."""
    _install(session, celery)
    session.env["CELERY_ANYIO_BACKENDS"] = backend
    _pytest(session)


@nox.session(python=CI_PYTHON)
def lint(session: nox.Session) -> None:
    session.install(*nox.project.dependency_groups(nox.project.load_toml(), "lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=CI_PYTHON)
def typecheck(session: nox.Session) -> None:
    _install(session)
    session.install(*nox.project.dependency_groups(nox.project.load_toml(), "typecheck"))
    session.run("mypy")


@nox.session(python=CI_PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks against Celery's own pools (see docs/benchmarks.md).

    ``nox -s bench`` is the full profile on Redis (~45 min on 2 cores);
    ``-- --quick`` a smoke test, ``-- --broker rabbitmq`` the same on RabbitMQ.
    """
    session.install("-e", ".[uvloop]", *BENCH_DEPS)
    session.run("python", "benchmarks/run.py", *session.posargs)


@nox.session(python=CI_PYTHON)
def profile(session: nox.Session) -> None:
    """Where each pool's worker CPU goes per task, by thread and package (py-spy).

    ``nox -s profile`` drains 5,000 noop tasks per pool on Redis;
    ``-- --workload io``, ``-- --pools anyio-trio,threads``, ``-- -n 10000``.
    """
    session.install("-e", ".", *BENCH_DEPS, "py-spy>=0.3.14")
    session.run("python", "-m", "benchmarks.profile", *session.posargs)
