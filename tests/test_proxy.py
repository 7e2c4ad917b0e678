"""HTTP/1.1 proxy semantics end to end: a real gateway, real backends, sockets.

Every test starts its own backend (tests/support/backend.py) and a gateway
with a ``proxy_only`` service pointed at it (or a ``run:`` service where the
lifecycle matters), then talks to the gateway over loopback with raw sockets,
http.client or curl.
"""

from __future__ import annotations

import hashlib
import json
import random
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field

import pytest
from conftest import BACKEND, PYTHON, backend_command, port_open, wait_for

pytestmark = pytest.mark.timeout(30)

MIB = 1024 * 1024
# What /download, /chunked and /close send: this pattern, repeated.
PATTERN = bytes(range(256))


def pattern(size: int) -> bytes:
    return (PATTERN * (size // 256 + 1))[:size]


# -- fixtures -----------------------------------------------------------------


@pytest.fixture
def backend(ports):
    """Factory: ``backend(*args, name=...)`` starts backend.py, returns its port."""
    procs: list[subprocess.Popen] = []

    def start(*args: str, name: str = "backend") -> int:
        port = ports()
        proc = subprocess.Popen(
            [PYTHON, str(BACKEND), str(port), "--name", name, *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        procs.append(proc)
        wait_for(lambda: port_open(port) or proc.poll() is not None)
        assert proc.poll() is None, "backend exited at start"
        return port

    yield start

    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def limits_block(limits: dict | None) -> str:
    values = {"shutdown_timeout": "2s", **(limits or {})}
    return "limits:\n" + "".join(f"  {k}: {v}\n" for k, v in values.items())


@pytest.fixture
def proxy(gateway, backend):
    """Factory: a gateway with service ``app`` (Host ``app``) on a new backend.

    Returns ``(gateway, backend_port)``; ``service`` adds keys to ``app``.
    """

    def make(limits: dict | None = None, backend_args=(), service: str = ""):
        port = backend(*backend_args)
        extra = "".join(f"    {line}\n" for line in service.splitlines() if line)
        gw = gateway(
            "listen: {listen}\n"
            + limits_block(limits)
            + "services:\n"
            + "  app:\n"
            + f"    upstream: http://127.0.0.1:{port}\n"
            + "    proxy_only: true\n"
            + extra
        )
        return gw, port

    return make


# -- a strict HTTP/1.1 client on a raw socket --------------------------------


@dataclass
class Response:
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    raw_head: bytes
    body: bytes = b""
    chunked: bool = False
    interim: list[Response] = field(default_factory=list)

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None

    def get_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self):
        return json.loads(self.body)


class Client:
    """One client connection; reads responses byte-exactly."""

    def __init__(self, port: int, timeout: float = 5):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def get(self, path: str, host: str = "app", extra: str = "") -> Response:
        self.send(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode())
        return self.response()

    def head(self) -> Response:
        lines = []
        while True:
            line = self.file.readline(65536)
            if not line:
                raise EOFError(f"connection closed in a response head: {lines!r}")
            lines.append(line)
            if line in (b"\r\n", b"\n"):
                break
        raw = b"".join(lines)
        version, status, reason = (
            lines[0].decode("latin-1").rstrip("\r\n").split(" ", 2) + [""]
        )[:3]
        headers = []
        for line in lines[1:-1]:
            name, _, value = line.decode("latin-1").partition(":")
            headers.append((name, value.strip()))
        return Response(version, int(status), reason, headers, raw)

    def response(self, method: str = "GET", http10: bool = False) -> Response:
        """The next final response; 1xx responses land in ``interim``."""
        interim = []
        while True:
            resp = self.head()
            if resp.status >= 200 or resp.status == 101:
                break
            interim.append(resp)
        resp.interim = interim
        te = (resp.get("Transfer-Encoding") or "").lower()
        length = resp.get("Content-Length")
        if method == "HEAD" or resp.status in (204, 304) or resp.status == 101:
            return resp
        if te:
            assert te == "chunked", resp.raw_head
            resp.chunked = True
            resp.body = self.read_chunked()
        elif length is not None:
            resp.body = self.read_exact(int(length))
        else:
            resp.body = self.file.read()
        return resp

    def read_exact(self, size: int) -> bytes:
        data = self.file.read(size)
        assert len(data) == size, f"short body: {len(data)} of {size}"
        return data

    def read_chunked(self) -> bytes:
        parts = []
        while True:
            line = self.file.readline(1024)
            assert line.endswith(b"\r\n"), f"bad chunk size line {line!r}"
            size = int(line.split(b";")[0], 16)
            if size == 0:
                trailer = self.file.readline(1024)
                while trailer != b"\r\n":
                    assert trailer, "connection closed in trailers"
                    trailer = self.file.readline(1024)
                return b"".join(parts)
            parts.append(self.read_exact(size))
            assert self.file.read(2) == b"\r\n", "chunk not followed by CRLF"

    def read_until_close(self, timeout: float = 3) -> bytes:
        """Everything until the gateway closes (EOF or reset); fails on a hang."""
        self.sock.settimeout(timeout)
        parts = []
        while True:
            try:
                data = self.file.read1(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            parts.append(data)
        return b"".join(parts)

    def closed_by_peer(self, timeout: float = 3) -> bool:
        """True when the gateway closes the connection (EOF or reset) in time."""
        self.sock.settimeout(timeout)
        try:
            return self.file.read(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False


def echo_headers(resp: Response) -> list[tuple[str, str]]:
    assert resp.status == 200, resp.body
    return [tuple(pair) for pair in resp.json()["headers"]]


def header_values(pairs, name: str) -> list[str]:
    return [v for k, v in pairs if k.lower() == name.lower()]


def gateway_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def established_to(port: int) -> int:
    """Open TCP connections (ESTABLISHED or CLOSE_WAIT) towards 127.0.0.1:port."""
    count = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            remote_port = int(fields[2].split(":")[1], 16)
            if remote_port == port and fields[3] in ("01", "08"):
                count += 1
    return count


class RawUpstream:
    """An upstream on a raw socket: serves one connection, records every byte
    it receives and answers the first request head with ``reply``."""

    def __init__(self, reply: bytes):
        self.reply = reply
        self.received = bytearray()
        self.done = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(10)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            self.done.set()
            return
        conn.settimeout(5)
        replied = False
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                self.received += data
                if not replied and b"\r\n\r\n" in self.received:
                    conn.sendall(self.reply)
                    replied = True
        self.done.set()

    def close(self) -> None:
        self.sock.close()
        self.thread.join(10)


@pytest.fixture
def raw_upstream(gateway):
    """Factory: ``raw_upstream(reply)`` -> (gateway, RawUpstream) for service app."""
    made: list[RawUpstream] = []

    def make(reply: bytes):
        upstream = RawUpstream(reply)
        made.append(upstream)
        gw = gateway(
            "listen: {listen}\n"
            + limits_block(None)
            + "services:\n"
            + "  app:\n"
            + f"    upstream: http://127.0.0.1:{upstream.port}\n"
            + "    proxy_only: true\n"
        )
        return gw, upstream

    yield make
    for upstream in made:
        upstream.close()


# -- hot path -----------------------------------------------------------------


def test_keepalive_requests_share_one_upstream_connection(proxy):
    gw, _ = proxy()
    # Every kind of response framing in between must leave the upstream
    # connection reusable.
    between = [
        ("GET", "/chunked?size=70000", 200),
        ("HEAD", "/download?size=10", 200),
        ("GET", "/status/204", 204),
        ("GET", "/status/304", 304),
        ("GET", "/status/500", 500),
        ("HEAD", "/chunked?size=10", 200),
        ("POST", "/echo", 200),
    ]
    conn = gw.connection(timeout=5)
    peers = set()
    try:
        for i in range(200):
            conn.request("GET", "/peer", headers={"Host": "app"})
            resp = conn.getresponse()
            assert resp.status == 200
            peers.add(json.loads(resp.read())["port"])
            if i % 5 == 4:
                method, path, status = between[i // 5 % len(between)]
                conn.request(method, path, body=b"x", headers={"Host": "app"})
                resp = conn.getresponse()
                resp.read()
                assert resp.status == status, path
    finally:
        conn.close()
    assert len(peers) == 1, peers
    # A later client connection gets the pooled upstream connection too.
    status, _, body = gw.request("app", path="/peer")
    assert status == 200
    assert json.loads(body)["port"] in peers


def test_chunked_request_body_arrives_intact(proxy):
    gw, _ = proxy()
    rng = random.Random(7)
    sizes = [1, 2, 17, 4096, 65536, 1, 300000, 5, 128 * 1024]
    chunks = [rng.randbytes(n) for n in sizes]
    whole = b"".join(chunks)
    conn = gw.connection(timeout=5)
    try:
        conn.request(
            "POST",
            "/echo",
            body=iter(chunks),
            headers={"Host": "app", "Transfer-Encoding": "chunked"},
            encode_chunked=True,
        )
        resp = conn.getresponse()
        info = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 200
    assert info["body_len"] == len(whole)
    assert info["body_sha256"] == hashlib.sha256(whole).hexdigest()
    assert header_values(info["headers"], "Transfer-Encoding") == ["chunked"]


def test_content_length_upload_of_5_mib_arrives_intact(proxy):
    gw, _ = proxy()
    body = random.Random(5).randbytes(5 * MIB)
    info = gw.echo("app", method="PUT", body=body, timeout=5)
    assert info["body_len"] == len(body)
    assert info["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert header_values(info["headers"], "Content-Length") == [str(len(body))]


def test_first_sse_event_arrives_before_the_stream_ends(proxy):
    gw, _ = proxy()
    with Client(gw.port) as client:
        started = time.monotonic()
        client.send(b"GET /sse?n=8&gap=0.15 HTTP/1.1\r\nHost: app\r\n\r\n")
        resp = client.head()
        assert resp.status == 200
        assert resp.get("Content-Type") == "text/event-stream"
        assert resp.get("Transfer-Encoding") == "chunked"
        arrivals = []
        events = []
        while True:
            size = int(client.file.readline(), 16)
            if size == 0:
                client.file.readline()
                break
            events.append(client.read_exact(size))
            client.read_exact(2)
            arrivals.append(time.monotonic() - started)
    assert events == [b"data: event %d\n\n" % i for i in range(8)]
    # The first event is not held back until the stream ends (~1.2 s).
    assert arrivals[0] < 0.5, arrivals
    assert arrivals[-1] - arrivals[0] > 0.8, arrivals


def test_head_then_get_reuses_the_connection(proxy):
    gw, _ = proxy()
    with Client(gw.port) as client:
        client.send(b"HEAD /download?size=1000 HTTP/1.1\r\nHost: app\r\n\r\n")
        resp = client.response("HEAD")
        assert resp.status == 200
        assert resp.get("Content-Length") == "1000"
        assert resp.get("Transfer-Encoding") is None
        # No body bytes follow the HEAD response: the next response is clean.
        resp = client.get("/echo")
        assert resp.status == 200
        assert resp.json()["method"] == "GET"
        client.send(b"HEAD /echo HTTP/1.1\r\nHost: app\r\n\r\n")
        assert client.response("HEAD").status == 200
        assert client.get("/download?size=3000").body == pattern(3000)


def test_pipelined_requests_answered_completely_and_in_order(proxy):
    gw, _ = proxy()
    requests = [
        b"GET /echo?i=0 HTTP/1.1\r\nHost: app\r\n\r\n",
        b"POST /echo?i=1 HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nhello",
        b"GET /chunked?size=70000 HTTP/1.1\r\nHost: app\r\n\r\n",
        b"GET /status/404 HTTP/1.1\r\nHost: app\r\n\r\n",
        b"HEAD /download?size=10 HTTP/1.1\r\nHost: app\r\n\r\n",
        b"POST /echo?i=5 HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n3\r\nabc\r\n0\r\n\r\n",
        b"GET /nothing HTTP/1.1\r\nHost: nowhere.test\r\n\r\n",
        b"GET /download?size=100000 HTTP/1.1\r\nHost: app\r\n\r\n",
        b"GET /close?size=5000 HTTP/1.1\r\nHost: app\r\n\r\n",
        b"GET /echo?i=9 HTTP/1.1\r\nHost: app\r\n\r\n",
    ]
    with Client(gw.port) as client:
        client.send(b"".join(requests))
        first = client.response()
        assert first.json()["target"] == "/echo?i=0"
        second = client.response()
        assert second.json()["target"] == "/echo?i=1"
        assert second.json()["body_sha256"] == hashlib.sha256(b"hello").hexdigest()
        assert client.response().body == pattern(70000)
        assert client.response().status == 404
        head = client.response("HEAD")
        assert (head.status, head.get("Content-Length")) == (200, "10")
        fifth = client.response().json()
        assert (fifth["target"], fifth["body_len"]) == ("/echo?i=5", 3)
        unknown = client.response()
        assert unknown.status == 404 and b"nowhere.test" in unknown.body
        assert client.response().body == pattern(100000)
        assert client.response().body == pattern(5000)
        assert client.response().json()["target"] == "/echo?i=9"


def test_pipelined_large_body_behind_a_slow_response_arrives_intact(proxy):
    gw, _ = proxy()
    body = random.Random(9).randbytes(MIB)
    with Client(gw.port) as client:
        client.send(b"GET /slow?delay=0.5 HTTP/1.1\r\nHost: app\r\n\r\n")
        client.send(
            b"POST /echo HTTP/1.1\r\nHost: app\r\nContent-Length: %d\r\n\r\n"
            % len(body)
        )
        # The gateway holds a bounded part of this body while the first
        # exchange runs; the rest waits in the kernel buffers.
        sender = threading.Thread(target=client.sock.sendall, args=(body,))
        sender.start()
        assert client.response().body == b"slow\n"
        info = client.response().json()
        sender.join(5)
    assert info["body_len"] == len(body)
    assert info["body_sha256"] == hashlib.sha256(body).hexdigest()


# A body that reads as requests if it were ever parsed as such.
DECOY = b"GET /echo?smuggled HTTP/1.1\r\nHost: app\r\n\r\n"


def body_plans(head: bytes, body: bytes, after: bytes) -> dict[str, list[bytes]]:
    """The same bytes sent in different reads: a head read by the gateway
    itself with its body in the same read, after it, or in pieces, and a
    head split inside its request line so that httptools reads it all."""
    return {
        "one-read": [head + body + after],
        "head-alone": [head, body[:7], body[7:1000], body[1000:] + after],
        "head-with-part": [head + body[:100], body[100:] + after[:5], after[5:]],
        "body-ends-read": [head + body, after],
        "split-head": [head[:8], head[8:] + body + after],
    }


@pytest.mark.parametrize(
    "plan", ["one-read", "head-alone", "head-with-part", "body-ends-read", "split-head"]
)
def test_length_body_then_next_request_arrive_exactly(proxy, plan):
    gw, _ = proxy()
    body = DECOY * 3 + random.Random(3).randbytes(70000) + DECOY
    head = b"POST /echo?i=1 HTTP/1.1\r\nHost: app\r\nContent-Length: %d\r\n\r\n" % (
        len(body)
    )
    after = b"GET /echo?i=2 HTTP/1.1\r\nHost: app\r\n\r\n"
    with Client(gw.port) as client:
        for i, piece in enumerate(body_plans(head, body, after)[plan]):
            if i:
                time.sleep(0.03)
            client.send(piece)
        first = client.response().json()
        assert first["target"] == "/echo?i=1"
        assert first["body_len"] == len(body)
        assert first["body_sha256"] == hashlib.sha256(body).hexdigest()
        assert header_values(first["headers"], "Content-Length") == [str(len(body))]
        assert client.response().json()["target"] == "/echo?i=2"
        # Nothing of the body was taken for a request: the next answer on
        # this connection is the next request's.
        assert client.get("/echo?i=3").json()["target"] == "/echo?i=3"


def test_length_body_of_several_pipelined_requests_in_one_read(proxy):
    gw, _ = proxy()
    bodies = [b"a", DECOY, bytes(range(256)) * 40, b""]
    batch = b"".join(
        b"PUT /echo?i=%d HTTP/1.1\r\nHost: app\r\nContent-Length: %d\r\n\r\n%s"
        % (i, len(body), body)
        for i, body in enumerate(bodies)
    )
    with Client(gw.port) as client:
        # Each request but the first starts in the middle of a read, after
        # the previous body.
        client.send(batch)
        for i, body in enumerate(bodies):
            info = client.response().json()
            assert (info["target"], info["body_len"]) == (f"/echo?i={i}", len(body))
            assert info["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_read_of_many_small_bodies_costs_memory_in_proportion(proxy):
    gw, _ = proxy()
    count = 4000
    batch = b"".join(
        b"PUT /x?%d HTTP/1.1\r\nHost: nowhere\r\nContent-Length: 1\r\n\r\nx" % i
        for i in range(count)
    )

    def peak_kib() -> int:
        status = open(f"/proc/{gw.process.pid}/status").read()
        return int(status.split("VmHWM:")[1].split()[0])

    before = peak_kib()
    with Client(gw.port) as client:
        client.send(batch)
        for i in range(count):
            resp = client.response()
            assert resp.status == 404, i
        assert client.get("/echo").status == 200
    # About 250 KiB of requests: copying the rest of the read once per
    # request would peak at hundreds of MiB.
    assert peak_kib() - before < 64 * 1024


def test_body_end_and_garbage_in_one_read_forward_the_body_then_400(proxy):
    gw, _ = proxy()
    head = b"POST /echo HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\n"
    with Client(gw.port, timeout=3) as client:
        client.send(head + b"hel")
        time.sleep(0.05)
        client.send(b"loGARBAGE\r\n\r\n")
        info = client.response().json()
        assert info["body_sha256"] == hashlib.sha256(b"hello").hexdigest()
        assert client.response().status == 400
        assert client.closed_by_peer()


def test_client_leaving_mid_body_gets_no_answer_and_loses_nothing_else(proxy):
    gw, _ = proxy()
    with Client(gw.port) as client:
        client.send(
            b"POST /echo HTTP/1.1\r\nHost: app\r\nContent-Length: 1000\r\n\r\n" + DECOY
        )
        client.sock.shutdown(socket.SHUT_WR)
        # A body cut short is never passed off as a request, nor answered.
        assert client.read_until_close() == b""
    with Client(gw.port) as client:
        assert client.get("/echo?after").json()["target"] == "/echo?after"


def test_half_closed_client_gets_every_pipelined_answer(proxy):
    gw, _ = proxy()
    with Client(gw.port) as client:
        client.send(
            b"GET /echo?i=1 HTTP/1.1\r\nHost: app\r\n\r\n"
            b"GET /slow?delay=0.2 HTTP/1.1\r\nHost: app\r\n\r\n"
            b"GET /echo?i=3 HTTP/1.1\r\nHost: app\r\n\r\n"
        )
        client.sock.shutdown(socket.SHUT_WR)
        assert client.response().json()["target"] == "/echo?i=1"
        assert client.response().body == b"slow\n"
        last = client.response()
        assert last.json()["target"] == "/echo?i=3"
        assert client.closed_by_peer()


# -- headers ------------------------------------------------------------------


def test_set_cookie_order_repeats_and_header_case_kept(proxy):
    gw, _ = proxy()
    with Client(gw.port) as client:
        resp = client.get("/cookies")
    assert resp.status == 200
    assert resp.get_all("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/", "c=3; Path=/"]
    assert b"\r\nX-MiXeD-Case: yes\r\n" in resp.raw_head
    # The backend's order is kept too: one cookie, the mixed-case header, two.
    names = [name for name, _ in resp.headers]
    cookies = [i for i, name in enumerate(names) if name == "Set-Cookie"]
    assert cookies[0] < names.index("X-MiXeD-Case") < cookies[1], names


def test_request_header_name_case_kept(proxy):
    gw, _ = proxy()
    with Client(gw.port) as client:
        pairs = echo_headers(client.get("/echo", extra="X-CaSe-TeSt: v\r\n"))
    assert ("X-CaSe-TeSt", "v") in pairs


def test_hop_by_hop_request_headers_removed(proxy):
    gw, _ = proxy()
    extra = (
        "Connection: keep-alive, X-Drop-Me\r\n"
        "X-Drop-Me: secret\r\n"
        "Keep-Alive: timeout=5\r\n"
        "TE: trailers\r\n"
        "Trailer: X-Checksum\r\n"
        "Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"
        "Proxy-Connection: keep-alive\r\n"
        "Proxy-Custom: 1\r\n"
        "Upgrade: h2c\r\n"
        "X-Keep: kept\r\n"
    )
    with Client(gw.port) as client:
        pairs = echo_headers(client.get("/echo", extra=extra))
        # The connection stayed open (keep-alive was honoured, not forwarded).
        assert client.get("/echo").status == 200
    names = {name.lower() for name, _ in pairs}
    for dropped in (
        "connection",
        "x-drop-me",
        "keep-alive",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-connection",
        "proxy-custom",
        "upgrade",
    ):
        assert dropped not in names, pairs
    assert ("X-Keep", "kept") in pairs


def test_non_websocket_upgrade_header_removed(proxy):
    gw, _ = proxy()
    extra = (
        "Connection: Upgrade, HTTP2-Settings\r\n"
        "Upgrade: h2c\r\n"
        "HTTP2-Settings: AAMAAABkAAQAAP__\r\n"
    )
    with Client(gw.port) as client:
        pairs = echo_headers(client.get("/echo", extra=extra))
    names = {name.lower() for name, _ in pairs}
    assert "http2-settings" not in names, pairs
    assert "upgrade" not in names, pairs
    assert "connection" not in names, pairs


def test_hop_by_hop_response_headers_removed(proxy):
    gw, _ = proxy()
    with Client(gw.port) as client:
        resp = client.get("/hop")
        assert resp.body == b"hop\n"
        assert client.get("/echo").status == 200
    names = {name.lower() for name, _ in resp.headers}
    for dropped in ("connection", "x-secret", "keep-alive", "trailer", "te"):
        assert dropped not in names, resp.raw_head
    assert "proxy-authenticate" not in names, resp.raw_head
    assert resp.get("X-Kept") == "yes"


def test_any_proxy_prefixed_response_header_removed(proxy):
    gw, _ = proxy()
    with Client(gw.port) as client:
        resp = client.get("/hop")
    assert resp.get("Proxy-Other") is None, resp.raw_head


def test_host_rewritten_and_forwarding_headers_set(proxy):
    gw, port = proxy()
    with Client(gw.port) as client:
        pairs = echo_headers(
            client.get("/echo", host="App:8080", extra="X-Forwarded-For: 10.0.0.1\r\n")
        )
    assert header_values(pairs, "Host") == [f"127.0.0.1:{port}"]
    assert header_values(pairs, "X-Forwarded-For") == ["10.0.0.1, 127.0.0.1"]
    assert header_values(pairs, "X-Forwarded-Host") == ["App:8080"]
    assert header_values(pairs, "X-Forwarded-Proto") == ["http"]


def test_forwarding_headers_replace_client_supplied_ones(proxy):
    gw, _ = proxy()
    extra = (
        "X-Forwarded-For: 10.0.0.1\r\n"
        "X-Forwarded-For: 10.0.0.2, 10.0.0.3\r\n"
        "X-Forwarded-Host: evil.test\r\n"
        "X-Forwarded-Proto: https\r\n"
    )
    with Client(gw.port) as client:
        pairs = echo_headers(client.get("/echo", extra=extra))
    assert header_values(pairs, "X-Forwarded-For") == [
        "10.0.0.1, 10.0.0.2, 10.0.0.3, 127.0.0.1"
    ]
    assert header_values(pairs, "X-Forwarded-Host") == ["app"]
    assert header_values(pairs, "X-Forwarded-Proto") == ["http"]


def test_preserve_host_forwards_the_client_host(proxy):
    gw, _ = proxy(service="preserve_host: true")
    with Client(gw.port) as client:
        pairs = echo_headers(client.get("/echo", host="APP:1234"))
    assert header_values(pairs, "Host") == ["APP:1234"]


# -- status codes and framing -------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 301, 404, 500, 503])
def test_status_passthrough(proxy, status):
    gw, _ = proxy()
    with Client(gw.port) as client:
        resp = client.get(f"/status/{status}")
        assert resp.status == status
        assert resp.body == b"status %d\n" % status
        # The backend's own answer, not one made by the gateway.
        assert (resp.get("Server") or "").startswith("testbackend")
        assert client.get("/echo").status == 200


def test_204_and_304_have_no_body_and_keep_the_connection(proxy):
    gw, _ = proxy()
    with Client(gw.port) as client:
        for status in (204, 304, 204):
            resp = client.get(f"/status/{status}")
            assert resp.status == status
            assert resp.get("Transfer-Encoding") is None, resp.raw_head
            assert resp.get("Content-Length") in (None, "0"), resp.raw_head
            assert resp.get("Connection") is None, resp.raw_head
            # Nothing but the next response follows.
            assert client.get("/echo").json()["method"] == "GET"


def test_expect_100_continue_interim_reaches_the_client(proxy):
    gw, _ = proxy()
    body = random.Random(3).randbytes(4096)
    with Client(gw.port, timeout=3) as client:
        client.send(
            b"POST /echo HTTP/1.1\r\nHost: app\r\nContent-Length: 4096\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        # The client waits for the interim answer before sending its body.
        interim = client.head()
        assert interim.status == 100, interim.raw_head
        client.send(body)
        resp = client.response()
    assert resp.status == 200
    assert resp.json()["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_expect_100_continue_with_curl(proxy, tmp_path):
    gw, _ = proxy()
    upload = tmp_path / "upload.bin"
    upload.write_bytes(random.Random(4).randbytes(8192))
    started = time.monotonic()
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "-v",
            "--max-time",
            "5",
            "--expect100-timeout",
            "4",
            "-H",
            "Host: app",
            "-H",
            "Expect: 100-continue",
            "--data-binary",
            f"@{upload}",
            f"http://127.0.0.1:{gw.port}/echo",
        ],
        capture_output=True,
        timeout=10,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert b"HTTP/1.1 100 Continue" in result.stderr
    info = json.loads(result.stdout)
    assert info["body_sha256"] == hashlib.sha256(upload.read_bytes()).hexdigest()
    # curl sent the body on the 100, not after its 4 s expect timeout.
    assert elapsed < 3, elapsed


def test_103_early_hints_reach_an_http11_client(proxy):
    gw, _ = proxy()
    with Client(gw.port) as client:
        resp = client.get("/hints")
        assert [r.status for r in resp.interim] == [103]
        assert resp.interim[0].get("Link") == "</a.css>"
        assert (resp.status, resp.body) == (200, b"hinted\n")
        assert client.get("/echo").status == 200


def test_103_early_hints_not_sent_to_an_http10_client(proxy):
    gw, _ = proxy()
    with Client(gw.port) as client:
        client.send(b"GET /hints HTTP/1.0\r\nHost: app\r\n\r\n")
        resp = client.head()
        assert resp.status == 200, resp.raw_head


def test_http10_client_never_gets_chunked(proxy):
    gw, _ = proxy()
    with Client(gw.port) as client:
        client.send(b"GET /chunked?size=100000 HTTP/1.0\r\nHost: app\r\n\r\n")
        resp = client.response()
        assert resp.status == 200
        assert resp.get("Transfer-Encoding") is None, resp.raw_head
        assert not resp.chunked
        assert resp.body == pattern(100000)
        assert client.closed_by_peer()


def test_http10_keepalive_with_content_length_keeps_the_connection(proxy):
    gw, _ = proxy()
    with Client(gw.port) as client:
        client.send(
            b"GET /download?size=1000 HTTP/1.0\r\nHost: app\r\n"
            b"Connection: keep-alive\r\n\r\n"
        )
        resp = client.response()
        assert resp.status == 200
        assert resp.body == pattern(1000)
        assert (resp.get("Connection") or "").lower() == "keep-alive"
        client.send(
            b"GET /echo HTTP/1.0\r\nHost: app\r\nConnection: keep-alive\r\n\r\n"
        )
        assert client.response().json()["method"] == "GET"
        # Without keep-alive, an HTTP/1.0 exchange ends the connection.
        client.send(b"GET /echo HTTP/1.0\r\nHost: app\r\n\r\n")
        assert client.response().status == 200
        assert client.closed_by_peer()


def test_close_delimited_body_rechunked_and_connection_kept(proxy):
    gw, _ = proxy()
    with Client(gw.port) as client:
        resp = client.get("/close?size=100000")
        assert resp.status == 200
        assert resp.chunked, resp.raw_head
        assert resp.body == pattern(100000)
        assert resp.get("Connection") is None, resp.raw_head
        assert client.get("/echo").status == 200


def test_close_requested_by_http11_client_closes_after_response(proxy):
    gw, _ = proxy()
    with Client(gw.port) as client:
        resp = client.get("/echo", extra="Connection: close\r\n")
        assert resp.status == 200
        assert resp.get("Connection") == "close"
        assert client.closed_by_peer()


# -- memory and backpressure --------------------------------------------------


def test_large_download_to_slow_reader_uses_bounded_memory(proxy):
    gw, _ = proxy()
    pid = gw.process.pid
    size = 200 * MIB
    # Warm up the paths once so that baseline and peak compare like with like.
    assert len(gw.request("app", path=f"/download?size={4 * MIB}")[2]) == 4 * MIB
    baseline = gateway_rss_kib(pid)
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], gateway_rss_kib(pid))
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    received = 0
    try:
        with Client(gw.port, timeout=10) as client:
            client.send(b"GET /download?size=%d HTTP/1.1\r\nHost: app\r\n\r\n" % size)
            resp = client.head()
            assert resp.get("Content-Length") == str(size)
            slow_until = time.monotonic() + 2
            while time.monotonic() < slow_until:
                received += len(client.file.read1(4096))
                time.sleep(0.05)
            buf = bytearray(MIB)
            view = memoryview(buf)
            while received < size:
                n = client.file.readinto(view[: min(MIB, size - received)])
                assert n, f"connection closed after {received} bytes"
                received += n
    finally:
        done.set()
        sampler.join()
    assert received == size
    growth_mib = (peak[0] - baseline) / 1024
    assert growth_mib < 16, f"gateway RSS grew by {growth_mib:.1f} MiB"


def test_slow_reader_is_not_an_upstream_timeout(proxy):
    gw, _ = proxy(limits={"upstream_timeout": "1s"})
    size = 32 * MIB
    with Client(gw.port, timeout=10) as client:
        client.send(b"GET /download?size=%d HTTP/1.1\r\nHost: app\r\n\r\n" % size)
        resp = client.head()
        assert resp.status == 200
        # The client reads nothing for 2 s: buffers fill, the gateway stops
        # reading the backend, which has the bytes ready the whole time.
        time.sleep(2)
        received = 0
        while received < size:
            data = client.file.read1(MIB)
            if not data:
                break
            received += len(data)
    assert received == size


# -- malformed requests and limits --------------------------------------------


BAD_REQUESTS = {
    "content-length-with-transfer-encoding": (
        b"POST /echo HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "two-content-lengths": (
        b"POST /echo HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n"
        b"Content-Length: 6\r\n\r\nhello!"
    ),
    "two-equal-content-lengths": (
        b"POST /echo HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n"
        b"Content-Length: 5\r\n\r\nhello"
    ),
    "two-hosts": b"GET /echo HTTP/1.1\r\nHost: app\r\nHost: other\r\n\r\n",
    "two-equal-hosts": b"GET /echo HTTP/1.1\r\nHost: app\r\nHost: app\r\n\r\n",
    "no-host-http11": b"GET /echo HTTP/1.1\r\n\r\n",
    "gzip-chunked": (
        b"POST /echo HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: gzip, chunked\r\n"
        b"\r\n0\r\n\r\n"
    ),
    "chunked-twice": (
        b"POST /echo HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "garbage-request-line": b"HELLO THERE\r\n\r\n",
    "binary-garbage": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
}


@pytest.mark.parametrize("raw", list(BAD_REQUESTS.values()), ids=list(BAD_REQUESTS))
def test_malformed_request_gets_400_and_close(proxy, raw):
    gw, _ = proxy()
    with Client(gw.port) as client:
        client.send(raw)
        resp = client.response()
        assert resp.status == 400, resp.raw_head
        assert resp.get("Connection") == "close"
        assert resp.body.startswith(b"400 Bad Request")
        assert client.closed_by_peer()


def test_malformed_chunked_body_gets_400_or_close_not_a_hang(proxy):
    gw, _ = proxy()
    with Client(gw.port, timeout=3) as client:
        client.send(
            b"POST /echo HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n"
            b"\r\n2\r\nhi\r\nZZ\r\n\r\n"
        )
        try:
            data = client.file.read()
        except TimeoutError:
            pytest.fail("no answer and no close 3 s after a malformed chunk")
    assert data == b"" or data.startswith(b"HTTP/1.1 400 "), data
    assert gw.echo("app")["method"] == "GET"


def test_gateway_made_responses_respect_client_backpressure(proxy):
    gw, _ = proxy()
    pid = gw.process.pid
    baseline = gateway_rss_kib(pid)
    request = b"GET /x HTTP/1.1\r\nHost: nowhere.test\r\n\r\n"
    piece = request * (65536 // len(request))
    sent = 0
    with Client(gw.port, timeout=1) as client:
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        # A client that pipelines 404s and never reads: the gateway must stop
        # reading once its answers back up, as it does for proxied responses.
        try:
            while sent < 24 * MIB:
                client.sock.sendall(piece)
                sent += len(piece)
        except TimeoutError:
            pass
        growth_mib = (gateway_rss_kib(pid) - baseline) / 1024
    assert growth_mib < 16, f"gateway RSS grew by {growth_mib:.0f} MiB ({sent} sent)"


def test_malformed_request_after_a_good_one_answers_both(proxy):
    gw, _ = proxy()
    with Client(gw.port) as client:
        client.send(
            b"GET /echo HTTP/1.1\r\nHost: app\r\n\r\n"
            b"GET /echo HTTP/1.1\r\nHost: app\r\nHost: app\r\n\r\n"
        )
        assert client.response().status == 200
        assert client.response().status == 400
        assert client.closed_by_peer()


def test_unknown_host_gets_404_naming_it(proxy):
    gw, _ = proxy()
    with Client(gw.port) as client:
        resp = client.get("/echo", host="nowhere.example:81")
        assert resp.status == 404
        assert b"nowhere.example" in resp.body
        # A 404 for a well-formed request keeps the connection.
        assert client.get("/echo").status == 200
        client.send(b"HEAD /echo HTTP/1.1\r\nHost: nowhere.example\r\n\r\n")
        head = client.response("HEAD")
        assert head.status == 404 and int(head.get("Content-Length")) > 0
        assert client.get("/echo").status == 200


def test_host_routing_ignores_case_and_port(proxy):
    gw, _ = proxy()
    # Each Host differs from the one before, so none is served from the
    # connection's route cache.
    spellings = [
        ("APP:9999", 200),
        ("aPp", 200),
        ("app:", 200),
        ("app", 200),
        ("APP", 200),
        ("app:80:81", 404),
        ("[app]:80", 404),
        ("[app", 404),
        ("apps", 404),
        ("ap", 404),
        ("app:80", 200),
    ]
    with Client(gw.port) as client:
        for host, status in spellings:
            assert client.get("/echo", host=host).status == status, host


def test_one_letter_host_changes_no_other_bytes(gateway, backend):
    # CPython shares one bytes object per single byte value; a routing key
    # built from one must never alter it for the rest of the process.
    port = backend()
    gw = gateway(
        "listen: {listen}\n"
        + limits_block(None)
        + "services:\n"
        + "".join(
            f"  {name}:\n    upstream: http://127.0.0.1:{port}\n    proxy_only: true\n"
            for name in ("app", "x")
        )
    )
    with Client(gw.port) as client:
        resp = client.get("/echo", host="B")
        assert resp.status == 404 and b"'B'" in resp.body
        assert client.get("/echo", host="A:80").status == 404
        assert client.get("/echo", host="X").status == 200
        assert client.get("/echo", host="X:8080").status == 200
        pairs = echo_headers(client.get("/echo", extra="X-V: A\r\n"))
        assert header_values(pairs, "X-V") == ["A"]
        client.send(b"POST /echo HTTP/1.1\r\nHost: app\r\nContent-Length: 2\r\n\r\n")
        for byte in (b"B", b"A"):
            # One byte per read: the gateway gets the shared objects.
            time.sleep(0.05)
            client.send(byte)
        info = client.response().json()
        assert info["body_sha256"] == hashlib.sha256(b"BA").hexdigest()


def test_head_over_max_header_gets_431(proxy):
    gw, _ = proxy(limits={"max_header": "2KiB"})
    small = "".join(f"X-Small-{i}: {'v' * 60}\r\n" for i in range(10))
    big = "".join(f"X-Big-{i}: {'v' * 90}\r\n" for i in range(40))
    with Client(gw.port) as client:
        assert client.get("/echo", extra=small).status == 200
    with Client(gw.port) as client:
        resp = client.get("/echo", extra=big)
        assert resp.status == 431
        assert client.closed_by_peer()


def test_long_pipelined_read_ending_inside_a_head_is_not_431(proxy):
    gw, _ = proxy(limits={"max_header": "4KiB"})
    count = 2000
    # About 70 KiB of complete requests (answered by the gateway itself),
    # then the start of one more head, whose rest comes in the next read.
    batch = b"GET /x HTTP/1.1\r\nHost: nowhere\r\n\r\n" * count
    with Client(gw.port) as client:
        client.send(batch + b"GET /ec")
        time.sleep(0.2)
        client.send(b"ho HTTP/1.1\r\nHost: app\r\n\r\n")
        for i in range(count):
            assert client.response().status == 404, i
        last = client.response()
        assert last.status == 200, last.body
        assert last.json()["target"] == "/echo"


def test_single_endless_header_line_gets_431_promptly(proxy):
    gw, _ = proxy(limits={"max_header": "4KiB", "header_timeout": "3s"})
    with Client(gw.port) as client:
        started = time.monotonic()
        client.send(b"GET /echo HTTP/1.1\r\nHost: app\r\nX-Long: ")
        try:
            for _ in range(16):
                client.send(b"a" * 16384)
        except OSError:
            pass
        resp = client.response()
        elapsed = time.monotonic() - started
    assert resp.status == 431, resp.raw_head
    assert elapsed < 2, elapsed


def test_body_over_max_body_gets_413_without_starting_the_service(
    gateway, ports, tmp_path
):
    backend_port = ports()
    starts = tmp_path / "starts.log"
    gw = gateway(
        f"""
        listen: {{listen}}
        limits:
          max_body: 1KiB
          shutdown_timeout: 2s
        services:
          app:
            upstream: http://127.0.0.1:{backend_port}
            run: {backend_command(backend_port, starts=starts)}
            idle_timeout: 30s
        """,
        backend_ports=[backend_port],
    )
    size = 8 * MIB
    with Client(gw.port) as client:
        client.send(
            b"POST /echo HTTP/1.1\r\nHost: app\r\nContent-Length: %d\r\n\r\n" % size
        )
        sent = [0]

        def keep_sending() -> None:
            piece = b"x" * 65536
            try:
                while sent[0] < size:
                    client.sock.sendall(piece)
                    sent[0] += len(piece)
                    time.sleep(0.002)
            except OSError:
                pass

        sender = threading.Thread(target=keep_sending, daemon=True)
        sender.start()
        # The answer is read while the client is still sending, not a reset.
        resp = client.response()
        assert resp.status == 413
        assert b"1024" in resp.body
        assert sent[0] < size
        sender.join(10)
    assert not starts.exists()
    assert not port_open(backend_port)


def test_chunked_body_over_max_body_gets_413(proxy):
    gw, _ = proxy(limits={"max_body": "1KiB"})
    with Client(gw.port) as client:
        client.send(
            b"POST /echo HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        try:
            for _ in range(8):
                client.send(b"400\r\n" + b"y" * 1024 + b"\r\n")
        except OSError:
            pass
        resp = client.response()
        assert resp.status == 413
        assert client.closed_by_peer()


# -- timeouts -----------------------------------------------------------------


def test_half_sent_head_gets_408_or_close_within_header_timeout(proxy):
    gw, _ = proxy(limits={"header_timeout": "0.5s"})
    with Client(gw.port) as client:
        started = time.monotonic()
        client.send(b"GET /echo HTTP/1.1\r\nHost: app\r\n")
        client.sock.settimeout(5)
        data = client.file.read()
        elapsed = time.monotonic() - started
    assert data == b"" or data.startswith(b"HTTP/1.1 408 "), data
    assert 0.4 < elapsed < 3, elapsed


def test_silent_new_connection_closed_after_header_timeout(proxy):
    gw, _ = proxy(limits={"header_timeout": "0.5s"})
    with Client(gw.port) as client:
        started = time.monotonic()
        assert client.closed_by_peer(timeout=3)
        elapsed = time.monotonic() - started
    assert 0.4 < elapsed < 2, elapsed


def test_idle_keepalive_connection_closed_after_keepalive_timeout(proxy):
    gw, _ = proxy(limits={"keepalive_timeout": "0.6s"})
    with Client(gw.port) as client:
        # Requests closer together than the timeout keep the connection.
        for _ in range(4):
            assert client.get("/echo").status == 200
            time.sleep(0.3)
        assert client.get("/echo").status == 200
        idle_from = time.monotonic()
        assert client.closed_by_peer(timeout=3)
        elapsed = time.monotonic() - idle_from
    assert 0.5 < elapsed < 2, elapsed


def test_slow_upstream_gets_504_after_upstream_timeout(proxy):
    gw, _ = proxy(limits={"upstream_timeout": "1s"})
    with Client(gw.port) as client:
        started = time.monotonic()
        resp = client.get("/slow?delay=3")
        elapsed = time.monotonic() - started
        assert resp.status == 504
        assert b"app" in resp.body
    assert 0.9 < elapsed < 2.5, elapsed
    # The gateway is fine afterwards.
    assert gw.echo("app")["method"] == "GET"


def test_sse_with_gaps_shorter_than_upstream_timeout_not_cut(proxy):
    gw, _ = proxy(limits={"upstream_timeout": "0.5s"})
    with Client(gw.port) as client:
        resp = client.get("/sse?n=6&gap=0.3")
        assert resp.status == 200
        assert resp.body.count(b"data: event") == 6


# -- upstream connection behaviour ---------------------------------------------


def test_backend_closing_idle_connections_causes_no_502(proxy):
    gw, port = proxy(backend_args=("--idle-close", "0.3"))
    with Client(gw.port) as client:
        for method in ("GET", "POST"):
            assert client.get("/peer").status == 200
            # Wait until the backend has closed the pooled connection.
            wait_for(lambda: established_to(port) == 0, timeout=3)
            client.send(
                f"{method} /echo HTTP/1.1\r\nHost: app\r\n"
                "Content-Length: 2\r\n\r\nhi".encode()
            )
            resp = client.response()
            assert resp.status == 200, resp.body
            assert resp.json()["body_len"] == 2


def test_backend_idle_close_racing_requests_are_retried(proxy):
    gw, _ = proxy(backend_args=("--idle-close", "0.2"))
    with Client(gw.port) as client:
        for delay in (0.19, 0.2, 0.21, 0.2, 0.19, 0.21, 0.2, 0.2):
            assert client.get("/echo").status == 200
            time.sleep(delay)
        assert client.get("/echo").status == 200


def test_unreachable_upstream_gets_502_naming_the_service(gateway, ports):
    dead = ports()
    gw = gateway(
        f"""
        listen: {{listen}}
        limits:
          shutdown_timeout: 2s
        services:
          app:
            upstream: http://127.0.0.1:{dead}
            proxy_only: true
        """
    )
    with Client(gw.port) as client:
        resp = client.get("/echo")
        assert resp.status == 502
        assert b"app" in resp.body


def test_malformed_upstream_response_gets_502(raw_upstream):
    gw, _ = raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n")
    with Client(gw.port) as client:
        resp = client.get("/echo")
    assert resp.status == 502
    assert b"malformed" in resp.body


def test_upstream_silent_after_response_started_closes_client(proxy):
    gw, _ = proxy(limits={"upstream_timeout": "1s"})
    with Client(gw.port) as client:
        started = time.monotonic()
        client.send(b"GET /sse?n=3&gap=3 HTTP/1.1\r\nHost: app\r\n\r\n")
        assert client.head().status == 200
        assert client.file.readline() == b"f\r\n"
        assert client.file.readline() == b"data: event 0\n"
        # Then 3 s of silence: the gateway gives up after 1 s and closes, so
        # the client sees an incomplete chunked body.
        rest = client.read_until_close(timeout=4)
        elapsed = time.monotonic() - started
    assert not rest.endswith(b"0\r\n\r\n"), rest
    assert 0.9 < elapsed < 2.5, elapsed


@pytest.mark.parametrize(
    "framing",
    [
        "length",
        "chunked",
        "close",
    ],
)
def test_upstream_cut_mid_body_is_not_passed_off_as_complete(proxy, framing):
    gw, _ = proxy()
    with Client(gw.port) as client:
        client.send(
            b"GET /cut?size=5000&framing=%s&reset=1 HTTP/1.1\r\nHost: app\r\n\r\n"
            % framing.encode()
        )
        head = client.head()
        assert head.status == 200
        rest = client.read_until_close()
    length = head.get("Content-Length")
    if length is not None:
        assert len(rest) < int(length)
    else:
        assert head.get("Transfer-Encoding") == "chunked", head.raw_head
        # No last chunk: the client can tell the body is incomplete.
        assert not rest.endswith(b"\r\n0\r\n\r\n"), rest[-32:]


def test_bytes_after_upgrade_request_not_forwarded_before_101(raw_upstream):
    gw, upstream = raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    with Client(gw.port) as client:
        client.send(
            b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\n\r\n"
            b"GET /admin HTTP/1.1\r\nHost: internal\r\n"
            b"X-Forwarded-For: 6.6.6.6\r\n\r\n"
        )
        resp = client.response()
        assert (resp.status, resp.body) == (200, b"ok")
    upstream.done.wait(2)
    received = bytes(upstream.received)
    assert received.count(b" HTTP/1.1\r\n") == 1, received
    assert b"6.6.6.6" not in received, received


def test_client_leaving_mid_stream_leaves_gateway_healthy(proxy):
    gw, _ = proxy()
    for _ in range(3):
        with Client(gw.port) as client:
            client.send(b"GET /sse?n=200&gap=0.01 HTTP/1.1\r\nHost: app\r\n\r\n")
            assert client.head().status == 200
            assert b"event 0" in client.file.readline() + client.file.readline()
            # Leave abruptly: a reset instead of a FIN.
            client.sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
    for _ in range(5):
        assert gw.echo("app")["method"] == "GET"
    assert "Traceback" not in gw.log()


def test_upgrade_answered_with_plain_200_is_passed_back(proxy):
    gw, _ = proxy()
    with Client(gw.port, timeout=3) as client:
        client.send(
            b"GET /echo HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        resp = client.response()
        assert resp.status == 200
        pairs = echo_headers(resp)
        assert header_values(pairs, "Upgrade") == ["websocket"]
        assert [v.lower() for v in header_values(pairs, "Connection")] == ["upgrade"]
        assert client.closed_by_peer()
    assert gw.echo("app")["method"] == "GET"


# -- routing ------------------------------------------------------------------


def test_dedicated_port_routes_without_host_match(gateway, backend, ports):
    port = backend(name="dedicated")
    dedicated = ports()
    gw = gateway(
        f"""
        listen: {{listen}}
        limits:
          shutdown_timeout: 2s
        services:
          app:
            upstream: http://127.0.0.1:{port}
            proxy_only: true
            ports: [{dedicated}]
        """
    )
    with Client(dedicated) as client:
        info = client.get("/echo", host="whatever.invalid").json()
        assert info["name"] == "dedicated"
        client.send(b"GET /echo HTTP/1.0\r\n\r\n")
        assert client.response().json()["name"] == "dedicated"
    with Client(gw.port) as client:
        assert client.get("/echo", host="whatever.invalid").status == 404


def test_per_route_upstreams_reach_their_own_backends(gateway, backend, ports):
    one = backend(name="one")
    two = backend(name="two")
    dedicated = ports()
    gw = gateway(
        f"""
        listen: {{listen}}
        limits:
          shutdown_timeout: 2s
        services:
          app:
            proxy_only: true
            routes:
              - {{host: one.test, upstream: "http://127.0.0.1:{one}"}}
              - {{host: two.test, upstream: "http://127.0.0.1:{two}"}}
              - {{port: {dedicated}, upstream: "http://127.0.0.1:{two}"}}
        """
    )
    with Client(gw.port) as client:
        first = client.get("/echo", host="one.test").json()
        second = client.get("/echo", host="two.test").json()
        again = client.get("/echo", host="one.test").json()
    assert (first["name"], second["name"], again["name"]) == ("one", "two", "one")
    assert header_values(first["headers"], "Host") == [f"127.0.0.1:{one}"]
    assert header_values(second["headers"], "Host") == [f"127.0.0.1:{two}"]
    with Client(dedicated) as client:
        assert client.get("/echo", host="one.test").json()["name"] == "two"


# -- the compiled hot path ----------------------------------------------------


def test_gateway_runs_the_compiled_extension(proxy):
    gw, _ = proxy()
    result = subprocess.run(
        [PYTHON, "-c", "import dynapm._fast.proxy as p; print(p.__file__)"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(".so"), result.stdout
    assert gw.echo("app")["method"] == "GET"
    with open(f"/proc/{gw.process.pid}/maps") as maps:
        mapped = [line for line in maps if "_fast/proxy" in line]
    assert mapped and all(line.rstrip().endswith(".so") for line in mapped), mapped


# -- response framing: heads the gateway frames itself vs httptools ----------
#
# A response whose head arrives whole with one plain Content-Length is framed
# by the gateway (heads.simple_response) and its body counted; anything else
# goes through httptools. These tests pin the edges of that split.


class ScriptedUpstream:
    """An upstream on raw sockets that answers the n-th request head it sees
    (over all connections) with ``replies[n]``: a list of pieces sent with a
    short pause between them, so each tends to arrive as its own read."""

    def __init__(self, replies: list[list[bytes]]):
        self.replies = replies
        self.answered = 0
        self.connections = 0
        self.heads: list[bytes] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(10)
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        for _ in range(len(self.replies)):
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        buffer = b""
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buffer += data
                while b"\r\n\r\n" in buffer:
                    head, _, buffer = buffer.partition(b"\r\n\r\n")
                    with self.lock:
                        self.heads.append(head)
                        reply = self.replies[self.answered]
                        self.answered += 1
                    for i, piece in enumerate(reply):
                        if i:
                            time.sleep(0.03)
                        conn.sendall(piece)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def scripted(gateway):
    """Factory: ``scripted(replies)`` -> (gateway, ScriptedUpstream) for app."""
    made: list[ScriptedUpstream] = []

    def make(replies):
        upstream = ScriptedUpstream(replies)
        made.append(upstream)
        gw = gateway(
            "listen: {listen}\n"
            "services:\n"
            "  app:\n"
            f"    upstream: http://127.0.0.1:{upstream.port}\n"
            "    proxy_only: true\n"
        )
        return gw, upstream

    yield make
    for upstream in made:
        upstream.close()


OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"


def test_length_body_in_pieces_arrives_exactly_and_connection_reused(scripted):
    gw, upstream = scripted(
        [
            [OK_HEAD, b"he", b"l", b"lo"],
            [b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbye"],
        ]
    )
    with Client(gw.port) as client:
        first = client.get("/one")
        second = client.get("/two")
    assert (first.status, first.body) == (200, b"hello")
    assert (second.status, second.body) == (200, b"bye")
    assert upstream.connections == 1


STRAY = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL"


@pytest.mark.parametrize(
    "pieces",
    [
        [OK_HEAD + b"hello" + STRAY],
        [OK_HEAD + b"hel", b"lo" + STRAY],
        [OK_HEAD + b"hello" + STRAY[:17]],
    ],
    ids=["same-read", "later-read", "partial-head"],
)
def test_bytes_beyond_content_length_never_reach_the_client(scripted, pieces):
    # The next answer is chunked, so httptools reads it: on a reused
    # connection whose parser had swallowed the start of a stray head, it
    # would be misread.
    gw, upstream = scripted(
        [
            pieces,
            [
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"4\r\nnext\r\n0\r\n\r\n"
            ],
        ]
    )
    with Client(gw.port) as client:
        first = client.get("/one")
        assert (first.status, first.body) == (200, b"hello")
        # The stray bytes must not pass for the next answer on this
        # connection; the gateway may close it instead.
        try:
            second = client.get("/two")
        except (EOFError, ConnectionError):
            second = None
    if second is None:
        with Client(gw.port) as client:
            second = client.get("/two")
    # The confused upstream connection is not reused either.
    assert (second.status, second.body) == (200, b"next")
    assert upstream.connections == 2


@pytest.mark.parametrize(
    "head, reused",
    [
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n", False),
        (
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\n"
            b"Content-Length: 2\r\n\r\n",
            False,
        ),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n", False),
        (
            b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\n",
            True,
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", True),
    ],
    ids=["close", "close-token", "http10", "http10-keepalive", "http11"],
)
def test_upstream_reuse_follows_the_response_connection_header(scripted, head, reused):
    gw, upstream = scripted([[head + b"ok"], [head + b"ok"]])
    with Client(gw.port) as client:
        for _ in range(2):
            resp = client.get("/")
            assert (resp.status, resp.body) == (200, b"ok")
            assert resp.version == "HTTP/1.1"
            assert resp.get("Connection") is None
    assert upstream.connections == (1 if reused else 2)


def test_head_response_with_length_then_get_on_one_upstream(scripted):
    gw, upstream = scripted(
        [[b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"], [OK_HEAD, b"hello"]]
    )
    with Client(gw.port) as client:
        client.send(b"HEAD / HTTP/1.1\r\nHost: app\r\n\r\n")
        head = client.response(method="HEAD")
        assert head.get("Content-Length") == "1000"
        resp = client.get("/")
    assert (resp.status, resp.body) == (200, b"hello")
    assert upstream.connections == 1


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length:  5 \r\nX-Tab:\tv\r\n\r\nhello",
        b"HTTP/1.1 200\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nX-Name: caf\xc3\xa9\r\nContent-Length: 5\r\n\r\nhello",
    ],
    ids=["chunked", "spaced-length", "no-reason", "obs-text"],
)
def test_responses_either_path_frames_arrive_intact(scripted, head):
    # Sent whole, the gateway frames the length-delimited ones itself (not
    # the chunked one, nor the one with a non-ASCII value); split after 20
    # bytes, httptools frames them all.
    gw, _ = scripted([[head], [head[:20], head[20:]]])
    with Client(gw.port) as client:
        for _ in range(2):
            resp = client.get("/")
            assert (resp.status, resp.body) == (200, b"hello")


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX: a\x01b\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
    ],
    ids=["two-lengths", "space-in-name", "control-char", "signed-length"],
)
def test_malformed_response_heads_get_502_from_either_path(scripted, head):
    gw, _ = scripted([[head]])
    with Client(gw.port) as client:
        resp = client.get("/")
    assert resp.status == 502
    assert b"malformed" in resp.body


# -- request heads: the gateway's own reading vs httptools -------------------
#
# A bodiless request head that arrives whole in one read is read by the
# gateway (heads.simple_request); split over reads, the same head goes
# through httptools. Both must forward exactly the same bytes.


def send_head(client: Client, head: bytes, split: bool) -> None:
    """Send a head in one piece, or in two reads with a pause between them
    (cut inside its request line), so httptools has to read it."""
    if split:
        client.send(head[:8])
        time.sleep(0.05)
        client.send(head[8:])
    else:
        client.send(head)


SAME_EITHER_WAY = [
    b"GET /plain HTTP/1.1\r\nHost: app\r\n\r\n",
    b"GET /a-._~:/?q=1&r=%20#[]@!$'()*+,; HTTP/1.1\r\nHost: app:80\r\n"
    b"User-Agent: t\r\n\r\n",
    b"HEAD / HTTP/1.1\r\nHost: app\r\nX-Pad:   lead and trail  \r\n"
    b"X-Tab:\tv\t\r\nX-Empty:\r\n\r\n",
    b"DELETE /x HTTP/1.1\r\nhost: APP\r\nContent-Length: 0\r\n\r\n",
    b"OPTIONS /x HTTP/1.1\r\nHost: app\r\nConnection: X-Drop, keep-alive\r\n"
    b"X-Drop: gone\r\nX-Keep: kept\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: app\r\nX-Forwarded-For: 10.0.0.1\r\n"
    b"X-Forwarded-For: 10.0.0.2\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: app\r\nKeep-Alive: 5\r\nTE: trailers\r\n"
    b"Proxy-Authorization: x\r\n\r\n",
    # Declined by the gateway's reader (non-ASCII): httptools both ways.
    b"GET /obs HTTP/1.1\r\nHost: app\r\nX-Name: caf\xc3\xa9\r\n\r\n",
    b"GET /ten HTTP/1.0\r\nHost: app\r\n\r\n",
    b"PATCH /p HTTP/1.1\r\nHost: app\r\nExpect: 100-continue\r\n\r\n",
]


@pytest.mark.parametrize("request_head", SAME_EITHER_WAY)
def test_request_head_forwarded_the_same_whole_or_split(scripted, request_head):
    reply = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]
    gw, upstream = scripted([reply, reply])
    method = request_head.split(b" ", 1)[0].decode()
    # Whole: one send, read by the gateway itself. Split: the head arrives in
    # two reads, so httptools reads it.
    with Client(gw.port) as client:
        client.send(request_head)
        whole = client.response(method=method)
    with Client(gw.port) as client:
        send_head(client, request_head, split=True)
        split = client.response(method=method)
    assert whole.status == split.status == 200
    assert whole.raw_head == split.raw_head
    assert len(upstream.heads) == 2
    assert upstream.heads[0] == upstream.heads[1]
    forwarded = upstream.heads[0]
    assert b"X-Drop" not in forwarded and b"Keep-Alive" not in forwarded
    assert b"Proxy-Authorization" not in forwarded and b"\r\nTE:" not in forwarded


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
@pytest.mark.parametrize(
    "request_head, persists",
    [
        (b"GET / HTTP/1.1\r\nHost: app\r\nConnection: close, X-Foo\r\n\r\n", False),
        (b"GET / HTTP/1.1\r\nHost: app\r\nConnection: X-Foo,CLOSE\r\n\r\n", False),
        (b"GET / HTTP/1.1\r\nHost: app\r\nConnection: keep-alive\r\n\r\n", True),
        (b"GET / HTTP/1.0\r\nHost: app\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\nHost: app\r\nConnection: keep-alive\r\n\r\n", True),
    ],
    ids=["close-first", "close-last", "keep-alive", "http10", "http10-keep-alive"],
)
def test_client_connection_header_decides_persistence_either_way(
    scripted, request_head, persists, split
):
    reply = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]
    gw, _ = scripted([reply])
    with Client(gw.port) as client:
        send_head(client, request_head, split)
        resp = client.response()
        assert (resp.status, resp.body) == (200, b"ok")
        assert client.closed_by_peer(timeout=0.5) is not persists


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET /a HTTP/1.1\r\nHost: app\r\nX: a\x7fb\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: app\r\nBad Name: x\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: app\r\nContent-Length: 0\r\n"
        b"Content-Length: 0\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: app\r\nX: a\rb\r\n\r\n",
        b"GET /a HTTP/1.1\nHost: app\r\n\r\n",
        b"get /a HTTP/1.1\r\nHost: app\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: app\r\n X: folded\r\n\r\n",
    ],
    ids=[
        "del-char",
        "space-in-name",
        "two-lengths",
        "bare-cr",
        "bare-lf",
        "lowercase-method",
        "obs-fold",
    ],
)
def test_malformed_request_heads_get_400_whole_or_split(scripted, request_head):
    gw, upstream = scripted([])
    for split in (False, True):
        with Client(gw.port) as client:
            send_head(client, request_head, split)
            resp = client.response()
            assert resp.status == 400, (split, resp.body)
            assert client.closed_by_peer()
    assert upstream.heads == []


MANY_RUNS = b"".join(
    b"X-Keep-%d: v\r\nKeep-Alive: timeout=%d\r\n" % (i, i) for i in range(20)
)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nServer: t\r\nConnection: keep-alive\r\n"
        b"Keep-Alive: timeout=5\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nProxy-Thing: x\r\nTE: trailers\r\nTrailer: X\r\n"
        b"Upgrade: h2c\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
        b"Content-Length: 5\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: X-Custom\r\nX-Custom: gone\r\n"
        b"X-Other: kept\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + MANY_RUNS + b"Content-Length: 5\r\n\r\n",
    ],
    ids=["keep-alive", "hop-by-hop", "connection-names", "http10", "many-runs"],
)
def test_response_head_rewritten_the_same_whole_or_split(scripted, head):
    # Whole: head and body in one read, rewritten from simple_response's
    # reading. Split: the head arrives in two reads, so httptools reads it.
    gw, _ = scripted([[head + b"hello"], [head[:20], head[20:] + b"hello"]])
    seen = []
    for _ in range(2):
        with Client(gw.port) as client:
            resp = client.get("/")
            assert (resp.status, resp.body) == (200, b"hello")
            seen.append(resp.raw_head)
    assert seen[0] == seen[1]
    lowered = seen[0].lower()
    for gone in (
        b"keep-alive",
        b"proxy-thing",
        b"te:",
        b"trailer",
        b"upgrade",
        b"x-custom",
        b"connection",
    ):
        assert gone not in lowered, seen[0]
    assert seen[0].startswith(b"HTTP/1.1 200 OK\r\n")


# -- smuggling through hop-by-hop rules ---------------------------------------


@pytest.mark.parametrize(
    "framing, body",
    [
        (b"Content-Length: 39", b"GET /admin HTTP/1.1\r\nHost: internal\r\n\r\n"),
        (
            b"Transfer-Encoding: chunked",
            b"27\r\nGET /admin HTTP/1.1\r\nHost: internal\r\n\r\n\r\n0\r\n\r\n",
        ),
    ],
    ids=["content-length", "transfer-encoding"],
)
def test_connection_cannot_strip_the_request_framing(raw_upstream, framing, body):
    name = framing.split(b":")[0].lower()
    gw, upstream = raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    with Client(gw.port) as client:
        client.send(
            b"POST / HTTP/1.1\r\nHost: app\r\nConnection: "
            + name
            + b"\r\n"
            + framing
            + b"\r\n\r\n"
            + body
        )
        resp = client.response()
    assert (resp.status, resp.body) == (200, b"ok")
    upstream.close()
    head, _, forwarded = bytes(upstream.received).partition(b"\r\n\r\n")
    # The body goes upstream as the body it is, with the framing that says
    # so: never as a request of its own.
    assert framing + b"\r\n" in head + b"\r\n"
    assert forwarded == body


def test_connection_cannot_strip_the_response_length(scripted):
    head = b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 5\r\n\r\n"
    gw, _ = scripted([[head + b"hello"], [head[:20], head[20:] + b"hello"]])
    with Client(gw.port) as client:
        for _ in range(2):
            resp = client.get("/")
            assert resp.get("Content-Length") == "5"
            assert resp.body == b"hello"


def test_h2c_upgrade_request_with_a_body_is_refused(scripted):
    gw, upstream = scripted([[b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]])
    body = b"GET /admin HTTP/1.1\r\nHost: app\r\n\r\n"
    with Client(gw.port) as client:
        client.send(
            b"POST / HTTP/1.1\r\nHost: app\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        resp = client.response()
        assert resp.status == 400
        assert b"Upgrade" in resp.body
        assert client.closed_by_peer()
    assert upstream.heads == []


def test_h2c_upgrade_request_without_a_body_is_forwarded_plain(scripted):
    gw, upstream = scripted([[b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]] * 2)
    with Client(gw.port) as client:
        client.send(
            b"GET / HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\n"
            b"Upgrade: h2c\r\n\r\n"
        )
        assert client.response().status == 200
        assert client.get("/next").status == 200
    assert b"h2c" not in upstream.heads[0]
    assert upstream.heads[1].startswith(b"GET /next ")
