"""A plain byte splice on uvloop: the in-run reference for the interpreter and
event loop cost (benchmark item 8).

Every client connection gets its own backend connection and bytes are copied
both ways as they arrive, with backpressure, and without any HTTP parsing.
A proxy that does no more per request than this cannot be faster on the same
interpreter and loop.

    python benchmarks/splice.py LISTEN_PORT BACKEND_PORT
"""

from __future__ import annotations

import asyncio
import signal
import sys

import uvloop

HOST = "127.0.0.1"
WRITE_HIGH = 256 * 1024
WRITE_LOW = 64 * 1024


class Side:
    """One end of a spliced pair; ``peer`` is the other end."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
        self.pending: list[bytes] = []
        self.eof = False
        self.closed = False

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.pending.append(data)
            self.transport.pause_reading()
            return
        peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None or peer.closed:
            return False
        if peer.transport is None:
            # Not connected yet: the connect step forwards the half-close.
            return True
        if peer.eof:
            peer.transport.close()
            return False
        peer.transport.write_eof()
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.closed:
            peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class Client(Side):
    """The accepted side: connects its backend side on arrival."""

    def __init__(self, loop: asyncio.AbstractEventLoop, backend_port: int) -> None:
        super().__init__()
        self.loop = loop
        self.backend_port = backend_port

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self.loop.create_task(self._connect())

    async def _connect(self) -> None:
        backend = Side()
        backend.peer = self
        self.peer = backend
        try:
            await self.loop.create_connection(lambda: backend, HOST, self.backend_port)
        except OSError:
            self.transport.close()
            return
        if self.closed:
            backend.transport.close()
            return
        if self.pending:
            backend.transport.write(b"".join(self.pending))
            self.pending = []
            self.transport.resume_reading()
        if self.eof:
            backend.transport.write_eof()


async def serve(listen_port: int, backend_port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = await loop.create_server(
        lambda: Client(loop, backend_port),
        HOST,
        listen_port,
        reuse_address=True,
        backlog=4096,
    )
    await stop.wait()
    server.close()


def main() -> None:
    listen_port, backend_port = int(sys.argv[1]), int(sys.argv[2])
    uvloop.run(serve(listen_port, backend_port))


if __name__ == "__main__":
    main()
