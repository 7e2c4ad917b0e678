"""Readiness probes against real sockets and processes on 127.0.0.1."""

import asyncio
import logging
import socket
import threading
import time
from dataclasses import dataclass

import pytest
import uvloop

from dynapm.health import NotReady, probe_once, wait_ready

pytestmark = pytest.mark.timeout(10)


@dataclass(frozen=True)
class Health:
    type: str = "tcp"
    url: str | None = None
    expect_status: int | None = None
    command: str | None = None
    interval: float = 0.01
    timeout: float = 1.0


@dataclass(frozen=True)
class Upstream:
    host: str
    port: int

    @property
    def hostport(self) -> str:
        return f"{self.host}:{self.port}"


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    if request.param == "uvloop":
        return uvloop.run
    return asyncio.run


def process_running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie waiting for its reaper."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rpartition(b")")[2].split()[0]
    except OSError:
        return False
    return state not in (b"Z", b"X")


def free_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TinyHTTP:
    """An asyncio HTTP server answering every request with one canned reply."""

    def __init__(self, reply: bytes = b"", *, silent: bool = False) -> None:
        self.reply = reply
        self.silent = silent
        self.heads: list[bytes] = []
        self.server: asyncio.base_events.Server | None = None

    async def __aenter__(self) -> Upstream:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return Upstream("127.0.0.1", port)

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader, writer) -> None:
        try:
            self.heads.append(await reader.readuntil(b"\r\n\r\n"))
            if self.silent:
                await reader.read()
                return
            writer.write(self.reply)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def reply(status: str, body: bytes = b"ok") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


# tcp


def test_tcp_passes_when_listening(run):
    async def scenario():
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await probe_once(Health(), Upstream("127.0.0.1", port))

    assert run(scenario()) == (True, "connected")


def test_tcp_refused(run):
    result = run(probe_once(Health(), Upstream("127.0.0.1", free_port())))
    assert result == (False, "connection refused")


def test_tcp_ipv6_literal(run):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")

    async def scenario():
        try:
            server = await asyncio.start_server(lambda r, w: w.close(), "::1", 0)
        except OSError:
            pytest.skip("::1 not available")
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await probe_once(Health(), Upstream("::1", port))

    assert run(scenario()) == (True, "connected")


def test_tcp_probe_uses_no_threads(run):
    async def scenario():
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        before = threading.active_count()
        async with server:
            for _ in range(20):
                ok, _ = await probe_once(Health(), Upstream("127.0.0.1", port))
                assert ok
        return before, threading.active_count()

    before, after = run(scenario())
    assert after == before


# http


def test_http_passes_and_sends_a_proper_request(run):
    server = TinyHTTP(reply("200 OK"))

    async def scenario():
        async with server as upstream:
            url = f"http://{upstream.hostport}/health?deep=1"
            return await probe_once(Health("http", url=url), upstream)

    assert run(scenario()) == (True, "status 200")
    head = server.heads[0].decode()
    request_line, *headers = head.split("\r\n")
    assert request_line == "GET /health?deep=1 HTTP/1.1"
    port = head.split("Host: 127.0.0.1:")[1].split("\r\n")[0]
    assert port.isdigit()
    assert "Connection: close" in headers


def test_http_defaults_to_upstream_root(run):
    server = TinyHTTP(reply("204 No Content", b""))

    async def scenario():
        async with server as upstream:
            return upstream, await probe_once(Health("http"), upstream)

    upstream, result = run(scenario())
    assert result == (True, "status 204")
    assert server.heads[0].startswith(b"GET / HTTP/1.1\r\n")
    assert f"Host: {upstream.hostport}\r\n".encode() in server.heads[0]


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("200 OK", (True, "status 200")),
        ("302 Found", (True, "status 302")),
        ("399 Odd", (True, "status 399")),
        ("404 Not Found", (False, "status 404 (want 2xx or 3xx)")),
        ("500 Oops", (False, "status 500 (want 2xx or 3xx)")),
    ],
)
def test_http_any_2xx_or_3xx_passes(run, status, expected):
    async def scenario():
        async with TinyHTTP(reply(status)) as upstream:
            return await probe_once(Health("http"), upstream)

    assert run(scenario()) == expected


def test_http_expect_status(run):
    async def scenario():
        async with TinyHTTP(reply("500 Internal Server Error")) as upstream:
            mismatch = await probe_once(Health("http", expect_status=200), upstream)
            match = await probe_once(Health("http", expect_status=500), upstream)
            return mismatch, match

    mismatch, match = run(scenario())
    assert mismatch == (False, "status 500 (want 200)")
    assert match == (True, "status 500")


def test_http_skips_interim_responses(run):
    early = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"

    async def scenario():
        async with TinyHTTP(early + reply("201 Created")) as upstream:
            return await probe_once(Health("http"), upstream)

    assert run(scenario()) == (True, "status 201")


def test_http_garbage_and_silence(run):
    async def scenario():
        async with TinyHTTP(b"SSH-2.0-OpenSSH\r\n") as upstream:
            garbage = await probe_once(Health("http"), upstream)
        async with TinyHTTP(b"") as upstream:
            closed = await probe_once(Health("http"), upstream)
        async with TinyHTTP(silent=True) as upstream:
            started = time.monotonic()
            silent = await probe_once(Health("http", timeout=0.2), upstream)
            elapsed = time.monotonic() - started
        return garbage, closed, silent, elapsed

    garbage, closed, silent, elapsed = run(scenario())
    assert garbage == (False, "not an HTTP response: 'SSH-2.0-OpenSSH'")
    assert closed == (False, "connection closed without a response")
    assert silent == (False, "timed out after 0.2s")
    assert elapsed < 0.5


def test_http_refused_and_bad_scheme(run):
    port = free_port()
    refused = run(probe_once(Health("http"), Upstream("127.0.0.1", port)))
    assert refused == (False, "connection refused")
    https = Health("http", url=f"https://127.0.0.1:{port}/")
    result = run(probe_once(https, Upstream("127.0.0.1", port)))
    assert result == (False, "unsupported URL scheme 'https' (http only)")


# command and none


def test_command_probe(run, tmp_path):
    upstream = Upstream("127.0.0.1", free_port())
    assert run(probe_once(Health("command", command="true"), upstream)) == (
        True,
        "exited with status 0",
    )
    failing = Health("command", command="echo not yet; exit 1")
    assert run(probe_once(failing, upstream)) == (
        False,
        "exited with status 1: not yet",
    )
    with_env = Health("command", command='test "$(pwd)" = "$WANT"')
    ok, _ = run(
        probe_once(with_env, upstream, cwd=str(tmp_path), env=[("WANT", str(tmp_path))])
    )
    assert ok
    slow = Health("command", command="sleep 5", timeout=0.2)
    assert run(probe_once(slow, upstream)) == (False, "timed out after 0.2s")


def test_none_passes_at_once(run):
    assert run(probe_once(Health("none"), Upstream("127.0.0.1", 1))) == (
        True,
        "no probe",
    )


# wait_ready


def test_wait_ready_returns_when_the_server_starts_listening(run):
    port = free_port()

    async def scenario():
        servers = []

        async def listen_later():
            await asyncio.sleep(0.2)
            servers.append(
                await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)
            )

        starter = asyncio.ensure_future(listen_later())
        started = time.monotonic()
        try:
            waited_ms = await wait_ready(
                Health(interval=0.01), Upstream("127.0.0.1", port), timeout=2
            )
            elapsed = time.monotonic() - started
        finally:
            await starter
            for server in servers:
                server.close()
                await server.wait_closed()
        return waited_ms, elapsed

    waited_ms, elapsed = run(scenario())
    assert 150 <= waited_ms <= 500
    assert elapsed < 0.5


def test_wait_ready_passes_at_once(run, caplog):
    caplog.set_level(logging.DEBUG, logger="dynapm.health")

    async def scenario():
        async with TinyHTTP(reply("200 OK")) as upstream:
            return await wait_ready(Health("http"), upstream, timeout=1, service="w")

    assert run(scenario()) < 200
    ready = [r for r in caplog.records if r.name == "dynapm.health"]
    assert ready and ready[-1].service == "w"


def test_wait_ready_raises_not_ready_with_last_detail(run):
    async def scenario():
        started = time.monotonic()
        with pytest.raises(NotReady) as caught:
            await wait_ready(
                Health(interval=0.05), Upstream("127.0.0.1", free_port()), timeout=0.3
            )
        return caught.value, time.monotonic() - started

    error, elapsed = run(scenario())
    assert error.reason == "connection refused"
    assert str(error) == "connection refused"
    assert 0.28 <= elapsed < 0.6


def test_wait_ready_reports_the_http_status(run):
    async def scenario():
        async with TinyHTTP(reply("503 Service Unavailable")) as upstream:
            with pytest.raises(NotReady) as caught:
                await wait_ready(
                    Health("http", expect_status=200, interval=0.05),
                    upstream,
                    timeout=0.2,
                )
        return caught.value.reason

    assert run(scenario()) == "status 503 (want 200)"


def test_wait_ready_cancels_a_probe_in_flight_at_the_deadline(run, tmp_path):
    pidfile = tmp_path / "pid"

    async def scenario():
        command = f"sleep 30 & echo $! > {pidfile}; wait"
        slow = Health("command", command=command, timeout=10)
        started = time.monotonic()
        with pytest.raises(NotReady) as caught:
            await wait_ready(slow, Upstream("127.0.0.1", 1), timeout=0.3)
        return caught.value.reason, time.monotonic() - started

    reason, elapsed = run(scenario())
    assert reason == "timed out after 0.3s"
    assert elapsed < 0.8
    # The probe's process group was killed, not left running.
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and process_running(child):
        time.sleep(0.02)
    assert not process_running(child)


def test_wait_ready_command_probe_runs_again_after_interval(run, tmp_path):
    flag = tmp_path / "ready"

    async def scenario():
        check = Health("command", command=f"test -e {flag}", interval=0.02)

        async def become_ready():
            await asyncio.sleep(0.2)
            flag.touch()

        maker = asyncio.ensure_future(become_ready())
        waited_ms = await wait_ready(check, Upstream("127.0.0.1", 1), timeout=2)
        await maker
        return waited_ms

    assert 150 <= run(scenario()) < 800
