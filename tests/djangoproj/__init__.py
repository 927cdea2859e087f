"""A small Django project on PostgreSQL whose Celery app runs on this pool (tests/test_django.py)."""

from .celery import app

__all__ = ["app"]
