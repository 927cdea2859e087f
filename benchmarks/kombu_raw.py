"""The ceiling for any pool: one raw kombu consumer draining a queue, acking each message.

``python -m benchmarks.kombu_raw --broker-url redis://127.0.0.1:6379/14 -n 5000``
prints a JSON object: ``{"n": ..., "seconds": ..., "rate": ...}``.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from typing import Any

from kombu import Connection, Consumer, Exchange, Message, Producer, Queue

DEFAULT_BROKER = "redis://127.0.0.1:6379/14"


def measure(broker_url: str, n: int, prefetch: int = 100, queue_name: str | None = None) -> float:
    """Pre-load ``n`` small messages, then time one consumer draining them."""
    name = queue_name or f"bench-kombu-raw-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, "direct"), routing_key=name)
    with Connection(broker_url) as conn:
        channel: Any = conn.channel()
        bound = queue(channel)
        bound.declare()
        bound.purge()
        try:
            producer = Producer(channel, exchange=queue.exchange, routing_key=name)
            for i in range(n):
                producer.publish({"i": i}, serializer="json")
            return _drain(conn, queue, n, prefetch)
        finally:
            bound.delete()
            channel.close()


def _drain(conn: Connection, queue: Queue, n: int, prefetch: int) -> float:
    received = 0

    def on_message(_body: Any, message: Message) -> None:
        nonlocal received
        message.ack()
        received += 1

    channel: Any = conn.channel()
    consumer = Consumer(
        channel, queues=[queue], callbacks=[on_message], accept=["json"], no_ack=False
    )
    consumer.qos(prefetch_count=prefetch)
    start = time.perf_counter()
    with consumer:
        while received < n:
            try:
                conn.drain_events(timeout=30)
            except TimeoutError as exc:
                raise RuntimeError(f"kombu raw: only {received}/{n} messages after 30s") from exc
    elapsed = time.perf_counter() - start
    channel.close()
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--broker-url", default=DEFAULT_BROKER)
    parser.add_argument("-n", type=int, default=5000)
    parser.add_argument("--prefetch", type=int, default=100)
    parser.add_argument("--queue", default=None)
    args = parser.parse_args(argv)
    seconds = measure(args.broker_url, args.n, args.prefetch, args.queue)
    print(json.dumps({"n": args.n, "seconds": seconds, "rate": args.n / seconds}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
