"""WebSocket tunnels and long-lived connections through the gateway.

Real clients (websockets, picows, raw sockets) and a real aiohttp backend
(tests/support/ws_backend.py) started on demand by the gateway.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hashlib
import json
import os
import socket
import time
from pathlib import Path

import pytest
from conftest import PYTHON, pid_alive, port_open, wait_for
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

WS_BACKEND = Path(__file__).resolve().parent / "support" / "ws_backend.py"


@pytest.fixture
def ws_service(gateway, ports, tmp_path):
    """A gateway with one on-demand WebSocket service: host `ws.test`, a
    dedicated port, and a per-route upstream port."""
    backend = ports()
    dedicated = ports()
    starts = tmp_path / "starts.log"
    command = (
        f"echo start >> {starts}; "
        f"exec {PYTHON} {WS_BACKEND} {backend} --boot-delay 0.2 --marks {tmp_path}"
    )
    gw = gateway(
        f"""
        listen: {{listen}}
        services:
          ws:
            upstream: http://127.0.0.1:{backend}
            hosts: [ws.test]
            ports: [{dedicated}]
            run: {command}
            idle_timeout: 1s
        """,
        backend_ports=[backend],
    )
    gw.backend = backend
    gw.dedicated = dedicated
    gw.starts = starts
    gw.marks = tmp_path
    return gw


def ws_connect(gw, path="/ws", **kwargs):
    return connect(
        f"ws://ws.test:{gw.port}{path}",
        host="127.0.0.1",
        port=gw.port,
        max_size=None,
        open_timeout=20,
        **kwargs,
    )


def start_count(gw) -> int:
    return gw.starts.read_text().count("start") if gw.starts.exists() else 0


def run(coro):
    return asyncio.run(coro)


def test_cold_start_over_websocket_and_echo(ws_service):
    gw = ws_service
    assert not port_open(gw.backend)

    async def session():
        async with ws_connect(gw) as ws:
            await ws.send("hello")
            assert await ws.recv() == "hello"
            await ws.send(b"\x00\x01\xff")
            assert await ws.recv() == b"\x00\x01\xff"
            big = os.urandom(300_000)
            await ws.send(big)
            assert await ws.recv() == big

    run(session())
    assert start_count(gw) == 1


def test_close_code_subprotocol_and_ping(ws_service):
    gw = ws_service

    async def session():
        async with ws_connect(gw, subprotocols=["chat.v2"]) as ws:
            assert ws.subprotocol == "chat.v2"
            pong = await ws.ping()
            await asyncio.wait_for(pong, 5)
            await ws.send("close:4001")
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            return ws.close_code

    assert run(session()) == 4001


def test_dedicated_port_tunnel(ws_service):
    gw = ws_service

    async def session():
        async with connect(f"ws://127.0.0.1:{gw.dedicated}/ws", open_timeout=20) as ws:
            await ws.send("via port")
            return await ws.recv()

    assert run(session()) == "via port"


def test_twenty_concurrent_tunnels(ws_service):
    gw = ws_service

    async def one(i):
        async with ws_connect(gw) as ws:
            for j in range(20):
                message = f"{i}:{j}"
                await ws.send(message)
                assert await ws.recv() == message
        return i

    async def all_of_them():
        return await asyncio.gather(*(one(i) for i in range(20)))

    assert sorted(run(all_of_them())) == list(range(20))
    assert start_count(gw) == 1


def test_rapid_cycles_leave_no_open_connection(ws_service):
    gw = ws_service

    async def cycles():
        for i in range(30):
            ws = await ws_connect(gw).__aenter__()
            if i % 3 == 0:
                await ws.send("x")
                await ws.recv()
                await ws.close()
            elif i % 3 == 1:
                # Vanish without a close handshake.
                ws.transport.abort()
            else:
                await ws.close()

    run(cycles())
    # With every tunnel accounted closed, the service idles out (1 s).
    wait_for(lambda: not port_open(gw.backend), timeout=6)


def test_open_tunnel_keeps_service_up(ws_service):
    gw = ws_service

    async def hold():
        async with ws_connect(gw) as ws:
            deadline = time.monotonic() + 3.2  # more than 3x idle_timeout
            while time.monotonic() < deadline:
                assert port_open(gw.backend)
                await asyncio.sleep(0.4)
            await ws.send("still here")
            return await ws.recv()

    assert run(hold()) == "still here"
    assert start_count(gw) == 1
    idle_from = time.monotonic()
    wait_for(lambda: not port_open(gw.backend), timeout=6)
    assert time.monotonic() - idle_from < 4


def test_backend_crash_closes_client(ws_service):
    gw = ws_service

    async def session():
        async with ws_connect(gw) as ws:
            await ws.send("crash")
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)

    run(session())
    # Once the process is gone, the next connection starts the service
    # again. (A connection accepted by the dying process itself would get
    # a 502: the gateway never replays a request the service received.)
    wait_for(lambda: not port_open(gw.backend), timeout=5)

    async def again():
        async with ws_connect(gw) as ws:
            await ws.send("back")
            return await ws.recv()

    assert run(again()) == "back"
    assert start_count(gw) == 2


def test_mixed_cold_requests_start_once(ws_service):
    gw = ws_service

    async def ws_one():
        async with ws_connect(gw) as ws:
            await ws.send("m")
            return await ws.recv()

    def work(i):
        kind = i % 3
        if kind == 0:
            return gw.echo("ws.test", path="/echo")["method"]
        if kind == 1:
            return gw.echo("ws.test", method="POST", path="/echo", body=b"x" * 1000)[
                "method"
            ]
        return asyncio.run(ws_one())

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(work, range(20)))
    assert results.count("GET") == 7
    assert results.count("POST") == 7
    assert results.count("m") == 6
    assert start_count(gw) == 1


def handshake(gw, connection_value: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        "GET /ws HTTP/1.1\r\n"
        "Host: ws.test\r\n"
        f"Connection: {connection_value}\r\n"
        "Upgrade: websocket\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Key: {key}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", gw.port), timeout=20) as sock:
        sock.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, head
            head += chunk
    accept = base64.b64encode(
        hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
    )
    assert accept in head
    return head


@pytest.mark.parametrize(
    "value", ["Upgrade", "upgrade", "keep-alive, Upgrade", "Keep-Alive,UPGRADE"]
)
def test_connection_token_variants(ws_service, value):
    head = handshake(ws_service, value)
    assert head.startswith(b"HTTP/1.1 101")
    assert b"upgrade" in head.lower()


def test_sse_disconnect_reaches_backend(ws_service):
    gw = ws_service
    marker = gw.marks / "sse-closed"
    with socket.create_connection(("127.0.0.1", gw.port), timeout=20) as sock:
        sock.sendall(b"GET /sse HTTP/1.1\r\nHost: ws.test\r\n\r\n")
        received = b""
        while received.count(b"data: tick") < 3:
            chunk = sock.recv(4096)
            assert chunk
            received += chunk
        left_at = time.time()
    wait_for(marker.exists, timeout=5)
    assert float(marker.read_text()) - left_at < 1.0


def test_sse_stream_longer_than_idle_keeps_service_up(ws_service):
    gw = ws_service
    with socket.create_connection(("127.0.0.1", gw.port), timeout=20) as sock:
        sock.sendall(b"GET /sse HTTP/1.1\r\nHost: ws.test\r\n\r\n")
        deadline = time.monotonic() + 2.5
        ticks = 0
        while time.monotonic() < deadline:
            ticks += sock.recv(4096).count(b"data: tick")
        assert port_open(gw.backend)
        assert ticks >= 10
    wait_for(lambda: not port_open(gw.backend), timeout=6)


def test_failed_start_answers_503_not_101(gateway, ports, tmp_path):
    gw = gateway(
        """
        listen: {listen}
        services:
          broken:
            upstream: http://127.0.0.1:9
            run: echo "no such server" >&2; exit 1
        """
    )
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=20) as sock:
        sock.sendall(
            (
                "GET /ws HTTP/1.1\r\nHost: broken\r\nConnection: Upgrade\r\n"
                "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Key: {key}\r\n\r\n"
            ).encode()
        )
        answer = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 503")
    assert b"broken" in answer


def test_picows_echo_through_gateway(ws_service):
    picows = pytest.importorskip("picows")
    gw = ws_service
    received: list[bytes] = []
    done = asyncio.Event

    class Listener(picows.WSListener):
        def __init__(self):
            self.done = done()

        def on_ws_frame(self, transport, frame):
            if frame.msg_type == picows.WSMsgType.BINARY:
                received.append(frame.get_payload_as_bytes())
                if len(received) == 100:
                    self.done.set()
                else:
                    transport.send(picows.WSMsgType.BINARY, b"%03d" % len(received))

    async def session():
        transport, listener = await picows.ws_connect(
            Listener,
            f"ws://127.0.0.1:{gw.dedicated}/ws",
            use_aiofastnet=False,
        )
        transport.send(picows.WSMsgType.BINARY, b"000")
        await asyncio.wait_for(listener.done.wait(), 20)
        transport.send_close(picows.WSCloseCode.OK)
        transport.disconnect()

    run(session())
    assert received[0] == b"000"
    assert received[-1] == b"099"


def test_non_101_answer_is_a_normal_response(ws_service):
    gw = ws_service
    status, _, body = gw.request(
        "ws.test",
        path="/echo",
        headers={"Connection": "Upgrade", "Upgrade": "websocket"},
    )
    assert status == 200
    assert json.loads(body)["method"] == "GET"


def test_tunnel_backend_pid_gone_after_shutdown(ws_service):
    gw = ws_service

    async def pid():
        async with ws_connect(gw) as ws:
            await ws.send("pid")
            return int(await ws.recv())

    backend_pid = run(pid())
    assert gw.stop() == 0
    wait_for(lambda: not pid_alive(backend_pid), timeout=10)
