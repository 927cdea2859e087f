"""Messages between the worker's main process and its task processes.

One stream socket per child; each message is a pickled tuple behind a 4-byte
length.  Pickle, because what crosses is what prefork's pipes carry: Celery's
request dicts and message bodies one way, tracer results and
``ExceptionInfo`` the other.  Both ends read whatever bytes are there and cut
them into messages with :class:`Frames`, so neither side ever blocks on a
half-received message.
"""

from __future__ import annotations

import pickle
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

_HEADER = struct.Struct("!I")
READ_SIZE = 256 * 1024


def frame(message: tuple[Any, ...]) -> bytes:
    """``message`` as bytes on the wire."""
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload)) + payload


class Frames:
    """Cuts a byte stream back into messages."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[Any, ...]]:
        """The messages ``data`` completes (it may complete none, or several)."""
        buffer = self._buffer
        buffer += data
        start = 0
        size = _HEADER.size
        while len(buffer) - start >= size:
            (length,) = _HEADER.unpack_from(buffer, start)
            end = start + size + length
            if len(buffer) < end:
                break
            message = pickle.loads(memoryview(buffer)[start + size : end])
            start = end
            yield message
        del buffer[:start]


class BlockingSender:
    """Writes messages to a blocking socket from several threads, whole.

    ``picklable(message)`` is tried when a message does not pickle (a task's
    exception that cannot be): it returns one that does.
    """

    def __init__(
        self,
        sock: socket.socket,
        picklable: Callable[[tuple[Any, ...]], tuple[Any, ...]] | None = None,
    ) -> None:
        self._sock = sock
        self._picklable = picklable
        self._lock = threading.Lock()

    def send(self, *message: Any) -> None:
        try:
            data = frame(message)
        except Exception:
            if self._picklable is None:
                raise
            data = frame(self._picklable(message))
        with self._lock:
            self._sock.sendall(data)
