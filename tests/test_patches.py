"""Importing the package (as the ``celery`` command's plugin does) changes nothing of
Celery but the worker command; the rest comes with the pool, the fixture, or on request."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from celery_anyio import patches
from celery_anyio.settings import SettingError

from .harness import ROOT

PROBE = """
from celery.app.task import Task
from celery.result import AsyncResult
from celery.utils.dispatch.signal import Signal
stock = (Task.apply, Signal._live_receivers)
import celery_anyio, celery_anyio.cli
from celery.bin import worker
assert "anyio" in worker.WORKERS_POOL.choices  # the one thing the CLI needs
assert (Task.apply, Signal._live_receivers) == stock, "patched at import"
assert not hasattr(Task, "adelay") and not hasattr(AsyncResult, "aget"), "aio at import"
celery_anyio.install()
assert Task.apply is not stock[0] and Signal._live_receivers is not stock[1]
assert not hasattr(Task, "adelay")
celery_anyio.install_aio()
assert hasattr(Task, "adelay") and hasattr(AsyncResult, "aget")
print("ok")
"""


def test_import_patches_only_the_worker_command() -> None:
    env = {k: v for k, v in os.environ.items() if k != patches.DISABLE_ENV}
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.stdout.strip() == "ok", done.stderr


def test_an_unknown_patch_name_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(patches.DISABLE_ENV, "signals, stackz")
    with pytest.raises(SettingError, match=r"unknown patch name.*'stackz'"):
        patches.install()
    monkeypatch.setenv(patches.DISABLE_ENV, "signals,all")
    assert patches.disabled() == frozenset(patches.PATCHES)
    patches.check_disabled()
