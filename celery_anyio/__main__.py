"""``python -m celery_anyio demo``: the same as ``celery anyio demo``."""

from .cli import anyio

anyio(prog_name="python -m celery_anyio")
