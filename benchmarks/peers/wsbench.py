"""WebSocket echo load: CONNS connections, each sending one SIZE-byte binary
message and waiting for its echo before sending the next, for SECONDS.

    python benchmarks/peers/wsbench.py URL CONNS SIZE SECONDS

Prints one JSON object: messages (round trips), seconds, errors, and the
round-trip p50/p99 in milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import uvloop
from picows import (
    WSError,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    ws_connect,
)


class Pinger(WSListener):
    def __init__(self, payload: bytes, until: float, samples: list[float]) -> None:
        self.payload = payload
        self.until = until
        self.samples = samples
        self.count = 0
        self.sent_at = 0.0
        self.done = asyncio.get_running_loop().create_future()

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.sent_at = time.perf_counter()
        transport.send(WSMsgType.BINARY, self.payload)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type != WSMsgType.BINARY:
            return
        now = time.perf_counter()
        self.count += 1
        if self.count % 16 == 0:
            self.samples.append(now - self.sent_at)
        if now >= self.until:
            if not self.done.done():
                self.done.set_result(None)
            return
        self.sent_at = now
        transport.send(WSMsgType.BINARY, self.payload)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.done.done():
            self.done.set_result(None)


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def run(url: str, conns: int, size: int, seconds: float) -> dict:
    payload = b"x" * size
    samples: list[float] = []
    until = time.perf_counter() + seconds
    errors = 0
    listeners: list[Pinger] = []
    transports: list[WSTransport] = []
    for _ in range(conns):
        try:
            transport, listener = await ws_connect(
                lambda: Pinger(payload, until, samples), url, use_aiofastnet=False
            )
        except (OSError, asyncio.TimeoutError, WSError) as exc:
            errors += 1
            print(f"connect failed: {exc!r}", file=sys.stderr)
            continue
        listeners.append(listener)
        transports.append(transport)
    begun = time.perf_counter()
    if listeners:
        await asyncio.wait_for(
            asyncio.gather(*(listener.done for listener in listeners)),
            timeout=seconds + 30,
        )
    elapsed = time.perf_counter() - begun
    for transport in transports:
        transport.send_close()
        transport.disconnect()
    p50 = percentile(samples, 0.5)
    p99 = percentile(samples, 0.99)
    return {
        "messages": sum(listener.count for listener in listeners),
        "seconds": elapsed,
        "errors": errors,
        "connections": len(listeners),
        "p50_ms": None if p50 is None else p50 * 1000,
        "p99_ms": None if p99 is None else p99 * 1000,
    }


def main() -> None:
    url, conns, size, seconds = sys.argv[1:5]
    result = uvloop.run(run(url, int(conns), int(size), float(seconds)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
