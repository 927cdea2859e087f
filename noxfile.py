"""Sessions: `nox -s ci lint typecheck build docs` (what .ci/run runs), `nox -s tests`
(the full matrix), `nox -s bench`, `nox -s profile`, `nox -s faults`, `nox -s coverage`."""

from __future__ import annotations

import nox

nox.options.error_on_missing_interpreters = True
nox.options.sessions = ["ci", "lint", "typecheck", "build", "docs"]

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
# The worker tests mostly wait on real workers and brokers: two pytest processes (one
# file each at a time, so a file's shared workers start once per process) halve CI.
PARALLEL = ["-n", "2", "--dist", "loadfile"]
# The benchmark harness (psutil, redis), the gevent pool it compares against, and
# the other task queues it runs as references on the same Redis (taskiq, saq).
BENCH_DEPS = [
    "celery[redis]",
    "gevent>=24.2",
    "psutil>=5.9",
    "redis>=4.5",
    "taskiq>=0.11",
    "taskiq-redis>=1.0",
    "saq>=0.24",
]


def _install(session: nox.Session, celery: str | None = None) -> None:
    session.install("-e", ".", *nox.project.dependency_groups(nox.project.load_toml(), "test"))
    if celery:
        session.install(*CELERY[celery])


def _pytest(session: nox.Session, *args: str) -> None:
    session.run("python", "-m", "pytest", "--durations=10", *args, *session.posargs)


@nox.session(python=CI_PYTHON)
def ci(session: nox.Session) -> None:
    """What CI runs, newest Celery: the suite on both backends and both brokers with
    ``--processes 1``, and the worker tests again with ``--processes 2`` on Redis
    (``nox -s tests`` runs both counts on both brokers)."""
    _install(session)
    _pytest(session, *PARALLEL, "--processes", "1")
    _pytest(session, *PARALLEL, "-m", "worker", "--processes", "2", "--broker", "redis")


@nox.session(python=PYTHONS)
@nox.parametrize("celery", list(CELERY))
@nox.parametrize("backend", BACKENDS)
def tests(session: nox.Session, celery: str, backend: str) -> None:
    """Full matrix: Python x Celery x backend; each run covers Redis and RabbitMQ."""
    _install(session, celery)
    session.env["CELERY_ANYIO_BACKENDS"] = backend
    _pytest(session, *PARALLEL)


@nox.session(python=CI_PYTHON)
def build(session: nox.Session) -> None:
    """Build the sdist and wheel, check them, and run the demo from the wheel alone."""
    session.install("build>=1.2", "twine>=5")
    import os

    tmp = os.path.abspath(session.create_tmp())
    dist = f"{tmp}/dist"
    session.run("python", "-m", "build", "--outdir", dist)
    session.run("twine", "check", "--strict", *_files(dist))
    # A clean virtualenv with the wheel and what it depends on, nothing from here.
    venv = f"{tmp}/wheel-venv"
    session.run("python", "-m", "venv", venv)
    (wheel,) = (path for path in _files(dist) if path.endswith(".whl"))
    session.run(f"{venv}/bin/python", "-m", "pip", "install", "-q", wheel, external=True)
    session.chdir(tmp)  # away from the source tree
    session.run(
        f"{venv}/bin/celery", "anyio", "demo", "--backend", "trio", "--tasks", "200",
        "--sleep", "0.1", external=True,
    )  # fmt: skip


def _files(folder: str) -> list[str]:
    import os

    return sorted(os.path.join(folder, name) for name in os.listdir(folder))


@nox.session(python=CI_PYTHON)
def docs(session: nox.Session) -> None:
    """The documentation site (mkdocs, Material), built with --strict."""
    session.install("-e", ".", *nox.project.dependency_groups(nox.project.load_toml(), "docs"))
    session.env["NO_MKDOCS_2_WARNING"] = "1"
    session.run("mkdocs", "build", "--strict", "--site-dir", session.create_tmp() + "/site")


@nox.session(python=CI_PYTHON)
def lint(session: nox.Session) -> None:
    """ruff, ruff format and codespell: what the pre-commit hooks run (mypy: typecheck)."""
    session.install(*nox.project.dependency_groups(nox.project.load_toml(), "lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("codespell", "--toml", "pyproject.toml")


@nox.session(python=CI_PYTHON)
def coverage(session: nox.Session) -> None:
    """The suite under coverage, the worker subprocesses and task processes included."""
    _install(session)
    session.install("coverage[toml]>=7.10")
    session.run("coverage", "erase")
    session.run(
        "coverage", "run", "-m", "pytest", "--processes", "1", "--processes", "2",
        *session.posargs,
    )  # fmt: skip
    session.run("coverage", "combine")
    session.run("coverage", "report")


@nox.session(python=CI_PYTHON)
def typecheck(session: nox.Session) -> None:
    _install(session)
    session.install(*nox.project.dependency_groups(nox.project.load_toml(), "typecheck"))
    session.run("mypy")


@nox.session(python=CI_PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks against Celery's own pools (see docs/benchmarks.md).

    ``nox -s bench`` runs the full profile on Redis, writes every figure to
    benchmarks/results/bench.json (or ``-- --out PATH``) and prints the tables; ``-- --quick`` is a smoke test, ``-- --profile processes``
    only the ``--processes`` cases, ``-- --broker rabbitmq`` the same on RabbitMQ.
    """
    session.install("-e", ".[uvloop]", *BENCH_DEPS)
    args = list(session.posargs)
    out = args[args.index("--out") + 1] if "--out" in args else "benchmarks/results/bench.json"
    session.run("python", "-m", "benchmarks.run", "--out", out, *args)
    session.run("python", "-m", "benchmarks.render", out)


@nox.session(python=CI_PYTHON)
def profile(session: nox.Session) -> None:
    """Where each pool's worker CPU goes per task, by process, thread and package (py-spy).

    ``nox -s profile`` drains 5,000 noop tasks per pool on Redis (celery_anyio with
    and without ``--processes 2``, threads); ``-- --workload io``,
    ``-- --pools anyio-trio,threads``, ``-- -n 10000``.
    """
    session.install("-e", ".", *BENCH_DEPS, "py-spy>=0.3.14")
    session.run("python", "-m", "benchmarks.profile", *session.posargs)


@nox.session(python=CI_PYTHON)
def faults(session: nox.Session) -> None:
    """Fault injection against private brokers (see docs/reliability.md). ``-- --faults kill9-late``.

    ``nox -s faults`` runs every fault, the 100,000-task soak included; ``-- --quick``
    is a smoke test (500 tasks, four faults); ``-- --list`` names the faults.
    """
    _install(session)
    # py-spy dumps the stacks of a worker that stopped draining.
    session.install("py-spy>=0.3.14")
    session.run("python", "-m", "tests.faults", *session.posargs)
