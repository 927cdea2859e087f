"""celery_anyio: run ``async def`` Celery tasks on one AnyIO event loop per worker.

``celery -A proj worker -P celery_anyio:Pool --backend=trio``
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import TaskExceptionGroup, TaskExited, WrongPoolError
from .patches import install, install_aio
from .worker_lifespan import NoLifespanError, lifespan, resources

if TYPE_CHECKING:
    from .pool import Pool

__all__ = [
    "NoLifespanError",
    "Pool",
    "TaskExceptionGroup",
    "TaskExited",
    "WrongPoolError",
    "__version__",
    "install",
    "install_aio",
    "lifespan",
    "resources",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Keep `import celery_anyio` light and free of side effects: the CLI plugin
    # imports it for every `celery` command.
    if name == "Pool":
        from .pool import Pool

        return Pool
    raise AttributeError(name)
