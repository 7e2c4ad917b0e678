"""A real HTTP + WebSocket backend for the tests (aiohttp).

    python ws_backend.py PORT [--boot-delay S] [--marks DIR]

/ws echoes every message. Text commands: "close:CODE" closes with that code,
"crash" exits the process at once, "pid" answers the process id. The
subprotocol "chat.v2" is chosen when the client offers it.
/sse streams an event every 100 ms; when the client goes away the time is
written to DIR/sse-closed. /echo answers the method and body length (any
method), so HTTP and WebSocket requests can share one service.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

from aiohttp import WSMsgType, web

MARKS: Path | None = None


async def ws_handler(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(protocols=("chat.v2",), max_msg_size=0)
    await ws.prepare(request)
    async for message in ws:
        if message.type == WSMsgType.TEXT:
            text = message.data
            if text == "crash":
                os._exit(3)
            elif text == "pid":
                await ws.send_str(str(os.getpid()))
            elif text.startswith("close:"):
                await ws.close(code=int(text.split(":", 1)[1]), message=b"bye")
                break
            else:
                await ws.send_str(text)
        elif message.type == WSMsgType.BINARY:
            await ws.send_bytes(message.data)
    return ws


async def sse_handler(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    try:
        for tick in range(600):
            await response.write(b"data: tick %d\n\n" % tick)
            await asyncio.sleep(0.1)
    except (ConnectionError, asyncio.CancelledError):
        if MARKS is not None:
            (MARKS / "sse-closed").write_text(repr(time.time()))
        raise
    return response


async def echo_handler(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(
        {"method": request.method, "body_len": len(body), "pid": os.getpid()}
    )


def main() -> None:
    global MARKS
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--boot-delay", type=float, default=0.0)
    parser.add_argument("--marks", default=None)
    args = parser.parse_args()
    MARKS = Path(args.marks) if args.marks else None
    time.sleep(args.boot_delay)
    app = web.Application(client_max_size=1024**3)
    app.router.add_get("/ws", ws_handler)
    app.router.add_get("/sse", sse_handler)
    app.router.add_route("*", "/echo", echo_handler)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
