"""WebSocket echo backend (picows): every data frame is sent back as is.

python benchmarks/peers/wsecho.py PORT
"""

from __future__ import annotations

import asyncio
import signal
import sys

import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server


class Echo(WSListener):
    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()
            return
        if frame.msg_type in (WSMsgType.BINARY, WSMsgType.TEXT):
            transport.send(frame.msg_type, frame.get_payload_as_bytes())


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = await ws_create_server(
        lambda request: Echo(), "127.0.0.1", port, use_aiofastnet=False
    )
    await stop.wait()
    server.close()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1])))
