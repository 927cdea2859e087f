"""The ``celery.commands`` entry point: loaded by every ``celery`` command.

Importing it patches ``celery worker`` (``-P module:Class``, ``--backend``) and
makes ``async def`` tasks fail loudly under any other pool.  It also adds
``celery anyio demo``.  Keep it light: it runs for every ``celery`` invocation.
"""

from __future__ import annotations

from typing import Any

import click
from celery import signals

from . import patches
from ._backends import BACKENDS

patches.patch_worker_cli(BACKENDS)


@signals.worker_init.connect(weak=False)
def _wrap_tasks_in_any_worker(sender: Any = None, **_: Any) -> None:
    """Under prefork/threads/solo too, so an async task fails instead of no-op."""
    app = getattr(sender, "app", None)
    if app is not None:
        patches.wrap_async_tasks(app)


@click.group(name="anyio")
def anyio() -> None:
    """celery_anyio: async tasks on an AnyIO event loop."""


@anyio.command()
@click.option("--backend", type=click.Choice(BACKENDS), default="asyncio", show_default=True)
@click.option("--tasks", "count", type=int, default=1000, show_default=True)
@click.option("--concurrency", type=int, default=500, show_default=True)
@click.option("--sleep", type=float, default=0.2, show_default=True)
@click.option("--broker", default=None, help="Broker URL (default: a temporary filesystem broker).")
def demo(backend: str, count: int, concurrency: int, sleep: float, broker: str | None) -> None:
    """Start a real worker on this pool and push a batch of async tasks through it."""
    from .demo import run_demo

    raise SystemExit(run_demo(backend, count, concurrency, sleep, broker))
