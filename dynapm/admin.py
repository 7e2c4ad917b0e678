"""The admin API: service control, state events, metrics and the dashboard.

Served on its own listener by a small HTTP/1.1 server (asyncio Protocol and
httptools), so nothing here runs on the proxy hot path. The hot path only
bumps plain counters on its ServiceState objects; the Prometheus collector
reads them when scraped.

Every request is checked in this order:

1. the socket's peer address against ``admin.allow`` (403), never a
   forwarded header;
2. without a token, the Host header must name a loopback or literal
   address (403), so that a web page cannot reach the API through DNS
   rebinding; a POST whose Origin is another site is refused (403), so
   that a page cannot make the operator's browser start or stop services;
3. the bearer token, compared in constant time (401), except for the
   dashboard page itself, which asks for the token in the browser.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import email.utils
import errno
import hashlib
import hmac
import importlib.resources
import ipaddress
import json
import logging
import re
import time
from dataclasses import dataclass, field
from http import HTTPStatus

import httptools
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from dynapm.errors import StartError
from dynapm.gateway import Gateway, ListenError

logger = logging.getLogger("dynapm.admin")

HEARTBEAT_S = 15.0
STATES = ("offline", "starting", "online", "stopping")
# Cold-start durations span a health probe of a few milliseconds to a JVM
# taking a minute; the buckets cover that range in seconds.
COLD_START_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# No admin endpoint takes a body; anything larger is a mistake or an attack.
MAX_BODY = 64 * 1024
MAX_HEAD = 64 * 1024
# Pipelined requests waiting behind a slow one (a start) before reading pauses.
MAX_QUEUED = 16
# Events a slow SSE client may fall behind by before it is disconnected.
MAX_EVENT_BACKLOG = 1000
SSE_WRITE_LIMIT = 1024 * 1024
# How long close() lets event streams write their last chunk.
CLOSE_GRACE_S = 1.0

# Valid service names need no escaping in a URL (config enforces the same
# alphabet), so a name with '%' or '/' in it can never be a service.
_NAME = re.compile(r"[A-Za-z0-9._-]+")
_BLOCK_RE = re.compile(r"<(script|style)>(.*?)</\1>", re.S)

_SECURITY_HEADERS = (
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
)


# --------------------------------------------------------------------------
# Requests and responses


@dataclass
class Request:
    method: str
    path: str
    query: str
    version: str
    headers: dict[str, list[str]]
    keep_alive: bool
    body: bytes = b""

    def header(self, name: str) -> str | None:
        values = self.headers.get(name)
        return values[0] if values and len(values) == 1 else None


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)
    close: bool = False


def _text(status: int, message: str, **kwargs) -> Response:
    return Response(status, (message + "\n").encode(), **kwargs)


def _json(status: int, value, **kwargs) -> Response:
    body = json.dumps(value, separators=(",", ":")).encode()
    return Response(status, body, "application/json", **kwargs)


def _head_bytes(status: int, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
    lines.append("Date: " + email.utils.formatdate(usegmt=True))
    lines.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class _Reject(Exception):
    """A request refused while parsing; queued in its place to keep order."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# --------------------------------------------------------------------------
# The connection protocol


class _Connection(asyncio.Protocol):
    """One admin client connection: parses requests, answers them in order."""

    def __init__(self, admin: AdminServer):
        self.admin = admin
        self.loop = admin.loop
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.allowed = False
        self.parser = httptools.HttpRequestParser(self)
        self.queue: collections.deque = collections.deque()
        self.task: asyncio.Task | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.closed = False
        self.reading = True
        # Set once no further request will be parsed (a request without
        # keep-alive, a parse error, or the client's EOF).
        self.last = False
        # Whether the request being answered allows another after it.
        self.keep_alive = True
        self.http10 = False
        self._url = b""
        self._headers: dict[str, list[str]] = {}
        self._head_size = 0
        self._body: list[bytes] = []
        self._body_size = 0

    # -- asyncio.Protocol --------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.peer = str(peer[0])
        self.allowed = self.admin.peer_allowed(self.peer)
        self.admin.connections.add(self)
        self._arm_timer(self.admin.header_timeout)

    def data_received(self, data: bytes) -> None:
        if self.last:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(400, "upgrade is not supported here")
        except httptools.HttpParserError as err:
            # A callback's exception comes back wrapped, as the context.
            cause = err.__context__
            if isinstance(cause, _Reject):
                self._reject(cause.status, cause.message)
            else:
                self._reject(400, "malformed request")

    def eof_received(self) -> bool:
        # A half-closed client still gets the answers it asked for.
        self.last = True
        if self.task is None and not self.queue:
            return False
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.admin.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None:
            self.task.cancel()

    # -- httptools callbacks -----------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._head_size = 0
        self._body = []
        self._body_size = 0
        self._arm_timer(self.admin.header_timeout)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._grow_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grow_head(len(name) + len(value) + 4)
        key = name.decode("latin-1").lower()
        self._headers.setdefault(key, []).append(value.decode("latin-1"))

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > MAX_BODY:
            raise _Reject(413, "request body too large")
        self._body.append(body)

    def on_message_complete(self) -> None:
        parser = self.parser
        try:
            url = httptools.parse_url(self._url)
        except httptools.HttpParserInvalidURLError:
            raise _Reject(400, "malformed request target") from None
        request = Request(
            method=parser.get_method().decode("latin-1"),
            path=(url.path or b"").decode("latin-1"),
            query=(url.query or b"").decode("latin-1"),
            version=parser.get_http_version(),
            headers=self._headers,
            keep_alive=parser.should_keep_alive(),
            body=b"".join(self._body),
        )
        if not request.keep_alive:
            self.last = True
        self._enqueue(request)

    # -- internals ---------------------------------------------------------

    def _grow_head(self, size: int) -> None:
        self._head_size += size
        if self._head_size > MAX_HEAD:
            raise _Reject(431, "request head too large")

    def _reject(self, status: int, message: str) -> None:
        self.last = True
        self._enqueue(_Reject(status, message))

    def _enqueue(self, item) -> None:
        self.queue.append(item)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if len(self.queue) >= MAX_QUEUED and self.reading:
            self.reading = False
            self.transport.pause_reading()
        if self.task is None:
            self.task = self.loop.create_task(self._serve())

    def _arm_timer(self, delay: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(delay, self._timed_out)

    def _timed_out(self) -> None:
        self.timer = None
        if self.task is None and not self.closed:
            self.transport.close()

    async def _serve(self) -> None:
        try:
            while self.queue and not self.closed:
                item = self.queue.popleft()
                if not self.reading and len(self.queue) < MAX_QUEUED // 2:
                    self.reading = True
                    self.transport.resume_reading()
                if isinstance(item, _Reject):
                    self.write_response(_text(item.status, item.message, close=True))
                    break
                self.keep_alive = item.keep_alive
                self.http10 = item.version == "1.0"
                keep_open = await self.admin.handle(self, item)
                if not keep_open:
                    break
        except asyncio.CancelledError:
            if not self.closed:
                self.transport.abort()
            raise
        except Exception:
            logger.exception("admin request failed", extra={"peer": self.peer})
            if not self.closed:
                self.write_response(_text(500, "internal error", close=True))
        finally:
            self.task = None
        if self.closed:
            return
        if self.last and not self.queue or self.transport.is_closing():
            self.transport.close()
        elif not self.queue:
            self._arm_timer(self.admin.keepalive_timeout)

    def write_response(self, response: Response, head_only: bool = False) -> bool:
        """Write a whole response; returns whether the connection stays open."""
        if self.closed:
            return False
        close = response.close or not self.keep_alive
        headers = [("Content-Type", response.content_type)]
        headers.append(("Content-Length", str(len(response.body))))
        headers.extend(_SECURITY_HEADERS)
        headers.extend(response.headers)
        if close:
            headers.append(("Connection", "close"))
        elif self.http10:
            # HTTP/1.0 closes by default; say that this connection stays.
            headers.append(("Connection", "keep-alive"))
        head = _head_bytes(response.status, headers)
        self.transport.write(head if head_only else head + response.body)
        if close:
            self.last = True
            self.queue.clear()
            self.transport.close()
        return not close


# --------------------------------------------------------------------------
# Metrics


class _ColdStarts:
    """Cold-start durations per service, bucketed as events arrive."""

    def __init__(self) -> None:
        self.buckets: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}

    def observe(self, service: str, seconds: float) -> None:
        counts = self.buckets.setdefault(service, [0] * (len(COLD_START_BUCKETS) + 1))
        for index, bound in enumerate(COLD_START_BUCKETS):
            if seconds <= bound:
                counts[index] += 1
        counts[-1] += 1
        self.sums[service] = self.sums.get(service, 0.0) + seconds


class GatewayCollector:
    """Reads the hot path's plain counters when Prometheus scrapes."""

    def __init__(self, gateway: Gateway, cold_starts: _ColdStarts):
        self.gateway = gateway
        self.cold_starts = cold_starts

    def describe(self):
        # No names declared: registration then needs no collect() call, and
        # services are never added after boot, so no name can clash later.
        return []

    def collect(self):
        services = self.gateway.lifecycle.services
        requests = CounterMetricFamily(
            "dynapm_requests",
            "Responses sent to clients, by service and status class.",
            labels=["service", "status_class"],
        )
        received = CounterMetricFamily(
            "dynapm_requests_received",
            "Requests received for the service (answered or not yet).",
            labels=["service"],
        )
        upstream_errors = CounterMetricFamily(
            "dynapm_upstream_errors",
            "Failed upstream exchanges (connect errors, resets, timeouts).",
            labels=["service"],
        )
        cold_starts = CounterMetricFamily(
            "dynapm_cold_starts",
            "Successful starts of the service by DynaPM.",
            labels=["service"],
        )
        durations = HistogramMetricFamily(
            "dynapm_cold_start_duration_seconds",
            "Time from start request to ready (command and health probe).",
            labels=["service"],
        )
        active = GaugeMetricFamily(
            "dynapm_active_connections",
            "Open exchanges: in-flight requests, streaming responses, tunnels.",
            labels=["service"],
        )
        state = GaugeMetricFamily(
            "dynapm_service_state",
            "1 for the service's current lifecycle state, 0 for the others.",
            labels=["service", "state"],
        )
        bytes_in = CounterMetricFamily(
            "dynapm_bytes_in",
            "Request body bytes forwarded to the service.",
            labels=["service"],
        )
        bytes_out = CounterMetricFamily(
            "dynapm_bytes_out",
            "Bytes received from the service (response heads and bodies).",
            labels=["service"],
        )
        for name, service in services.items():
            counters = service.state
            for status_class in ("1xx", "2xx", "3xx", "4xx", "5xx"):
                value = getattr(counters, "responses_" + status_class)
                requests.add_metric([name, status_class], value)
            received.add_metric([name], counters.requests)
            upstream_errors.add_metric([name], counters.upstream_errors)
            cold_starts.add_metric([name], service.start_count)
            counts = self.cold_starts.buckets.get(name)
            if counts is None:
                counts = [0] * (len(COLD_START_BUCKETS) + 1)
            buckets = [
                (_bound(bound), count)
                for bound, count in zip(COLD_START_BUCKETS, counts, strict=False)
            ]
            buckets.append(("+Inf", counts[-1]))
            durations.add_metric([name], buckets, self.cold_starts.sums.get(name, 0.0))
            active.add_metric([name], counters.active)
            for label in STATES:
                state.add_metric([name, label], 1 if service.status == label else 0)
            bytes_in.add_metric([name], counters.bytes_in)
            bytes_out.add_metric([name], counters.bytes_out)
        yield from (
            requests,
            received,
            upstream_errors,
            cold_starts,
            durations,
            active,
            state,
            bytes_in,
            bytes_out,
        )


def _bound(value: float) -> str:
    return repr(float(value))


# --------------------------------------------------------------------------
# The server


class _EventStream:
    """One SSE subscriber: a bounded queue of events to write."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.overflowed = False

    def push(self, event: dict | None) -> None:
        # Called synchronously from Lifecycle.publish: must never raise, or
        # it would break the state change that published the event. None
        # (the end of the stream) always gets through.
        if event is not None and self.queue.qsize() >= MAX_EVENT_BACKLOG:
            self.overflowed = True
            return
        self.queue.put_nowait(event)


class AdminServer:
    """The admin listener of one Gateway; built and closed by the gateway."""

    def __init__(self, gateway: Gateway, heartbeat: float = HEARTBEAT_S):
        self.gateway = gateway
        self.loop = gateway.loop
        self.config = gateway.config.admin
        self.heartbeat = heartbeat
        limits = gateway.config.limits
        self.header_timeout = limits.header_timeout
        self.keepalive_timeout = limits.keepalive_timeout
        self.server: asyncio.AbstractServer | None = None
        self.connections: set[_Connection] = set()
        self.streams: set[_EventStream] = set()
        self.closing = False
        token = self.config.token
        self._token = token.encode("utf-8") if token is not None else None
        self.cold_starts = _ColdStarts()
        gateway.lifecycle.subscribers.append(self._on_event)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(GatewayCollector(gateway, self.cold_starts))
        self.registry.register(ProcessCollector(registry=None))
        self.page, self.page_csp = _load_dashboard()

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        listen = self.config.listen
        try:
            self.server = await self.loop.create_server(
                lambda: _Connection(self),
                listen.host,
                listen.port,
                reuse_address=True,
            )
        except OSError as err:
            reason = (
                "address already in use"
                if err.errno == errno.EADDRINUSE
                else (err.strerror or str(err))
            )
            raise ListenError(f"cannot listen on {listen}: {reason}") from err
        logger.info(
            "admin API listening",
            extra={"address": str(listen), "token": self._token is not None},
        )

    async def close(self) -> None:
        """Stop accepting, end every event stream cleanly, close connections."""
        self.closing = True
        subscribers = self.gateway.lifecycle.subscribers
        if self._on_event in subscribers:
            subscribers.remove(self._on_event)
        if self.server is not None:
            self.server.close()
        for stream in list(self.streams):
            stream.push(None)
        deadline = time.monotonic() + CLOSE_GRACE_S
        while self.streams and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for connection in list(self.connections):
            if connection.task is not None:
                connection.task.cancel()
            if connection.transport is not None:
                connection.transport.close()
        if self.server is not None:
            try:
                await asyncio.wait_for(self.server.wait_closed(), CLOSE_GRACE_S)
            except asyncio.TimeoutError:
                logger.warning("admin connections still open at shutdown")
            self.server = None

    def _on_event(self, event: dict) -> None:
        if event.get("from") == "starting" and event.get("to") == "online":
            service = self.gateway.lifecycle.services.get(event.get("service"))
            if service is not None and service.last_start_ms is not None:
                self.cold_starts.observe(service.name, service.last_start_ms / 1000)
        for stream in list(self.streams):
            stream.push(event)

    # -- access control ----------------------------------------------------

    def peer_allowed(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            # A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d.
            address = address.ipv4_mapped
        return any(
            address.version == network.version and address in network
            for network in self.config.allow
        )

    def _host_allowed(self, request: Request) -> bool:
        if self._token is not None:
            return True
        values = request.headers.get("host")
        if not values:
            # HTTP/1.0 clients may omit Host; browsers always send it.
            return True
        if len(values) != 1:
            return False
        host = values[0].strip().lower()
        if host.startswith("["):
            host = host[1:].partition("]")[0]
        elif host.count(":") == 1:
            host = host.partition(":")[0]
        if host == "localhost" or host.endswith(".localhost"):
            return True
        if host == self.config.listen.host.lower():
            return True
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return False
        return True

    def _origin_allowed(self, request: Request) -> bool:
        origin = request.headers.get("origin")
        if origin is None:
            return True
        host = request.header("host")
        if len(origin) != 1 or host is None:
            return False
        return origin[0] in (f"http://{host}", f"https://{host}")

    def _token_ok(self, request: Request) -> bool:
        if self._token is None:
            return True
        value = request.header("authorization")
        if value is None:
            return False
        scheme, _, credentials = value.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        # Header values were decoded as latin-1: encoding back gives the
        # bytes the client sent, to compare with the UTF-8 token.
        return hmac.compare_digest(credentials.strip().encode("latin-1"), self._token)

    # -- routing -----------------------------------------------------------

    async def handle(self, conn: _Connection, request: Request) -> bool:
        head_only = request.method == "HEAD"
        if not conn.allowed:
            logger.warning(
                "admin request from a peer outside allow", extra={"peer": conn.peer}
            )
            return conn.write_response(_text(403, "forbidden", close=True), head_only)
        if not self._host_allowed(request):
            logger.warning(
                "admin request refused: without admin.token the Host must be "
                "localhost or an IP address",
                extra={"peer": conn.peer, "host": request.header("host")},
            )
            return conn.write_response(_text(403, "forbidden"), head_only)
        if request.method not in ("GET", "HEAD") and not self._origin_allowed(request):
            logger.warning(
                "admin request refused: cross-site Origin",
                extra={"peer": conn.peer, "origin": request.header("origin")},
            )
            return conn.write_response(_text(403, "forbidden"), head_only)
        path = request.path
        if path == "/":
            return self._page(conn, request)
        if not self._token_ok(request):
            challenge = ("WWW-Authenticate", 'Bearer realm="dynapm"')
            response = _text(401, "unauthorized", headers=[challenge])
            return conn.write_response(response, head_only)
        if path == "/api/services":
            if not _method(request, "GET"):
                return conn.write_response(_not_allowed("GET, HEAD"), head_only)
            services = [s.info() for s in self.gateway.lifecycle.services.values()]
            return conn.write_response(_json(200, {"services": services}), head_only)
        if path == "/api/events":
            if not _method(request, "GET"):
                return conn.write_response(_not_allowed("GET, HEAD"), head_only)
            await self._events(conn, request)
            return False
        if path == "/metrics":
            if not _method(request, "GET"):
                return conn.write_response(_not_allowed("GET, HEAD"), head_only)
            body = generate_latest(self.registry)
            response = Response(200, body, CONTENT_TYPE_LATEST)
            return conn.write_response(response, head_only)
        if path.startswith("/api/services/"):
            return await self._service(conn, request, path[len("/api/services/") :])
        return conn.write_response(_text(404, "not found"), head_only)

    def _page(self, conn: _Connection, request: Request) -> bool:
        if not _method(request, "GET"):
            return conn.write_response(_not_allowed("GET, HEAD"))
        response = Response(
            200,
            self.page,
            "text/html; charset=utf-8",
            headers=[
                ("Content-Security-Policy", self.page_csp),
                ("X-Frame-Options", "DENY"),
            ],
        )
        return conn.write_response(response, request.method == "HEAD")

    async def _service(self, conn: _Connection, request: Request, rest: str) -> bool:
        head_only = request.method == "HEAD"
        parts = rest.split("/")
        name, action = parts[0], parts[1] if len(parts) == 2 else None
        service = None
        if _NAME.fullmatch(name) and ".." not in name and len(parts) <= 2:
            service = self.gateway.lifecycle.services.get(name)
        if service is None:
            return conn.write_response(_text(404, "no such service"), head_only)
        if action is None:
            if not _method(request, "GET"):
                return conn.write_response(_not_allowed("GET, HEAD"), head_only)
            return conn.write_response(_json(200, service.info()), head_only)
        if action not in ("start", "stop"):
            return conn.write_response(_text(404, "not found"), head_only)
        if request.method != "POST":
            return conn.write_response(_not_allowed("POST"), head_only)
        if not service.managed:
            message = f"service '{name}' is proxy_only: DynaPM never starts or stops it"
            return conn.write_response(_json(409, {"error": message}))
        logger.info(
            "admin request",
            extra={"action": action, "service": name, "peer": conn.peer},
        )
        if action == "start":
            try:
                await service.start()
            except StartError as err:
                response = _json(
                    503,
                    {"error": str(err), "service": service.info()},
                    headers=[("Retry-After", "1")],
                )
                return conn.write_response(response)
        else:
            await service.stop("admin")
        return conn.write_response(_json(200, service.info()))

    async def _events(self, conn: _Connection, request: Request) -> None:
        chunked = request.version == "1.1"
        headers = [
            ("Content-Type", "text/event-stream; charset=utf-8"),
            *_SECURITY_HEADERS,
            # Reverse proxies in front of the admin API must not buffer it.
            ("X-Accel-Buffering", "no"),
        ]
        headers.append(
            ("Transfer-Encoding", "chunked") if chunked else ("Connection", "close")
        )
        transport = conn.transport
        transport.write(_head_bytes(200, headers))
        if request.method == "HEAD" or self.closing:
            if chunked and request.method != "HEAD":
                transport.write(b"0\r\n\r\n")
            transport.close()
            return

        def send(text: str) -> None:
            data = text.encode()
            if chunked:
                data = b"%x\r\n%s\r\n" % (len(data), data)
            transport.write(data)

        stream = _EventStream()
        self.streams.add(stream)
        # A first comment tells the client the subscription is in place.
        send(": subscribed\n\n")
        try:
            while not conn.closed:
                try:
                    event = await asyncio.wait_for(stream.queue.get(), self.heartbeat)
                except asyncio.TimeoutError:
                    send(": heartbeat\n\n")
                    continue
                if event is None:
                    break
                send("event: state\ndata: " + json.dumps(event) + "\n\n")
                if stream.overflowed or (
                    transport.get_write_buffer_size() > SSE_WRITE_LIMIT
                ):
                    logger.warning(
                        "event subscriber too slow, disconnecting",
                        extra={"peer": conn.peer},
                    )
                    transport.abort()
                    return
            if not conn.closed:
                if chunked:
                    transport.write(b"0\r\n\r\n")
                transport.close()
        finally:
            self.streams.discard(stream)


def _method(request: Request, allowed: str) -> bool:
    return request.method == allowed or (allowed == "GET" and request.method == "HEAD")


def _not_allowed(allow: str) -> Response:
    return _text(405, "method not allowed", headers=[("Allow", allow)])


def _load_dashboard() -> tuple[bytes, str]:
    """The page, and a CSP that admits exactly its own inline script and style."""
    text = (
        importlib.resources.files("dynapm")
        .joinpath("dashboard.html")
        .read_text(encoding="utf-8")
    )
    hashes = {"script": [], "style": []}
    for kind, content in _BLOCK_RE.findall(text):
        digest = hashlib.sha256(content.encode("utf-8")).digest()
        hashes[kind].append("'sha256-" + base64.b64encode(digest).decode() + "'")
    csp = "; ".join(
        [
            "default-src 'none'",
            "script-src " + (" ".join(hashes["script"]) or "'none'"),
            "style-src " + (" ".join(hashes["style"]) or "'none'"),
            "connect-src 'self'",
            "img-src data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    return text.encode("utf-8"), csp
