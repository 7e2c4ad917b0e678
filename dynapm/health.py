"""Readiness probes: is a freshly started service ready to take requests?

Probes run every few milliseconds while requests are held, so they stay cheap:
IP literals are connected to directly (no resolver thread), and the HTTP probe
speaks just enough HTTP/1.1 over a raw socket to read one status line.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import logging
import os
import socket
from collections.abc import Callable, Iterable, Mapping
from urllib.parse import urlsplit

from dynapm.commands import format_seconds, run_command

logger = logging.getLogger("dynapm.health")

MIN_INTERVAL = 0.001
"""Floor for the probe interval, so a zero interval cannot spin the loop."""

MAX_HEAD = 16384
"""The HTTP probe gives up on a response whose head is larger than this."""

MAX_INTERIM = 8
"""How many 1xx interim responses the HTTP probe skips before giving up."""


class NotReady(Exception):
    """The service did not pass its health probe in time."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _ProbeFailed(Exception):
    """Internal: a probe failed for a reason worth reporting as is."""


def _os_error_detail(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host: {exc.strerror or exc}"
    text = exc.strerror or str(exc) or type(exc).__name__
    return text[:1].lower() + text[1:]


@functools.lru_cache(maxsize=256)
def _literal(host: str, port: int) -> tuple[int, tuple[str, int]] | None:
    """(family, address) when host is an IP literal, else None."""
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return family, (host, port)


def _wake(waiter: asyncio.Future, connected: bool) -> None:
    if not waiter.done():
        waiter.set_result(connected)


async def _sock_connect(
    sock: socket.socket, address: tuple, timeout: float | None = None
) -> bool:
    """Connect the non-blocking `sock`: True once connected, False if `timeout`
    seconds passed first, OSError (ConnectionRefusedError...) if it failed.

    A third of the CPU time of loop.sock_connect, which matters to a probe
    repeated every millisecond beside a service that is booting.
    """
    error = sock.connect_ex(address)
    if error == errno.EINPROGRESS:
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        fd = sock.fileno()
        loop.add_writer(fd, _wake, waiter, True)
        timer = None
        if timeout is not None:
            timer = loop.call_later(timeout, _wake, waiter, False)
        try:
            if not await waiter:
                return False
        finally:
            loop.remove_writer(fd)
            if timer is not None:
                timer.cancel()
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        # OSError picks the subclass for the errno (ConnectionRefusedError...).
        raise OSError(error, os.strerror(error))
    return True


async def _connect(
    host: str, port: int, timeout: float | None = None
) -> socket.socket | None:
    """A connected non-blocking TCP socket to host:port; None when a connect
    attempt outlasts ``timeout`` (name resolution is not timed here)."""
    literal = _literal(host, port)
    if literal is None:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        targets = [(info[0], info[4]) for info in infos]
    else:
        targets = [literal]
    error: OSError = ConnectionRefusedError()
    for family, address in targets:
        sock = socket.socket(family, socket.SOCK_STREAM)
        connected = False
        try:
            sock.setblocking(False)
            if not await _sock_connect(sock, address, timeout):
                return None
            connected = True
            return sock
        except OSError as exc:
            error = exc
        finally:
            if not connected:
                sock.close()
    raise error


async def _probe_tcp(upstream, timeout: float) -> bool:
    """True once a connection to the upstream opens; False after `timeout`."""
    if _literal(upstream.host, upstream.port) is not None:
        # An IP literal: the connect's own timer bounds it, no extra task.
        sock = await _connect(upstream.host, upstream.port, timeout)
    else:
        try:
            sock = await asyncio.wait_for(
                _connect(upstream.host, upstream.port), timeout
            )
        except asyncio.TimeoutError:
            return False
    if sock is None:
        return False
    sock.close()
    return True


def _http_target(health, upstream) -> tuple[str, int, str, str]:
    """(host, port, Host header, request target) for the HTTP probe."""
    if not health.url:
        return upstream.host, upstream.port, upstream.hostport, "/"
    parts = urlsplit(health.url)
    if parts.scheme != "http":
        raise _ProbeFailed(f"unsupported URL scheme {parts.scheme!r} (http only)")
    try:
        port = parts.port or 80
    except ValueError:
        raise _ProbeFailed(f"bad port in {health.url}") from None
    if not parts.hostname:
        raise _ProbeFailed(f"no host in {health.url}")
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    host_header = parts.netloc.rpartition("@")[2]
    return parts.hostname, port, host_header, target


def _parse_status_line(line: bytes) -> int:
    fields = line.split(None, 2)
    if (
        len(fields) < 2
        or not fields[0].startswith(b"HTTP/")
        or len(fields[1]) != 3
        or not fields[1].isdigit()
    ):
        shown = line[:60].decode("latin-1")
        raise _ProbeFailed(f"not an HTTP response: {shown!r}")
    return int(fields[1])


async def _read_status(sock: socket.socket) -> int:
    """The status code of the final (non-1xx) response on `sock`."""
    loop = asyncio.get_running_loop()
    buf = b""
    interim = 0

    async def more() -> None:
        nonlocal buf
        if len(buf) > MAX_HEAD:
            raise _ProbeFailed("response head too large")
        chunk = await loop.sock_recv(sock, 4096)
        if not chunk:
            if buf:
                raise _ProbeFailed("connection closed in the response head")
            raise _ProbeFailed("connection closed without a response")
        buf += chunk

    while interim <= MAX_INTERIM:
        end = buf.find(b"\n")
        if end < 0:
            await more()
            continue
        status = _parse_status_line(buf[:end].rstrip(b"\r"))
        if not 100 <= status < 200 or status == 101:
            return status
        # An interim response such as 103 Early Hints: skip its head.
        head_end = buf.find(b"\r\n\r\n")
        while head_end < 0:
            await more()
            head_end = buf.find(b"\r\n\r\n")
        buf = buf[head_end + 4 :]
        interim += 1
    raise _ProbeFailed("too many interim responses")


async def _probe_http(health, upstream) -> tuple[bool, str]:
    host, port, host_header, target = _http_target(health, upstream)
    request = (
        f"GET {target} HTTP/1.1\r\n"
        f"Host: {host_header}\r\n"
        "User-Agent: dynapm-health\r\n"
        "Accept: */*\r\n"
        "Connection: close\r\n"
        "\r\n"
    ).encode("latin-1")
    loop = asyncio.get_running_loop()
    sock = await _connect(host, port)
    try:
        await loop.sock_sendall(sock, request)
        status = await _read_status(sock)
    finally:
        sock.close()
    expected = health.expect_status
    if expected is not None:
        if status == expected:
            return True, f"status {status}"
        return False, f"status {status} (want {expected})"
    if 200 <= status < 400:
        return True, f"status {status}"
    return False, f"status {status} (want 2xx or 3xx)"


async def probe_once(
    health,
    upstream,
    *,
    cwd: str | None = None,
    env: Iterable[tuple[str, str]] | Mapping[str, str] = (),
    service: str = "",
    limit: float | None = None,
) -> tuple[bool, str]:
    """Run one probe; return whether it passed and a short human detail.

    ``limit``, when shorter than the probe's own timeout, cuts the probe
    short: running out of it raises asyncio.TimeoutError instead of
    reporting a failed probe.
    """
    kind = health.type
    if kind == "none":
        return True, "no probe"
    if kind not in ("tcp", "http", "command"):
        return False, f"unknown probe type {kind!r}"
    timeout = health.timeout
    cut = limit is not None and limit < timeout
    if cut:
        timeout = max(limit, 0.0)
    if kind == "command":
        result = await run_command(
            health.command, timeout=timeout, cwd=cwd, env=env, service=service
        )
        if cut and result.timed_out:
            raise asyncio.TimeoutError
        return result.exit_code == 0, result.describe()
    try:
        if kind == "http":
            return await asyncio.wait_for(_probe_http(health, upstream), timeout)
        if await _probe_tcp(upstream, timeout):
            return True, "connected"
        raise asyncio.TimeoutError
    except asyncio.TimeoutError:
        if cut:
            raise
        return False, f"timed out after {format_seconds(health.timeout)}"
    except _ProbeFailed as exc:
        return False, str(exc)
    except OSError as exc:
        return False, _os_error_detail(exc)


async def wait_ready(
    health,
    upstream,
    *,
    timeout: float,
    cwd: str | None = None,
    env: Iterable[tuple[str, str]] | Mapping[str, str] = (),
    service: str = "",
    keep_going: Callable[[], bool] | None = None,
) -> float:
    """Probe until the service is ready; return the milliseconds that took.

    ``keep_going``, when given, is asked before every probe: once it answers
    False (the process being probed has exited) probing stops with NotReady.
    This does not rely on cancellation, which asyncio.wait_for can swallow on
    Python 3.11 when it races a finishing probe (CPython gh-86296).

    The first probe runs at once, the next `health.interval` after each failed
    one ends. Raises NotReady with the last failure's detail once `timeout`
    seconds are spent; a probe still running at that point is cancelled.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + timeout
    interval = max(float(health.interval or 0), MIN_INTERVAL)
    extra = {"service": service, "probe": health.type}
    last = ""
    probes = 0
    while loop.time() < deadline:
        if keep_going is not None and not keep_going():
            raise NotReady(last or "stopped")
        try:
            ok, detail = await probe_once(
                health,
                upstream,
                cwd=cwd,
                env=env,
                service=service,
                limit=deadline - loop.time(),
            )
        except asyncio.TimeoutError:
            break
        probes += 1
        if ok:
            waited_ms = (loop.time() - started) * 1000
            logger.debug(
                "ready after %.1f ms and %d probe(s): %s",
                waited_ms,
                probes,
                detail,
                extra={**extra, "elapsed_ms": round(waited_ms, 1)},
            )
            return waited_ms
        last = detail
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        await asyncio.sleep(min(interval, remaining))
    reason = last or f"timed out after {format_seconds(timeout)}"
    logger.debug("not ready after %d probe(s): %s", probes, reason, extra=extra)
    raise NotReady(reason)
