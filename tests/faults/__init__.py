"""Fault injection for celery_anyio workers, against brokers the harness starts itself.

``python -m tests.faults`` (or ``nox -s faults``) drains batches of ``acks_late``
tasks on each pool while a broker restarts, its connections are cut, the worker
is killed or signalled, receives hostile messages, blocks its loop or soaks up
100,000 tasks, and prints what ran, what was lost and what ran twice. See
docs/reliability.md. No file here is named ``test_*.py``: pytest never collects it.
"""
