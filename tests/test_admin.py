"""The admin API, metrics, event stream and admin CLI against a real gateway.

Each test writes its own configuration with an ``admin`` section, starts the
gateway with the ``gateway`` fixture and talks to the admin listener over
loopback with http.client or raw sockets.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import PYTHON, ROOT, backend_command, free_port, port_open, wait_for
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.timeout(60)

INFO_FIELDS = {
    "name",
    "status",
    "upstream",
    "hosts",
    "ports",
    "routes",
    "active_connections",
    "last_request_at",
    "started_at",
    "start_count",
    "last_start_ms",
    "total_uptime_s",
    "idle_timeout_s",
    "proxy_only",
    "pid",
}


# -- helpers ------------------------------------------------------------------


class Admin:
    """A running gateway with an admin listener, and a client for it."""

    def __init__(self, gw, port: int, backend: int, token: str | None):
        self.gw = gw
        self.port = port
        self.backend = backend
        self.token = token

    def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = "default",
        headers: dict | None = None,
        timeout: float = 30,
    ):
        """One request on a new connection; returns (status, headers, body)."""
        all_headers = dict(headers or {})
        token = self.token if token == "default" else token
        if token:
            all_headers["Authorization"] = f"Bearer {token}"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, headers=all_headers)
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, expect: int = 200, **kwargs):
        status, _, body = self.call(method, path, **kwargs)
        assert status == expect, body
        return json.loads(body)

    def info(self, name: str = "app") -> dict:
        return self.json("GET", f"/api/services/{name}")

    def metrics(self) -> dict:
        status, headers, body = self.call("GET", "/metrics")
        assert status == 200, body
        assert headers["Content-Type"].startswith("text/plain")
        samples = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                samples[key] = sample.value
        return samples

    def cli(self, *args: str, env: dict | None = None, timeout: float = 60):
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("DYNAPM_")}
        full_env.update(env or {})
        return subprocess.run(
            [PYTHON, "-m", "dynapm", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
            cwd=ROOT,
        )


def start_admin(
    gateway,
    ports,
    tmp_path,
    *,
    token: str | None = None,
    allow: str | None = None,
    idle: str = "30s",
    boot_delay: float = 0.2,
    extra: str = "",
    top: str = "",
) -> Admin:
    backend = ports()
    admin_port = ports()
    proxied = ports()
    lines = [f"  listen: 127.0.0.1:{admin_port}"]
    if token is not None:
        lines.append(f"  token: {token}")
    if allow is not None:
        lines.append(f"  allow: {allow}")
    admin_section = "\n".join(lines)
    command = backend_command(backend, f"--boot-delay {boot_delay}")
    config = (
        "listen: {listen}\n"
        f"{top}"
        "admin:\n"
        f"{admin_section}\n"
        "services:\n"
        "  app:\n"
        f"    upstream: http://127.0.0.1:{backend}\n"
        f"    run: {command}\n"
        f"    idle_timeout: {idle}\n"
        "  static:\n"
        f"    upstream: http://127.0.0.1:{proxied}\n"
        "    hosts: [static.test]\n"
        "    proxy_only: true\n"
        f"{extra}"
    )
    gw = gateway(config, backend_ports=[backend])
    wait_for(lambda: port_open(admin_port) or gw.process.poll() is not None)
    assert gw.process.poll() is None, gw.log()
    return Admin(gw, admin_port, backend, token)


class EventStream:
    """An SSE subscription read in a thread; events land in ``events``."""

    def __init__(self, admin: Admin):
        self.conn = http.client.HTTPConnection("127.0.0.1", admin.port, timeout=30)
        headers = {"Accept": "text/event-stream"}
        if admin.token:
            headers["Authorization"] = f"Bearer {admin.token}"
        self.conn.request("GET", "/api/events", headers=headers)
        self.sock = self.conn.sock
        self.response = self.conn.getresponse()
        assert self.response.status == 200
        assert self.response.getheader("Content-Type").startswith("text/event-stream")
        self.events: list[dict] = []
        self.comments: list[str] = []
        self.ended = threading.Event()
        self.clean_end = False
        # The server writes a comment once the subscription is in place.
        first = self.response.readline().decode()
        assert first.startswith(":"), first
        self.comments.append(first.strip())
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        kind, data = None, []
        try:
            while True:
                line = self.response.readline()
                if not line:
                    # http.client raises IncompleteRead on a cut chunked body;
                    # a plain end means the terminating chunk arrived.
                    self.clean_end = True
                    return
                text = line.decode().rstrip("\r\n")
                if text.startswith(":"):
                    self.comments.append(text)
                elif text.startswith("event:"):
                    kind = text.partition(":")[2].strip()
                elif text.startswith("data:"):
                    data.append(text.partition(":")[2].strip())
                elif text == "" and data:
                    assert kind == "state"
                    self.events.append(json.loads("\n".join(data)))
                    kind, data = None, []
        except (OSError, http.client.HTTPException):
            return
        finally:
            self.ended.set()

    def transitions(self, service: str = "app") -> list[tuple[str, str]]:
        return [(e["from"], e["to"]) for e in self.events if e["service"] == service]

    def wait_for(self, transition: tuple[str, str], timeout: float = 15) -> None:
        wait_for(lambda: transition in self.transitions(), timeout=timeout)

    def close(self) -> None:
        # Shut the socket down first so the reader thread ends on its own
        # before http.client tears the response object down under it.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.thread.join(10)
        self.conn.close()


def raw_exchange(port: int, data: bytes, timeout: float = 5) -> bytes:
    """Send raw bytes, read until the server closes (or times out)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)


# -- endpoints ----------------------------------------------------------------


def test_services_list_and_one(gateway, ports, tmp_path):
    admin = start_admin(gateway, ports, tmp_path)
    listing = admin.json("GET", "/api/services")
    by_name = {info["name"]: info for info in listing["services"]}
    assert set(by_name) == {"app", "static"}
    for info in by_name.values():
        assert set(info) == INFO_FIELDS

    app = by_name["app"]
    assert app["status"] == "offline"
    assert app["upstream"] == f"http://127.0.0.1:{admin.backend}"
    assert app["routes"] == [
        {"host": "app", "upstream": f"http://127.0.0.1:{admin.backend}"}
    ]
    assert app["pid"] is None and app["started_at"] is None
    assert app["start_count"] == 0 and app["last_request_at"] is None
    assert app["idle_timeout_s"] == 30
    assert app["proxy_only"] is False

    static = by_name["static"]
    assert static["proxy_only"] is True and static["status"] == "online"

    assert admin.info("app") == app
    status, headers, body = admin.call("GET", "/api/services/nope")
    assert status == 404
    assert headers["Content-Type"].startswith("text/plain")


def test_start_stop_endpoints_wait_for_the_state(gateway, ports, tmp_path):
    admin = start_admin(gateway, ports, tmp_path, boot_delay=0.5)
    begun = time.monotonic()
    info = admin.json("POST", "/api/services/app/start")
    assert time.monotonic() - begun >= 0.4  # it waited for the start
    assert info["status"] == "online"
    assert info["start_count"] == 1 and info["last_start_ms"] >= 400
    assert isinstance(info["pid"], int) and info["started_at"] > 0
    assert port_open(admin.backend)

    # A start of a running service answers at once, without a second start.
    again = admin.json("POST", "/api/services/app/start")
    assert again["start_count"] == 1 and again["pid"] == info["pid"]

    # Traffic shows up in the ServiceInfo.
    assert admin.gw.echo("app")["pid"] == info["pid"]
    assert admin.info()["last_request_at"] >= info["started_at"]

    stopped = admin.json("POST", "/api/services/app/stop")
    assert stopped["status"] == "offline" and stopped["pid"] is None
    assert stopped["total_uptime_s"] > 0
    assert not port_open(admin.backend)
    # Stopping an offline service is a no-op that still answers 200.
    assert admin.json("POST", "/api/services/app/stop")["status"] == "offline"


def test_proxy_only_start_stop_conflict(gateway, ports, tmp_path):
    admin = start_admin(gateway, ports, tmp_path)
    for action in ("start", "stop"):
        body = admin.json("POST", f"/api/services/static/{action}", expect=409)
        assert "proxy_only" in body["error"]
    assert admin.info("static")["status"] == "online"


def test_start_failure_is_503_with_the_reason(gateway, ports, tmp_path):
    admin = start_admin(
        gateway,
        ports,
        tmp_path,
        extra=(
            "  broken:\n"
            f"    upstream: http://127.0.0.1:{free_port()}\n"
            "    run: echo cannot open database >&2; exit 3\n"
            "    start_timeout: 5s\n"
        ),
    )
    status, headers, body = admin.call("POST", "/api/services/broken/start")
    assert status == 503
    error = json.loads(body)["error"]
    assert "broken" in error and "status 3" in error
    assert "cannot open database" in error
    assert headers["Retry-After"]
    assert admin.info("broken")["status"] == "offline"


def test_methods_unknown_paths_and_keep_alive(gateway, ports, tmp_path):
    admin = start_admin(gateway, ports, tmp_path)
    status, headers, _ = admin.call("GET", "/api/services/app/start")
    assert status == 405 and headers["Allow"] == "POST"
    status, headers, _ = admin.call("POST", "/api/services")
    assert status == 405 and "GET" in headers["Allow"]
    assert admin.call("DELETE", "/api/services/app")[0] == 405
    assert admin.call("GET", "/nothing")[0] == 404
    assert admin.call("GET", "/api/services/app/restart")[0] == 404

    status, headers, body = admin.call("HEAD", "/api/services")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0

    # Several requests on one connection, then a pipelined pair.
    conn = http.client.HTTPConnection("127.0.0.1", admin.port, timeout=10)
    for _ in range(3):
        conn.request("GET", "/api/services/app")
        response = conn.getresponse()
        assert response.status == 200
        assert json.loads(response.read())["name"] == "app"
    conn.close()
    reply = raw_exchange(
        admin.port,
        b"GET /api/services/app HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        b"GET /api/services/static HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert reply.count(b"HTTP/1.1 200 OK") == 2
    assert reply.index(b'"name":"app"') < reply.index(b'"name":"static"')


def test_http10_event_stream_and_idle_timeouts(gateway, ports, tmp_path):
    admin = start_admin(
        gateway,
        ports,
        tmp_path,
        top="limits: {header_timeout: 500ms, keepalive_timeout: 1s}\n",
    )
    # HTTP/1.0 gets no chunked framing: the stream ends with the connection.
    with socket.create_connection(("127.0.0.1", admin.port), timeout=5) as sock:
        sock.sendall(b"GET /api/events HTTP/1.0\r\n\r\n")
        received = b""
        while b": subscribed" not in received:
            received += sock.recv(4096)
    head = received.split(b"\r\n\r\n")[0]
    assert b"Connection: close" in head and b"chunked" not in head

    # A client that never finishes its head is closed after header_timeout,
    # an idle keep-alive one after keepalive_timeout.
    for data, limit in ((b"GET / HTTP/1.1\r\n", 0.5), (b"", 0.5)):
        with socket.create_connection(("127.0.0.1", admin.port), timeout=5) as sock:
            begun = time.monotonic()
            sock.sendall(data)
            assert sock.recv(100) == b""
            assert limit * 0.8 < time.monotonic() - begun < limit + 2
    with socket.create_connection(("127.0.0.1", admin.port), timeout=5) as sock:
        sock.sendall(b"GET /api/services/app HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        begun = time.monotonic()
        received = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        assert received.startswith(b"HTTP/1.1 200 ")
        assert 0.8 < time.monotonic() - begun < 3


def test_malformed_and_oversized_requests(gateway, ports, tmp_path):
    admin = start_admin(gateway, ports, tmp_path)
    reply = raw_exchange(admin.port, b"NOT HTTP AT ALL\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 ")
    huge = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n"
    assert raw_exchange(admin.port, huge).startswith(b"HTTP/1.1 431 ")
    body = b"x" * 70000
    reply = raw_exchange(
        admin.port,
        b"POST /api/services/app/start HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
    )
    assert reply.startswith(b"HTTP/1.1 413 ")
    assert admin.info()["status"] == "offline"
    # The listener still serves after all that.
    assert admin.call("GET", "/api/services")[0] == 200


# -- security -----------------------------------------------------------------


def test_peer_outside_allow_is_403_even_with_forwarded_headers(
    gateway, ports, tmp_path
):
    # 127.0.0.1 is outside 10.0.0.0/8; no traffic goes to 10.x at all.
    admin = start_admin(gateway, ports, tmp_path, token="s3cret", allow="[10.0.0.0/8]")
    spoof = {
        "X-Forwarded-For": "127.0.0.1",
        "X-Real-IP": "10.1.2.3",
        "Forwarded": "for=10.1.2.3",
    }
    for method, path in (
        ("GET", "/"),
        ("GET", "/api/services"),
        ("GET", "/api/services/app"),
        ("POST", "/api/services/app/start"),
        ("GET", "/api/events"),
        ("GET", "/metrics"),
        ("GET", "/nothing"),
    ):
        status, headers, body = admin.call(method, path, headers=spoof)
        assert status == 403, (method, path)
        assert body == b"forbidden\n"
        assert "WWW-Authenticate" not in headers
    assert not port_open(admin.backend)


def test_token_required_except_for_the_page(gateway, ports, tmp_path):
    admin = start_admin(gateway, ports, tmp_path, token="s3cret")
    for token in (None, "wrong", "s3cret-and-more", "s3cre"):
        for method, path in (
            ("GET", "/api/services"),
            ("GET", "/api/services/app"),
            ("GET", "/api/services/nope"),
            ("POST", "/api/services/app/start"),
            ("GET", "/api/events"),
            ("GET", "/metrics"),
        ):
            status, headers, body = admin.call(method, path, token=token)
            assert status == 401, (token, method, path)
            assert body == b"unauthorized\n"
            assert headers["WWW-Authenticate"].startswith("Bearer")
    status, _, _ = admin.call(
        "GET", "/api/services", token=None, headers={"Authorization": "Basic s3cret"}
    )
    assert status == 401
    assert not port_open(admin.backend)

    status, headers, body = admin.call("GET", "/", token=None)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b"<table" in body
    assert "script-src 'sha256-" in headers["Content-Security-Policy"]
    assert admin.call("GET", "/api/services")[0] == 200
    # With a token, any Host name may be used (a rebinding page has no token).
    named = {"Host": f"gateway.internal:{admin.port}"}
    assert admin.call("GET", "/api/services", headers=named)[0] == 200


def test_host_and_origin_checks(gateway, ports, tmp_path):
    admin = start_admin(gateway, ports, tmp_path)
    # Without a token a DNS-rebound name must not reach the API.
    status, _, body = admin.call("GET", "/api/services", headers={"Host": "evil.test"})
    assert status == 403 and body == b"forbidden\n"
    for host in ("localhost:1", f"127.0.0.1:{admin.port}", "[::1]:9"):
        assert admin.call("GET", "/api/services", headers={"Host": host})[0] == 200
    # A cross-site page cannot make the browser start a service.
    status, _, _ = admin.call(
        "POST", "/api/services/app/stop", headers={"Origin": "http://evil.test"}
    )
    assert status == 403
    same = {"Origin": f"http://127.0.0.1:{admin.port}"}
    assert admin.call("POST", "/api/services/app/stop", headers=same)[0] == 200


TRICKS = [
    "/api/services/..",
    "/api/services/.",
    "/api/services/%2e%2e",
    "/api/services/%2E%2E",
    "/api/services/.%2e",
    "/api/services/%252e%252e",
    "/api/services/..%2fapp",
    "/api/services/..%2Fapp",
    "/api/services/app%2f",
    "/api/services/app%2Fstart",
    "/api/services/app%252fstart",
    "/api/services/app%25252fstart",
    "/api/services/%61pp",
    "/api/services/app%00",
    "/api/services/app%5c..",
    "/api/services/../services/app",
    "/api/services/app/../app",
    "/api/services//app",
    "/api/services/app/",
    "/api/services/APP",
    "/api/services/",
]


def test_name_path_tricks_are_404(gateway, ports, tmp_path):
    admin = start_admin(gateway, ports, tmp_path)
    for path in TRICKS:
        assert admin.call("GET", path)[0] == 404, path
        status, _, _ = admin.call("POST", path + "/start")
        assert status == 404, path
    assert admin.call("POST", "/api/services/app/../app/start")[0] == 404
    assert admin.call("POST", "/api/services/app%2fstart")[0] == 404
    assert not port_open(admin.backend)
    assert admin.info()["start_count"] == 0


# -- events -------------------------------------------------------------------


def test_events_for_a_cold_start_and_an_idle_stop(gateway, ports, tmp_path):
    admin = start_admin(gateway, ports, tmp_path, idle="1s")
    stream = EventStream(admin)
    try:
        admin.gw.echo("app")
        stream.wait_for(("starting", "online"))
        stream.wait_for(("stopping", "offline"), timeout=10)
        assert stream.transitions() == [
            ("offline", "starting"),
            ("starting", "online"),
            ("online", "stopping"),
            ("stopping", "offline"),
        ]
        for event in stream.events:
            assert set(event) == {"service", "from", "to", "at"}
            assert abs(event["at"] - time.time()) < 30
        assert not stream.ended.is_set()
    finally:
        stream.close()


def test_many_subscribers_closed_cleanly_on_shutdown(gateway, ports, tmp_path):
    admin = start_admin(gateway, ports, tmp_path)
    streams = [EventStream(admin) for _ in range(5)]
    try:
        admin.json("POST", "/api/services/app/start")
        for stream in streams:
            stream.wait_for(("starting", "online"))
        begun = time.monotonic()
        assert admin.gw.stop() == 0, admin.gw.log()
        for stream in streams:
            assert stream.ended.wait(5)
            assert stream.clean_end
        assert time.monotonic() - begun < 10
    finally:
        for stream in streams:
            stream.close()


def test_heartbeat_and_close_in_process(tmp_path):
    """The heartbeat comment, with a short interval, and close() ending streams."""
    from dynapm import config
    from dynapm.admin import AdminServer
    from dynapm.gateway import Gateway

    port = free_port()
    text = (
        "listen: 127.0.0.1:1\n"
        f"admin: {{listen: '127.0.0.1:{port}'}}\n"
        "services:\n"
        "  app: {upstream: 'http://127.0.0.1:9', proxy_only: true}\n"
    )

    async def scenario() -> bytes:
        loaded = config.loads(text, str(tmp_path / "conf.yaml"))
        gw = Gateway(loaded, asyncio.get_running_loop())
        admin = AdminServer(gw, heartbeat=0.2)
        await admin.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        received = b""
        while received.count(b": heartbeat") < 2:
            received += await asyncio.wait_for(reader.read(4096), 5)
        await admin.close()
        received += await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return received

    received = asyncio.run(scenario())
    assert b"Transfer-Encoding: chunked" in received
    assert b": subscribed" in received
    assert received.endswith(b"0\r\n\r\n")


# -- metrics ------------------------------------------------------------------


def test_metrics_change_after_traffic(gateway, ports, tmp_path):
    admin = start_admin(gateway, ports, tmp_path)
    app = (("service", "app"),)

    def labels(**extra):
        return tuple(sorted((("service", "app"), *extra.items())))

    before = admin.metrics()
    assert before[("dynapm_requests_total", labels(status_class="2xx"))] == 0
    assert before[("dynapm_cold_starts_total", app)] == 0
    assert before[("dynapm_service_state", labels(state="offline"))] == 1
    assert before[("dynapm_service_state", labels(state="online"))] == 0
    assert before[("dynapm_cold_start_duration_seconds_count", app)] == 0

    for _ in range(3):
        admin.gw.echo("app", method="POST", body=b"x" * 1000)
    status, _, _ = admin.gw.request("app", path="/status/404")
    assert status == 404

    after = admin.metrics()
    assert after[("dynapm_requests_total", labels(status_class="2xx"))] == 3
    assert after[("dynapm_requests_total", labels(status_class="4xx"))] == 1
    assert after[("dynapm_requests_received_total", app)] == 4
    assert after[("dynapm_cold_starts_total", app)] == 1
    assert after[("dynapm_cold_start_duration_seconds_count", app)] == 1
    assert after[("dynapm_cold_start_duration_seconds_sum", app)] >= 0.2
    assert after[("dynapm_cold_start_duration_seconds_bucket", labels(le="0.1"))] == 0
    assert after[("dynapm_cold_start_duration_seconds_bucket", labels(le="+Inf"))] == 1
    assert after[("dynapm_service_state", labels(state="online"))] == 1
    assert after[("dynapm_service_state", labels(state="offline"))] == 0
    assert after[("dynapm_active_connections", app)] == 0
    assert after[("dynapm_bytes_in_total", app)] >= 3000
    assert after[("dynapm_bytes_out_total", app)] > 0
    assert after[("dynapm_upstream_errors_total", app)] == 0
    assert ("process_resident_memory_bytes", ()) in after

    # An upstream error: the proxy_only service has nothing listening.
    status, _, _ = admin.gw.request("static.test")
    assert status == 502
    errors = admin.metrics()[("dynapm_upstream_errors_total", (("service", "static"),))]
    assert errors == 1


# -- racing with traffic ------------------------------------------------------


def test_start_and_stop_racing_with_traffic_lose_no_request(gateway, ports, tmp_path):
    admin = start_admin(gateway, ports, tmp_path, boot_delay=0.1)
    statuses: list[int] = []
    failures: list[str] = []
    done = threading.Event()

    def client() -> None:
        # Bounded: at most 400 requests per thread.
        for _ in range(400):
            if done.is_set():
                return
            try:
                status, _, body = admin.gw.request("app", path="/echo")
            except (OSError, http.client.HTTPException) as err:
                failures.append(repr(err))
                continue
            statuses.append(status)
            if status != 200:
                failures.append(f"{status}: {body[:200]!r}")

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(4):
            time.sleep(0.3)
            assert admin.call("POST", "/api/services/app/stop")[0] == 200
            time.sleep(0.2)
            assert admin.call("POST", "/api/services/app/start")[0] == 200
    finally:
        done.set()
        for thread in threads:
            thread.join(60)
    assert not failures, failures[:5]
    assert len(statuses) > 50
    assert admin.info()["start_count"] >= 4


# -- IPv6 and the allow list --------------------------------------------------


def test_peer_allowed_handles_ipv4_mapped_and_ipv6():
    import ipaddress
    from types import SimpleNamespace

    from dynapm.admin import AdminServer

    admin = AdminServer.__new__(AdminServer)
    admin.config = SimpleNamespace(
        allow=(
            ipaddress.ip_network("127.0.0.1/32"),
            ipaddress.ip_network("::1/128"),
            ipaddress.ip_network("fd00::/8"),
        )
    )
    assert admin.peer_allowed("127.0.0.1")
    assert admin.peer_allowed("::ffff:127.0.0.1")
    assert admin.peer_allowed("::1")
    assert admin.peer_allowed("fd12::5")
    assert not admin.peer_allowed("127.0.0.2")
    assert not admin.peer_allowed("::ffff:10.0.0.1")
    assert not admin.peer_allowed("fe80::1%lo")
    assert not admin.peer_allowed("not an address")


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_admin_on_ipv6_loopback(gateway, ports, tmp_path):
    admin_port = ports()
    backend = ports()
    gw = gateway(
        f"""
        listen: {{listen}}
        admin:
          listen: "[::1]:{admin_port}"
        services:
          app:
            upstream: http://127.0.0.1:{backend}
            proxy_only: true
        """
    )
    wait_for(lambda: port_open(admin_port, "::1") or gw.process.poll() is not None)
    conn = http.client.HTTPConnection("::1", admin_port, timeout=10)
    try:
        conn.request("GET", "/api/services")
        response = conn.getresponse()
        assert response.status == 200
        assert json.loads(response.read())["services"][0]["name"] == "app"
    finally:
        conn.close()


def test_admin_port_in_use_exits_1_naming_it(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        path = tmp_path / "conf.yaml"
        path.write_text(
            f"listen: 127.0.0.1:{free_port()}\n"
            f"admin: {{listen: '127.0.0.1:{taken}'}}\n"
            "services:\n"
            "  app: {upstream: 'http://127.0.0.1:9', proxy_only: true}\n"
        )
        result = subprocess.run(
            [PYTHON, "-m", "dynapm", "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{taken}: address already in use" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


# -- CLI ----------------------------------------------------------------------


def test_cli_status_start_stop(gateway, ports, tmp_path):
    admin = start_admin(gateway, ports, tmp_path, token="s3cret")
    conf = str(admin.gw.config_path)

    result = admin.cli("status", "-c", conf)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["NAME", "STATUS"]
    rows = {line.split()[0]: line.split()[1] for line in lines[1:]}
    assert rows == {"app": "offline", "static": "online"}

    result = admin.cli("start", "app", "-c", conf)
    assert result.returncode == 0, result.stderr
    pid = admin.info()["pid"]
    assert result.stdout.startswith(f"app: online (pid {pid}")
    assert port_open(admin.backend)

    # The same through --admin/--token, and through the environment.
    address = f"127.0.0.1:{admin.port}"
    result = admin.cli("status", "--admin", address, "--token", "s3cret")
    assert result.returncode == 0, result.stderr
    assert any(
        line.split()[:3] == ["app", "online", str(pid)]
        for line in result.stdout.splitlines()
    )
    env = {"DYNAPM_ADMIN": address, "DYNAPM_TOKEN": "s3cret"}
    result = admin.cli("status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert {s["name"] for s in json.loads(result.stdout)["services"]} == {
        "app",
        "static",
    }

    result = admin.cli("stop", "app", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "app: offline"
    assert not port_open(admin.backend)

    result = admin.cli("start", "nope", env=env)
    assert result.returncode == 1
    assert result.stderr.strip() == "dynapm: no service named 'nope'"
    result = admin.cli("start", "static", env=env)
    assert result.returncode == 1 and "proxy_only" in result.stderr

    result = admin.cli("status", "--admin", address, "--token", "wrong")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "token" in result.stderr


def test_cli_admin_off_and_unreachable(tmp_path):
    path = tmp_path / "conf.yaml"
    path.write_text(
        "listen: 127.0.0.1:3999\n"
        "services:\n"
        "  app: {upstream: 'http://127.0.0.1:9', proxy_only: true}\n"
    )
    admin = Admin(None, 0, 0, None)
    result = admin.cli("status", "-c", str(path))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"dynapm: the admin API is off in {path} (no 'admin' section)"
    )
    assert result.stdout == ""

    port = free_port()
    for args, env in (
        (("status", "--admin", f"127.0.0.1:{port}"), {}),
        (("stop", "app"), {"DYNAPM_ADMIN": f"127.0.0.1:{port}"}),
    ):
        result = admin.cli(*args, env=env)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(
            f"dynapm: cannot reach the admin API at 127.0.0.1:{port}"
        )

    result = admin.cli("status", "--admin", "not-an-address")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1

    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: [\n")
    assert admin.cli("status", "-c", str(bad)).returncode == 2


def test_cli_keeps_existing_behaviour(tmp_path):
    admin = Admin(None, 0, 0, None)
    result = admin.cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("dynapm ")
    path = tmp_path / "conf.yaml"
    path.write_text(
        "listen: 127.0.0.1:3999\n"
        "services:\n"
        "  app: {upstream: 'http://127.0.0.1:9', proxy_only: true}\n"
    )
    result = admin.cli("check", "-c", str(path))
    assert result.returncode == 0 and "OK" in result.stdout
    assert Path(path).exists()
