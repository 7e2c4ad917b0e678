"""Upload sink: reads a request body of Content-Length bytes, then answers.

The answer is sent only after the last body byte arrived, so the client's
time to the answer is the time the whole upload took through the proxy.

    python benchmarks/peers/sink.py PORT
"""

from __future__ import annotations

import asyncio
import signal
import sys

import uvloop


class Sink:
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.remaining = -1
        self.received = 0

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.remaining < 0:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            self.remaining = self._length(self.head[:end])
            data = self.head[end + 4 :]
            self.head = b""
            self.received = 0
        taken = min(len(data), self.remaining)
        self.remaining -= taken
        self.received += taken
        if self.remaining == 0:
            body = b"received %d\n" % self.received
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            self.remaining = -1
            rest = data[taken:]
            if rest:
                self.data_received(rest)

    @staticmethod
    def _length(head: bytes) -> int:
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                return int(value)
        return 0

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = await loop.create_server(Sink, "127.0.0.1", port, reuse_address=True)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1])))
