"""The pytest plugin, as a user's own test suite sees it: in a pytest subprocess.

Each test copies a small suite into ``pytester``'s folder and runs it with
``runpytest_subprocess``, so the plugin is loaded through its ``pytest11``
entry point and Celery's global state starts fresh, like in a user's project.
"""

from __future__ import annotations

import re
import shutil
import uuid
from importlib.metadata import entry_points
from urllib.parse import urlparse

import pytest
from celery import Celery

from celery_anyio.pytest_plugin import WorkerStartError, start_anyio_worker

from .harness import ROOT, Namespace

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.worker

EXAMPLE = ROOT / "docs" / "examples" / "test_with_celery_anyio.py"
EXAMPLE_TESTS = (
    "test_async_task",
    "test_sync_task",
    "test_runs_on_the_backend_of_the_test",
    "test_group_of_async_tasks",
)
BACKENDS = ("asyncio", "trio")
RUN_TIMEOUT = 180.0
# What a user's strict suite would turn into errors: a coroutine never awaited,
# an exception escaping the worker's threads or a finalizer.
INI = """
[pytest]
filterwarnings =
    error::RuntimeWarning
    error::pytest.PytestUnhandledThreadExceptionWarning
    error::pytest.PytestUnraisableExceptionWarning
"""


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A folder for a user's suite, with no broker settings leaking in from outside."""
    for name in ("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    pytester.makeini(INI)
    return pytester


def run(suite: pytest.Pytester, *args: str, timeout: float = RUN_TIMEOUT) -> pytest.RunResult:
    # -vv: --durations=0 lists even the phases under 5 ms.
    return suite.runpytest_subprocess(
        "-vv", "-p", "no:cacheprovider", "--durations=0", *args, timeout=timeout
    )


def copy_example(suite: pytest.Pytester) -> None:
    shutil.copy(EXAMPLE, suite.path / EXAMPLE.name)


def assert_passed_on_both_backends(result: pytest.RunResult, tests: tuple[str, ...]) -> None:
    result.assert_outcomes(passed=len(tests) * len(BACKENDS))
    for test in tests:
        for backend in BACKENDS:
            result.stdout.fnmatch_lines([f"*::{test}[[]{backend}[]] PASSED*"])


def phase_seconds(result: pytest.RunResult, phase: str, test: str) -> float:
    """How long ``--durations=0`` says ``phase`` of ``test`` took."""
    pattern = re.compile(rf"^([\d.]+)s {phase}\s+\S+::{re.escape(test)}$")
    for line in result.stdout.lines:
        match = pattern.match(line.strip())
        if match:
            return float(match.group(1))
    raise AssertionError(f"no {phase} duration for {test} in:\n{result.stdout.str()}")


def test_plugin_is_registered_for_pytest() -> None:
    plugins = {ep.name: ep.value for ep in entry_points(group="pytest11")}
    assert plugins.get("celery_anyio") == "celery_anyio.pytest_plugin"


def test_eager_app_is_refused_before_any_worker_starts() -> None:
    """With task_always_eager, .delay() never reaches the worker: tests would prove nothing."""
    app = Celery("eager", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.task_always_eager = True
    with (
        pytest.raises(WorkerStartError, match="task_always_eager"),
        start_anyio_worker(app),
    ):
        pytest.fail("started")


def test_example_passes_on_both_backends_in_memory(suite: pytest.Pytester) -> None:
    copy_example(suite)
    result = run(suite)
    assert_passed_on_both_backends(result, EXAMPLE_TESTS)


REAL_BROKER_CONFTEST = """
import pytest


@pytest.fixture(autouse=True)
def _this_runs_queue(celery_app):
    # Concurrent runs share the broker: keep our messages to ourselves.
    celery_app.conf.task_default_queue = {queue!r}
    celery_app.conf.result_expires = 600


@pytest.fixture
def celery_anyio_worker(celery_anyio_worker):
    # The example's memory:// and cache+memory:// gave way to the environment's.
    assert celery_anyio_worker.consumer.connection.transport_cls == {transport!r}
    assert type(celery_anyio_worker.app.backend).__name__ == "RedisBackend"
    return celery_anyio_worker
"""


def test_example_passes_on_both_backends_on_a_real_broker(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, namespace: Namespace
) -> None:
    monkeypatch.setenv("CELERY_BROKER_URL", namespace.broker_url)
    monkeypatch.setenv("CELERY_RESULT_BACKEND", namespace.results_url)
    queue = namespace.queue(f"pytest-plugin-{uuid.uuid4().hex[:8]}")
    transport = urlparse(namespace.broker_url).scheme
    suite.makeconftest(REAL_BROKER_CONFTEST.format(queue=queue, transport=transport))
    copy_example(suite)
    result = run(suite)
    assert_passed_on_both_backends(result, EXAMPLE_TESTS)


def test_unknown_backend_is_a_clear_setup_error(suite: pytest.Pytester) -> None:
    suite.makeconftest(
        """
        import pytest

        @pytest.fixture
        def celery_anyio_backend():
            return "curio"
        """
    )
    copy_example(suite)
    result = run(suite, timeout=60)
    result.assert_outcomes(errors=len(EXAMPLE_TESTS))
    error = (
        "*WorkerStartError: the celery_anyio worker for app 'example' on 'curio' "
        "(broker memory:///) did not start: "
        "SettingError(\"worker_anyio_backend: unknown AnyIO backend 'curio': "
        'choose one of asyncio, trio")'
    )
    result.stdout.fnmatch_lines([error])


def test_pool_failing_in_the_worker_thread_is_an_error_not_a_hang(
    suite: pytest.Pytester,
) -> None:
    """Celery's start_worker alone waits forever for a worker whose pool failed."""
    suite.makeconftest(
        """
        import pytest

        async def unreachable(app):
            raise ConnectionError("database unreachable")
            yield

        @pytest.fixture(autouse=True)
        def _failing_lifespan(celery_app):
            celery_app.conf.worker_anyio_lifespan = unreachable
            yield
            celery_app.conf.worker_anyio_lifespan = None

        @pytest.fixture
        def celery_anyio_backend():
            return "asyncio"
        """
    )
    copy_example(suite)
    result = run(suite, "-k", "test_async_task", timeout=60)
    result.assert_outcomes(errors=1)
    error = (
        "*WorkerStartError: the celery_anyio worker for app 'example' on 'asyncio' "
        "* did not start: RuntimeError(*the asyncio event loop failed to start: "
        "RuntimeError(*the worker lifespan failed to start: *database unreachable*"
    )
    result.stdout.fnmatch_lines([error])
    assert phase_seconds(result, "setup", "test_async_task") < 10


CUSTOM_CONFTEST = """
pytest_plugins = ["celery.contrib.pytest"]

import pytest


@pytest.fixture
def celery_anyio_backend():
    return "trio"


@pytest.fixture(scope="session")
def celery_anyio_worker_parameters():
    return {"concurrency": 3, "shutdown_timeout": 8}
"""

# celery.contrib.pytest's own app: a fresh TestApp per test, with shared tasks.
CONTRIB_TESTS = """
import threading

import anyio
import sniffio
from celery import shared_task

started = threading.Event()


@shared_task
async def event_loop_name():
    await anyio.sleep(0)
    return sniffio.current_async_library()


@shared_task
async def sleep_forever():
    started.set()
    await anyio.sleep_forever()


def test_pinned_backend_and_parameters(celery_anyio_worker):
    assert event_loop_name.delay().get(timeout=10) == "trio"
    assert celery_anyio_worker.pool.limit == 3


def test_task_defined_after_the_start_runs_after_reload(celery_app, celery_anyio_worker):
    @celery_app.task
    async def double(x):
        await anyio.sleep(0)
        return 2 * x

    celery_anyio_worker.reload()
    assert double.delay(21).get(timeout=10) == 42


def test_task_still_running_is_cancelled_at_teardown(celery_anyio_worker):
    sleep_forever.delay()
    assert started.wait(10)
"""

# The user's own app next to celery.contrib.pytest: the worker leaves it as it was.
OWN_APP_TESTS = """
import logging
import sys

import pytest
from celery import Celery, _state

app = Celery("own", broker="memory://", backend="cache+memory://", set_as_current=False)


@app.task
async def add(x, y):
    return x + y


@pytest.fixture
def celery_app():
    return app


def test_own_app(celery_anyio_worker):
    assert add.delay(1, 2).get(timeout=10) == 3
    assert celery_anyio_worker.app is app
    assert app.conf.worker_anyio_backend == "trio"
    assert app.conf.worker_hijack_root_logger is False
    assert app.conf.broker_transport_options == {"polling_interval": 0.01}


def test_settings_and_current_app_are_restored():
    assert app.conf.worker_anyio_backend is None
    assert app.conf.worker_hijack_root_logger is True
    assert app.conf.broker_transport_options == {}
    assert _state.default_app is not app
    assert _state.get_current_app() is not app
    root = logging.getLogger()
    assert root.level == logging.WARNING
    assert not [h for h in root.handlers if getattr(h, "stream", None) is sys.__stderr__]
"""


def test_with_celery_contrib_pytest_a_pinned_backend_and_parameters(
    suite: pytest.Pytester,
) -> None:
    suite.makeconftest(CUSTOM_CONFTEST)
    suite.makepyfile(test_contrib=CONTRIB_TESTS, test_own_app=OWN_APP_TESTS)
    result = run(suite)
    result.assert_outcomes(passed=5)
    # Pinned: one run per test, no [asyncio]/[trio] ids.
    result.stdout.fnmatch_lines(["*::test_pinned_backend_and_parameters PASSED*"])
    # Cancelled at once: not after the 8 s shutdown_timeout, nor after the 2 s
    # polls of Celery's loop for memory:// that a stop flag alone waits for.
    assert phase_seconds(result, "teardown", "test_task_still_running_is_cancelled_at_teardown") < 2
