"""Django settings of the test project: PostgreSQL, django-celery-results, Celery from env."""

from __future__ import annotations

import json
import os

SECRET_KEY = "celery-anyio-tests"
USE_TZ = True
INSTALLED_APPS = ["django_celery_results", "tests.djangoproj.notes"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("CELERY_ANYIO_TEST_PG_DB", "test"),
        "HOST": "127.0.0.1",
        "PORT": 5432,
        "USER": "postgres",
        "CONN_MAX_AGE": 0,
        # So the test can count this project's connections in pg_stat_activity.
        "OPTIONS": {"application_name": os.environ.get("CELERY_ANYIO_TEST_PG_APP", "djangoproj")},
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

CELERY_BROKER_URL = os.environ.get("CELERY_ANYIO_TEST_BROKER", "redis://127.0.0.1:6379/11")
CELERY_RESULT_BACKEND = "django-db"
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("CELERY_ANYIO_TEST_QUEUE", "celery")
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
for _name, _value in json.loads(os.environ.get("CELERY_ANYIO_TEST_CONF") or "{}").items():
    globals()[f"CELERY_{_name.upper()}"] = _value
