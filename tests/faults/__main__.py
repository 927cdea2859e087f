"""``python -m tests.faults``: see :mod:`tests.faults.cli`."""

from .cli import main

raise SystemExit(main())
