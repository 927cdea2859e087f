"""A TCP proxy that cuts every connection and refuses new ones on demand.

Runs as its own process (``python -m tests.faults.proxy --listen P --target T``) so
its pumping never competes with the harness for a GIL: SIGUSR1 cuts (aborts every
connection, stops listening), SIGUSR2 restores (listens again on the same port).
It reports each state change on stdout, which :class:`Proxy` waits for.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine
from pathlib import Path

from .procs import free_port, kill_group, owner_env

ROOT = Path(__file__).resolve().parents[2]


async def serve(listen: int, target: int) -> None:
    loop = asyncio.get_running_loop()
    open_writers: set[asyncio.StreamWriter] = set()
    stopped = asyncio.Event()

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.transport.abort()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            writer.transport.abort()
            return
        pair = {writer, up_writer}
        open_writers.update(pair)
        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        open_writers.difference_update(pair)

    async def listen_again() -> asyncio.Server:
        return await asyncio.start_server(accept, "127.0.0.1", listen, reuse_address=True)

    server: asyncio.Server | None = await listen_again()

    def say(state: str) -> None:
        print(state, flush=True)

    async def cut() -> None:
        nonlocal server
        if server is not None:
            server.close()
            server = None
        for writer in list(open_writers):
            writer.transport.abort()
        open_writers.clear()
        say("cut")

    async def restore() -> None:
        nonlocal server
        if server is None:
            server = await listen_again()
        say("restored")

    tasks: set[asyncio.Task[None]] = set()

    def spawn(coro: Coroutine[object, object, None]) -> None:
        task = loop.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGUSR1, lambda: spawn(cut()))
    loop.add_signal_handler(signal.SIGUSR2, lambda: spawn(restore()))
    loop.add_signal_handler(signal.SIGTERM, stopped.set)
    say("listening")
    await stopped.wait()


class Proxy:
    """The harness's handle on a proxy process in front of ``target``."""

    def __init__(self, run_id: str, target: int) -> None:
        self.run_id = run_id
        self.target = target
        self.port = free_port()
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.proxy", "--listen", str(self.port),
             "--target", str(self.target)],
            cwd=ROOT,
            env={**os.environ, **owner_env(self.run_id)},
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )  # fmt: skip
        self._expect("listening")

    def cut(self) -> float:
        """Drop every connection and refuse new ones; returns when that was done."""
        return self._command(signal.SIGUSR1, "cut")

    def restore(self) -> float:
        return self._command(signal.SIGUSR2, "restored")

    def _command(self, sig: int, state: str) -> float:
        assert self.process is not None
        self.process.send_signal(sig)
        self._expect(state)
        return time.time()

    def _expect(self, state: str, timeout: float = 30) -> None:
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self.process.stdout], [], [], left)
            if readable:
                line = self.process.stdout.readline()
                if not line:
                    raise RuntimeError(f"proxy exited with {self.process.poll()}")
                if line.strip() == state:
                    return
        raise TimeoutError(f"proxy did not report {state!r} in {timeout}s")

    def close(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                kill_group(self.process)
        if self.process.stdout is not None:
            self.process.stdout.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--target", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.listen, args.target))


if __name__ == "__main__":
    main()
