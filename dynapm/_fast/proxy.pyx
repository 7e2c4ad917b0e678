# The proxy hot path: one Downstream protocol per client connection, one
# Upstream protocol per backend connection, both on uvloop transports.
#
# A client connection carries a queue of exchanges (request + response).
# Parser callbacks only record requests; after each feed the head of the
# queue is begun: routed, counted against its service, and either sent on a
# pooled upstream connection at once (service online) or held while the
# Python lifecycle starts the service.  Responses are written in request
# order because only one exchange per client connection is forwarded at a
# time (RFC 9112 section 9.3.2 allows serial handling of pipelined requests).

import logging

from httptools import HttpRequestParser, HttpResponseParser
from httptools.parser.errors import HttpParserError, HttpParserUpgrade

from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject
from libc.string cimport memchr, memcmp, memcpy

from dynapm._fast.heads cimport (
    HEADER_CONNECTION,
    HEADER_CONTENT_LENGTH,
    HEADER_HOST,
    HEADER_OTHER,
    HEADER_TRANSFER_ENCODING,
    HEADER_UPGRADE,
    HEADER_X_FORWARDED_FOR,
    Framing,
    RequestHead,
    ResponseInfo,
    connection_names_others,
    connection_tokens,
    emit_response,
    head_end,
    header_kind,
    join_bytes,
    keep_alive_of,
    rewrite_response,
    scan_response,
    simple_request,
    simple_response,
)
from dynapm.errors import StartError

access_logger = logging.getLogger("dynapm.access")
logger = logging.getLogger("dynapm.proxy")

# Write-buffer marks for every transport. uvloop's default low-water mark is
# 16 bytes, which would resume a paused peer almost never in whole buffers.
DEF WRITE_HIGH = 256 * 1024
DEF WRITE_LOW = 64 * 1024
# Body bytes held for an exchange that has no upstream connection yet (cold
# start, connect in progress, pipelined behind another): reading pauses
# above this, so the rest waits in the kernel.
DEF PENDING_LIMIT = 64 * 1024
# Body bytes kept to replay an idempotent request on a fresh connection.
DEF RETAIN_LIMIT = 1024 * 1024
# How long a closing connection keeps draining the client's unread body.
DEF LINGER = 2.0

# A response head longer than this is refused (502).
DEF MAX_RESPONSE_HEAD = 256 * 1024

# Reasons to stop reading from a client; reading resumes when none is left.
DEF PAUSE_UPSTREAM = 1
DEF PAUSE_BUFFER = 2

REASONS = {
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

# Request headers never forwarded as they are (RFC 9110 section 7.6.1), plus
# the forwarding headers this gateway sets itself.
# What ends a response head, by [re-chunked * 3 + connection]:
# connection 0 = keep-alive implied, 1 = close, 2 = keep-alive for HTTP/1.0.
cdef tuple TAILS = (
    b"\r\n",
    b"Connection: close\r\n\r\n",
    b"Connection: keep-alive\r\n\r\n",
    b"Transfer-Encoding: chunked\r\n\r\n",
    b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n",
)
cdef bytes METHOD_GET = b"GET"
cdef bytes METHOD_POST = b"POST"
cdef frozenset IDEMPOTENT = frozenset([
    b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE",
])


cdef inline bytes cut(bytes data, Py_ssize_t start, Py_ssize_t end):
    # data[start:end] for offsets known to be in range, without the index
    # and slice objects a Python-level slice allocates.
    return PyBytes_FromStringAndSize(PyBytes_AS_STRING(data) + start,
                                     end - start)


cdef inline bytes request_method(bytes data, Py_ssize_t start,
                                 Py_ssize_t end):
    # The method between start and end of a request line already checked;
    # the two most common as shared objects.
    cdef const char *p = PyBytes_AS_STRING(data) + start
    if end - start == 3 and memcmp(p, b"GET", 3) == 0:
        return METHOD_GET
    if end - start == 4 and memcmp(p, b"POST", 4) == 0:
        return METHOD_POST
    return cut(data, start, end)


cdef inline double now() noexcept:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


def monotonic():
    """The hot path's clock: CLOCK_MONOTONIC, as time.monotonic()."""
    return now()


cdef bytes strip_port(bytes host):
    # "Example.com:3000" -> "example.com"; "[::1]:3000" -> "[::1]". The
    # routing key of a Host the route cache has not seen: host itself when
    # it is already lowercase without a port (no new object).
    cdef const char *p = PyBytes_AS_STRING(host)
    cdef Py_ssize_t n = len(host), end = n, i
    cdef const char *hit
    cdef bytes key
    cdef char *q
    if n and p[0] == 91:
        hit = <const char *>memchr(p, 93, n)
        if hit != NULL:
            end = hit - p + 1
    else:
        i = n
        while i > 0:
            i -= 1
            if p[i] == 58:
                end = i
                break
    i = 0
    while i < end and not 65 <= p[i] <= 90:
        i += 1
    if i == end and end == n:
        return host
    # Made empty and filled: from a source pointer, a one-byte result would
    # be CPython's shared object for that byte, not ours to change.
    key = PyBytes_FromStringAndSize(NULL, end)
    q = PyBytes_AS_STRING(key)
    memcpy(q, p, end)
    while i < end:
        if 65 <= q[i] <= 90:
            q[i] += 32
        i += 1
    return key


cdef class ServiceState:
    """What the hot path knows about a service; owned by the lifecycle."""

    def __init__(self, str name):
        self.name = name
        self.online = False
        self.active = 0
        self.last_activity = now()
        self.last_request = 0.0
        self.lifecycle = None
        self.generation = 0
        self.pools = []

    cdef void count_status(self, int status) noexcept:
        if status < 200:
            self.responses_1xx += 1
        elif status < 300:
            self.responses_2xx += 1
        elif status < 400:
            self.responses_3xx += 1
        elif status < 500:
            self.responses_4xx += 1
        else:
            self.responses_5xx += 1

    def close_idle(self):
        """Close every pooled keep-alive connection (the service stopped)."""
        cdef Pool pool
        for pool in self.pools:
            pool.close_all()


cdef class Pool:
    """Idle keep-alive connections to one upstream address."""

    def __init__(self, str host, int port):
        self.host = host
        self.port = port
        self.idle = []

    cdef Upstream take(self):
        cdef Upstream upstream
        while self.idle:
            upstream = self.idle.pop()
            if not upstream.closed:
                return upstream
        return None

    cdef void put(self, Upstream upstream):
        self.idle.append(upstream)

    cdef void discard(self, Upstream upstream):
        try:
            self.idle.remove(upstream)
        except ValueError:
            pass

    def close_all(self):
        cdef Upstream upstream
        idle, self.idle = self.idle, []
        for upstream in idle:
            upstream.transport.close()

    @property
    def idle_count(self):
        return len(self.idle)


cdef class Route:
    """One routing entry: the service and upstream a request goes to."""

    def __init__(self, ServiceState service, Pool pool, bytes host_header,
                 bint preserve_host):
        self.service = service
        self.pool = pool
        self.host_header = host_header
        self.preserve_host = preserve_host


cdef class Settings:
    """Gateway-wide state shared by every connection."""

    def __init__(self, loop, dict hosts, *, long long max_body,
                 long max_header, double header_timeout,
                 double keepalive_timeout, double upstream_timeout,
                 bint access_log):
        self.loop = loop
        self.hosts = hosts
        self.connections = set()
        self.max_body = max_body
        self.max_header = max_header
        self.header_timeout = header_timeout
        self.keepalive_timeout = keepalive_timeout
        self.upstream_timeout = upstream_timeout
        self.access_log = access_log
        self.draining = False

    def sweep(self):
        """Enforce timeouts; the gateway calls this a few times a second."""
        cdef Downstream downstream
        cdef double t = now()
        for downstream in list(self.connections):
            downstream.check_timeouts(t)

    def drain(self):
        """Stop keep-alive: close idle connections, close busy ones after
        their current exchange."""
        cdef Downstream downstream
        self.draining = True
        for downstream in list(self.connections):
            if downstream.current is None and not downstream.in_head:
                downstream.transport.close()

    def abort_all(self):
        cdef Downstream downstream
        for downstream in list(self.connections):
            downstream.transport.abort()


@cython.freelist(64)
cdef class Exchange:
    """One request and its response on a client connection."""

    def __cinit__(self):
        self.pending = []


# ---------------------------------------------------------------------------
# Client side


cdef class Downstream:
    """Protocol for one client connection.

    ``fixed_route`` is set for dedicated ports; otherwise the Host header
    picks the route.
    """

    def __init__(self, Settings settings, Route fixed_route=None):
        self.settings = settings
        self.fixed_route = fixed_route
        # Exchanges received but not begun (pipelining); rarely non-empty.
        self.queue = []

    def connection_made(self, transport):
        self.transport = transport
        self.write = transport.write
        transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0].encode() if peer else b"unknown"
        self.forwarded_line = b"X-Forwarded-For: " + self.peer + b"\r\n"
        # The httptools parser is made when a head first needs it: a
        # connection whose heads are all simple never does.
        self.head_started = self.idle_since = now()
        self.settings.connections.add(self)

    def connection_lost(self, exc):
        cdef Exchange ex = self.current
        cdef Upstream upstream
        self.closed = True
        self.settings.connections.discard(self)
        self.current = None
        if ex is not None:
            upstream = ex.upstream
            if upstream is not None:
                upstream._detach()
                if self.tunnel:
                    upstream.transport.close()
                else:
                    # The backend must see the client leave at once (an
                    # SSE stream, a long poll): never reuse this connection.
                    upstream.transport.abort()
            self._release(ex)
        self.queue.clear()

    def pause_writing(self):
        self.write_paused = True
        if self.current is not None and self.current.upstream is not None:
            self.current.upstream._pause_reading()

    def resume_writing(self):
        self.write_paused = False
        if self.current is not None:
            if self.current.upstream is not None:
                self.current.upstream._resume_reading()
        elif self.queue and not self.closing:
            self._next()
            if not self.queue and self.current is None:
                self._resume(PAUSE_BUFFER)

    def eof_received(self):
        cdef Exchange ex = self.current
        if self.tunnel and ex is not None and ex.upstream is not None:
            # Half-close travels through the tunnel; once both directions
            # are finished the tunnel is closed.
            self.client_eof = True
            if ex.upstream.eof:
                ex.upstream.transport.close()
                return False
            ex.upstream.transport.write_eof()
            return True
        if self.closing:
            return False
        if self.parsing is not None and not self.parsing.complete:
            # The request was cut short: nothing sensible can be answered.
            return False
        if ex is None and not self.queue:
            return False
        # A client may half-close after sending its requests; answer them
        # and close afterwards.
        self.client_eof = True
        return True

    def data_received(self, bytes data):
        cdef Exchange ex
        cdef RequestHead head
        cdef Py_ssize_t start = 0, end, n = len(data)
        if self.closing:
            return
        if self.raw:
            # After a WebSocket upgrade request the bytes belong to the
            # tunnel; until the upstream answers 101 they are only held, so
            # nothing unparsed ever reaches the backend as a request.
            ex = self.upgrade_ex
            if self.tunnel and ex.upstream is not None:
                ex.upstream.write(data)
                return
            if ex.early is None:
                ex.early = []
            ex.early.append(data)
            ex.early_size += len(data)
            if ex.early_size > PENDING_LIMIT:
                self._pause(PAUSE_BUFFER)
            return
        if self.broken:
            return
        # At a message boundary (httptools has seen nothing of the next
        # request), a simple head arriving whole is read here, without
        # httptools (see heads.simple_request), and so is its body when it
        # has a plain Content-Length: counted, the bytes forwarded as they
        # came. The loop moves an offset through data, so a read holding
        # many such requests is not copied once per request. A bodiless
        # head must end the read: pipelined requests after it take the
        # general path.
        while True:
            if self.body_left:
                start += self._counted_body(data, start)
                if start == n or self.broken or self.closing:
                    self._after_feed()
                    return
            if self.parsing is not None or self.in_head:
                break
            end = simple_request(data, start, &head)
            if not end or (end < n and not head.length):
                break
            self._simple_request(data, start, end, &head)
            start = end
            if start == n or self.broken or self.closing:
                self._after_feed()
                return
        if start:
            data = cut(data, start, n)
        # A message starting with this feed starts at offset 0 of data.
        self.data = data
        self.at_boundary = self.parsing is None and not self.in_head
        if self.parser is None:
            self._new_parser()
        self.head_began = False
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            self.data = None
            self._on_upgrade(data, exc.args[0])
            return
        except HttpParserError as exc:
            self.data = None
            ex = self.current
            if ex is not None and ex.upstream is not None and ex.pending:
                # Body bytes this read held before the error belong to the
                # exchange under way: they go on before the error is dealt
                # with, as they would have after a clean read.
                self._flush(ex)
            self._parse_failed("malformed request: %s" % (exc,))
            return
        self.data = None
        if self.in_head and not self.head_began:
            # httptools reports a header only once its line is complete, so
            # an endless line is caught by counting the raw bytes. Those of
            # the read a head began in are not counted: most of them can be
            # the requests before it (a long pipelined read).
            self.head_bytes += len(data)
            if self.head_bytes > self.settings.max_header + 1024 or \
                    self.head_size > self.settings.max_header:
                self._fatal(431, "request head larger than %d bytes"
                            % self.settings.max_header)
                return
        self._after_feed()

    cdef int _simple_request(self, bytes data, Py_ssize_t start,
                             Py_ssize_t end, RequestHead *head) except -1:
        # The same steps as the parser callbacks, in the same order, on the
        # head simple_request has checked between start and end: it ends in
        # CRLF CRLF, every line in CRLF, every name in ':'. With a body, the
        # message stays open and body_left counts it.
        cdef const char *p = PyBytes_AS_STRING(data)
        cdef Py_ssize_t i = head.headers, last = end - 2
        cdef Py_ssize_t eol, colon, value
        cdef Exchange ex
        self.data = data
        self.at_boundary = False
        self._message_begin()
        ex = self.parsing
        if ex is not None:
            ex.method = request_method(data, start, head.method_end)
            ex.http10 = head.http10
        self.target = cut(data, head.target_start, head.target_end)
        self.head_size = head.target_end - head.target_start
        while i < last:
            eol = <const char *>memchr(p + i, 13, last - i) - p
            colon = <const char *>memchr(p + i, 58, eol - i) - p
            value = colon + 1
            while value < eol and (p[value] == 32 or p[value] == 9):
                value += 1
            self._header(cut(data, i, colon), cut(data, value, eol))
            i = eol + 2
        self._finish_head(True)
        self.data = None
        if not head.length:
            self._message_complete()
        elif ex is not None and self.parsing is ex and not self.broken:
            self.body_left = head.length
        return 0

    cdef Py_ssize_t _counted_body(self, bytes data, Py_ssize_t start) \
            except -1:
        # How many bytes of data from start belong to the body being
        # counted; they are handed on as the parser's body callback would
        # (no copy when all of data is body). The message completes at its
        # last byte.
        cdef Py_ssize_t n = len(data) - start
        if n > self.body_left:
            n = <Py_ssize_t>self.body_left
        if start == 0 and n == len(data):
            self._body(data)
        else:
            self._body(cut(data, start, start + n))
        self.body_left -= n
        if not self.body_left:
            self._message_complete()
        return n

    cdef int _after_feed(self) except -1:
        if self.current is None:
            self._next()
        elif self.current.upstream is not None and self.current.pending:
            self._flush(self.current)
        if self.queue or (self.parsing is not None and
                          self.parsing.pending_size > PENDING_LIMIT):
            self._pause(PAUSE_BUFFER)
        return 0

    cdef int _new_parser(self) except -1:
        # Bound methods looked up once: the parser's methods are called for
        # every request.
        parser = self.parser = HttpRequestParser(self)
        self.get_method = parser.get_method
        self.get_http_version = parser.get_http_version
        self.should_keep_alive = parser.should_keep_alive
        return 0

    def _on_upgrade(self, bytes data, Py_ssize_t offset):
        # httptools stops after an upgrade request (any Upgrade header with
        # a Connection: upgrade token, or CONNECT); the offset is into this
        # call's buffer and this parser is done for good.
        cdef Exchange ex = self.last_ex
        cdef bytes extra = data[offset:]
        if ex is not None and ex.upgrade:
            self.raw = True
            self.upgrade_ex = ex
            if extra:
                ex.early = [extra]
                ex.early_size = len(extra)
            self._after_feed()
        elif ex is None or ex.method == b"CONNECT" or ex.error_status:
            # What follows a CONNECT is not HTTP, nor is a body after an
            # upgrade request's head read as requests: answer and close.
            self.broken = True
            self._after_feed()
        else:
            # Not a WebSocket upgrade (h2c...): it was forwarded as a plain
            # request without Upgrade, so HTTP/1.1 goes on with a new parser.
            self._new_parser()
            if extra:
                self.data_received(extra)
            else:
                self._after_feed()

    def _tunnel_open(self):
        # The upstream answered 101: bytes held since the request flow now.
        cdef Exchange ex = self.upgrade_ex
        self.tunnel = True
        if ex.early:
            ex.upstream.write(b"".join(ex.early))
            ex.early = None
            ex.early_size = 0
        self._resume(PAUSE_BUFFER)

    cdef int _parse_failed(self, str detail) except -1:
        # A request the parser rejects. If it is the exchange being
        # forwarded (a bad chunk in its body), that exchange ends now:
        # 400 if no response byte went out, else the connection closes.
        cdef Exchange ex = self.parsing
        cdef Upstream upstream
        if ex is None or ex is not self.current:
            queue = self.queue
            if ex is not None and queue and queue[len(queue) - 1] is ex:
                # Not begun yet: it is never forwarded at all. (No negative
                # index: the module is compiled with wraparound off.)
                queue.pop()
            self._fatal(400, detail)
            return 0
        self.broken = True
        self.parsing = None
        upstream = ex.upstream
        if upstream is not None:
            upstream._detach()
            upstream.transport.abort()
            ex.upstream = None
            if upstream.head_forwarded:
                self._release(ex)
                self.current = None
                self.transport.abort()
                return 0
        self._respond_error(ex, 400, detail, True)
        return 0

    # -- parser callbacks (httptools looks them up by name) ---------------

    def on_message_begin(self):
        self._message_begin()

    cdef int _message_begin(self) except -1:
        cdef Exchange ex
        if self.broken:
            return 0
        ex = Exchange()
        self.parsing = ex
        self.in_head = True
        self.head_began = True
        self.head_bytes = 0
        self.line_data = self.data if self.at_boundary else None
        self.at_boundary = False
        self.head_size = 0
        self.target = None
        # The outgoing head, built as headers arrive; the request line and
        # Host slots (0, 2, 4) are filled in at the end of the head.
        self.parts = [None, b" ", None, b" HTTP/1.1\r\nHost: ", None,
                      b"\r\n"]
        self.host = None
        self.hosts = 0
        self.te = None
        self.length = -1
        self.connection = None
        self.upgrade = None
        self.forwarded_for = None
        if self.current is not None or self.queue:
            self.head_started = now()
        elif self.idle_since > self.head_started:
            self.head_started = now()
        return 0

    def on_url(self, bytes url):
        self.target = url if self.target is None else self.target + url
        self.head_size += len(url)

    def on_header(self, bytes name, bytes value):
        self._header(name, value)

    cdef int _header(self, bytes name, bytes value) except -1:
        cdef int kind
        cdef list parts
        if not self.in_head:
            # Trailers after a chunked body are not forwarded.
            return 0
        self.head_size += len(name) + len(value) + 4
        kind = header_kind(PyBytes_AS_STRING(name), len(name))
        if kind == HEADER_OTHER or kind == HEADER_CONTENT_LENGTH or \
                kind == HEADER_TRANSFER_ENCODING:
            parts = self.parts
            parts.append(name)
            parts.append(b": ")
            parts.append(value)
            parts.append(b"\r\n")
            if kind == HEADER_CONTENT_LENGTH:
                self.length = int(value)
            elif kind == HEADER_TRANSFER_ENCODING:
                self.te = value if self.te is None else self.te + b"," + value
        elif kind == HEADER_HOST:
            self.hosts += 1
            self.host = value
        elif kind == HEADER_CONNECTION:
            self.connection = (value if self.connection is None
                               else self.connection + b"," + value)
        elif kind == HEADER_UPGRADE:
            self.upgrade = value
        elif kind == HEADER_X_FORWARDED_FOR:
            if self.forwarded_for is None:
                self.forwarded_for = []
            self.forwarded_for.append(value)
        # Anything else is hop-by-hop (RFC 9110 section 7.6.1) or a
        # forwarding header this gateway sets itself: dropped.
        return 0

    def on_headers_complete(self):
        self._finish_head(False)

    def on_body(self, bytes body):
        self._body(body)

    cdef int _body(self, bytes body) except -1:
        cdef Exchange ex = self.parsing
        cdef Py_ssize_t size = len(body)
        if ex is None or ex.error_status:
            return 0
        ex.body_size += size
        if ex.body_size > self.settings.max_body:
            if ex is self.current and ex.upstream is not None and \
                    ex.upstream.head_forwarded:
                self.transport.abort()
            else:
                ex.error_status = 413
                ex.error_detail = ("request body larger than %d bytes"
                                   % self.settings.max_body)
                if ex is self.current:
                    if ex.upstream is not None:
                        ex.upstream._detach()
                        ex.upstream.transport.abort()
                        ex.upstream = None
                    self._respond_error(ex, 413, ex.error_detail, True)
            return 0
        if ex.chunked:
            ex.pending.append(b"%x\r\n" % size)
            ex.pending.append(body)
            ex.pending.append(b"\r\n")
        else:
            ex.pending.append(body)
        ex.pending_size += size
        return 0

    def on_message_complete(self):
        self._message_complete()

    cdef int _message_complete(self) except -1:
        cdef Exchange ex = self.parsing
        if ex is None:
            return 0
        self.parsing = None
        if ex.chunked and not ex.error_status:
            # Trailers are not forwarded: the chunked body ends here.
            ex.pending.append(b"0\r\n\r\n")
        ex.complete = True
        if not ex.keep_alive:
            # Nothing after this request is read (RFC 9112 section 9.6).
            self.broken = True
        return 0

    cdef int _finish_head(self, bint simple) except -1:
        # simple: the head was read by simple_request, so httptools has
        # not seen it and cannot be asked about it.
        cdef Exchange ex = self.parsing
        cdef Settings settings = self.settings
        cdef Route route
        cdef bytes host = self.host
        cdef list parts = self.parts
        cdef PyObject *found
        self.in_head = False
        if ex is None or self.broken:
            return 0
        if self.head_size > settings.max_header:
            self._fatal(431, "request head larger than %d bytes"
                        % settings.max_header)
            return 0
        # A simple head brought its method and version along.
        if not simple and (self.line_data is None or
                           self.line_data is not self.data or
                           not self._read_request_line(ex)):
            ex.method = self.get_method()
            ex.http10 = self.get_http_version() != "1.1"
        self.line_data = None
        method = ex.method
        ex.is_head = method == b"HEAD"
        # Our own reading of the Connection header decides on both paths,
        # so a head means the same whole or split; where llhttp reads no
        # keep-alive, its parser would refuse the next request anyway.
        ex.keep_alive = keep_alive_of(ex.http10, self.connection)
        if ex.keep_alive and not simple:
            ex.keep_alive = self.should_keep_alive()
        ex.target = self.target if self.target is not None else b""

        if self.hosts > 1:
            self._fatal(400, "more than one Host header")
            return 0
        if self.hosts == 0 and not ex.http10:
            self._fatal(400, "missing Host header")
            return 0
        if self.te is not None:
            if self.te.strip().lower() != b"chunked":
                self._fatal(400, "unsupported Transfer-Encoding %r"
                            % self.te.decode("latin-1"))
                return 0
            ex.chunked = True
        if method == b"CONNECT":
            ex.error_status = 405
            ex.error_detail = "CONNECT is not supported"
        # Only a WebSocket upgrade becomes a tunnel; other Upgrade headers
        # (h2c...) are hop-by-hop and dropped (RFC 9110 section 7.8).
        ex.upgrade = (self.upgrade is not None and
                      b"websocket" in self.upgrade.lower() and
                      method != b"CONNECT" and self.parser.should_upgrade())
        if (self.upgrade is not None and not ex.upgrade and
                (self.length > 0 or ex.chunked) and
                self.parser.should_upgrade()):
            # httptools stops at an upgrade request's head, so the body of
            # an h2c-style upgrade would be read as further requests.
            ex.error_status = 400
            ex.error_detail = "an Upgrade request other than WebSocket " \
                "cannot carry a body"
        self.last_ex = ex

        route = self.fixed_route
        if route is None:
            if host is not None and host == self.last_host:
                # Keep-alive clients repeat their Host: skip the lookup.
                route = self.last_route
            else:
                found = PyDict_GetItem(
                    settings.hosts, strip_port(host) if host else b"")
                route = <Route>found if found != NULL else None
                if route is not None:
                    self.last_host = host
                    self.last_route = route
            if route is None:
                ex.error_status = 404
                ex.error_detail = "no service for host %r" % (
                    host.decode("latin-1") if host else "")
                self.queue.append(ex)
                return 0
        ex.route = route
        if self.length > 0 or ex.chunked:
            # Only a request with a body needs this to decide a replay.
            ex.idempotent = method in IDEMPOTENT
        if self.length > settings.max_body:
            ex.error_status = 413
            ex.error_detail = "request body larger than %d bytes" % (
                settings.max_body,)
            self.queue.append(ex)
            return 0

        if self.connection is not None and \
                connection_names_others(self.connection):
            parts = self._without_named(parts)
        parts[0] = method
        parts[2] = ex.target
        parts[4] = host if route.preserve_host and host else route.host_header
        if ex.upgrade:
            parts += [b"Upgrade: ", self.upgrade,
                      b"\r\nConnection: upgrade\r\n"]
        if self.forwarded_for is None:
            parts.append(self.forwarded_line)
        else:
            parts += [b"X-Forwarded-For: ", b", ".join(self.forwarded_for),
                      b", ", self.peer, b"\r\n"]
        if host is not None:
            parts += [b"X-Forwarded-Host: ", host,
                      b"\r\nX-Forwarded-Proto: http\r\n\r\n"]
        else:
            parts.append(b"X-Forwarded-Proto: http\r\n\r\n")
        ex.head = join_bytes(parts)
        self.queue.append(ex)
        return 0

    cdef bint _read_request_line(self, Exchange ex) except -1:
        # The whole head arrived in this read, starting at offset 0, and
        # httptools has validated it: method and version are read off the
        # request line instead of asking the parser (two Python calls).
        cdef bytes data = self.line_data
        cdef const char *p = PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = len(data), eol
        cdef const char *hit = <const char *>memchr(p, 13, n)
        if hit == NULL:
            return False
        eol = hit - p
        if eol < 14 or memcmp(p + eol - 8, b"HTTP/1.", 7) != 0:
            return False
        if p[eol - 1] == 49:
            ex.http10 = False
        elif p[eol - 1] == 48:
            ex.http10 = True
        else:
            return False
        hit = <const char *>memchr(p, 32, eol)
        if hit == NULL:
            return False
        ex.method = request_method(data, 0, hit - p)
        return True

    def _without_named(self, list parts):
        # Slow path: drop the headers the Connection header names.
        cdef set named = connection_tokens(self.connection)
        cdef list kept = parts[:6]
        cdef Py_ssize_t i
        for i in range(6, len(parts), 4):
            if parts[i].lower() not in named:
                kept += parts[i:i + 4]
        return kept

    # -- exchanges ---------------------------------------------------------

    cdef int _next(self) except -1:
        cdef Exchange ex
        # While the client does not read, answers wait in the queue (and
        # reading pauses) instead of piling up in the write buffer.
        if self.queue and not self.write_paused:
            ex = self.queue.pop(0)
            self._begin(ex)
        return 0

    cdef int _begin(self, Exchange ex) except -1:
        cdef ServiceState service
        cdef double t
        self.current = ex
        if ex.error_status:
            self._respond_error(ex, ex.error_status, ex.error_detail, False)
            return 0
        service = ex.route.service
        t = now()
        service.active += 1
        service.requests += 1
        service.last_activity = t
        service.last_request = t
        ex.counted = True
        ex.started = t
        ex.generation = service.generation
        if service.online:
            self._dispatch(ex, False)
        else:
            self.settings.loop.create_task(self._cold_start(ex))
        return 0

    async def _cold_start(self, Exchange ex):
        service = ex.route.service
        try:
            await service.lifecycle.ensure_ready()
        except StartError as exc:
            if ex is self.current and not self.closed:
                self._respond_error(ex, 503, str(exc), False)
            return
        except Exception as exc:
            logger.exception("start of service %r failed", service.name)
            if ex is self.current and not self.closed:
                self._respond_error(
                    ex, 503, "service '%s' failed to start: %s"
                    % (service.name, exc), False)
            return
        if ex is self.current and not self.closed:
            ex.generation = service.generation
            self._dispatch(ex, True)

    cdef int _dispatch(self, Exchange ex, bint fresh) except -1:
        cdef Upstream upstream = None
        if not fresh:
            upstream = ex.route.pool.take()
        if upstream is not None:
            self._attach(ex, upstream)
        else:
            self.settings.loop.create_task(self._connect(ex))
        return 0

    async def _connect(self, Exchange ex):
        cdef Pool pool = ex.route.pool
        cdef Upstream upstream
        try:
            _, upstream = await self.settings.loop.create_connection(
                lambda: Upstream(pool), pool.host, pool.port)
        except OSError as exc:
            self._connect_failed(ex, exc)
            return
        if ex is self.current and not self.closed:
            self._attach(ex, upstream)
        else:
            # The client left while we connected: keep the connection.
            pool.put(upstream)

    def _connect_failed(self, Exchange ex, exc):
        cdef ServiceState service = ex.route.service
        if ex is not self.current or self.closed:
            return
        lifecycle = service.lifecycle
        if (isinstance(exc, ConnectionRefusedError) and not ex.recovered and
                lifecycle is not None and lifecycle.managed):
            # The service was online but refuses connections: it crashed.
            # Nothing was sent yet, so start it again and retry (once).
            ex.recovered = True
            lifecycle.on_refused(ex.generation)
            self.settings.loop.create_task(self._cold_start(ex))
            return
        service.upstream_errors += 1
        self._upstream_failed(
            ex, 502, "cannot connect to upstream %s:%d of service '%s': %s"
            % (ex.route.pool.host, ex.route.pool.port, service.name,
               exc.strerror or exc))

    async def _closed_unanswered(self, Exchange ex):
        cdef ServiceState service = ex.route.service
        crashed = await service.lifecycle.crashed(ex.generation, 0.25)
        if ex is not self.current or self.closed:
            return
        ex.upstream = None
        if crashed:
            ex.recovered = True
            ex.head_sent = False
            ex.sent_all = False
            await self._cold_start(ex)
            return
        service.upstream_errors += 1
        self._respond_error(
            ex, 502, "upstream of service '%s' closed the connection before "
            "responding" % service.name, False)

    cdef int _attach(self, Exchange ex, Upstream upstream) except -1:
        ex.upstream = upstream
        upstream._begin(self, ex)
        if self.write_paused:
            upstream._pause_reading()
        self._flush(ex)
        return 0

    cdef int _flush(self, Exchange ex) except -1:
        # Sends what the exchange has buffered to its upstream connection.
        cdef Upstream upstream = ex.upstream
        cdef list pending = ex.pending
        cdef bytes body = None
        if upstream is None:
            return 0
        if pending:
            body = pending[0] if len(pending) == 1 else join_bytes(pending)
            ex.pending = []
            ex.route.service.bytes_in += ex.pending_size
            ex.pending_size = 0
            ex.body_sent = True
            if ex.idempotent:
                # Kept so the request can be replayed on a fresh connection.
                if ex.retained_size + len(body) <= RETAIN_LIMIT:
                    if ex.retained is None:
                        ex.retained = []
                    ex.retained.append(body)
                    ex.retained_size += len(body)
                else:
                    ex.idempotent = False
                    ex.retained = None
        if not ex.head_sent:
            ex.head_sent = True
            upstream.write(ex.head if body is None else ex.head + body)
        elif body is not None:
            upstream.write(body)
        if ex.complete and not ex.sent_all:
            ex.sent_all = True
            ex.sent_at = now()
            upstream.last_activity = ex.sent_at
        if self.paused & PAUSE_BUFFER and not self.queue:
            self._resume(PAUSE_BUFFER)
        return 0

    def _retry(self, Exchange ex):
        # A reused connection closed before any response byte: replay the
        # request once on a fresh connection (RFC 9110 section 9.2.2).
        ex.tries += 1
        ex.upstream = None
        ex.head_sent = False
        ex.sent_all = False
        if ex.retained:
            ex.pending = ex.retained + ex.pending
            ex.pending_size += ex.retained_size
            ex.route.service.bytes_in -= ex.retained_size
            ex.retained = None
            ex.retained_size = 0
        self._dispatch(ex, True)

    cdef int _pause(self, int reason) except -1:
        if not self.paused and not self.closing:
            self.transport.pause_reading()
        self.paused |= reason
        return 0

    cdef int _resume(self, int reason) except -1:
        if not self.paused & reason:
            return 0
        self.paused &= ~reason
        if not self.paused and not self.closing and not self.closed:
            self.transport.resume_reading()
        return 0

    cdef int _release(self, Exchange ex) except -1:
        # The exchange no longer keeps its service busy.
        cdef ServiceState service
        if ex.counted:
            ex.counted = False
            service = ex.route.service
            service.active -= 1
            service.last_activity = now()
        return 0

    cdef int _exchange_done(self, Exchange ex, bint close) except -1:
        if ex.route is not None:
            ex.route.service.count_status(ex.status)
        if self.settings.access_log:
            access_logger.info(
                "%s %s %s %d", self.peer.decode(), ex.method.decode("latin-1"),
                ex.target.decode("latin-1"), ex.status,
                extra={"service": ex.route.service.name if ex.route else None,
                       "status": ex.status,
                       "ms": round((now() - ex.started) * 1000, 3)
                       if ex.started else None})
        self._release(ex)
        ex.upstream = None
        self.current = None
        if self.closed:
            return 0
        if not ex.complete or self.raw:
            self._close_gracefully()
        elif (close or not ex.keep_alive or self.settings.draining or
                self.broken and not self.queue):
            self.closing = True
            self.transport.close()
        elif self.client_eof and not self.queue:
            self.closing = True
            self.transport.close()
        else:
            self.idle_since = now()
            if self.queue:
                self._next()
                if self.queue:
                    self._pause(PAUSE_BUFFER)
            elif self.parsing is not None:
                if self.parsing.pending_size <= PENDING_LIMIT:
                    self._resume(PAUSE_BUFFER)
            else:
                self._resume(PAUSE_BUFFER)
        return 0

    cdef int _respond_error(self, Exchange ex, int status, str detail,
                            bint close) except -1:
        # A response made by the gateway itself: a short text naming the
        # cause.
        cdef bytes body = ("%d %s: %s\n" % (
            status, REASONS.get(status, ""), detail)).encode()
        cdef list head = [b"HTTP/1.1 %d %s\r\n" % (
            status, REASONS.get(status, "").encode())]
        close = close or not ex.complete or not ex.keep_alive or self.raw
        head.append(b"Content-Type: text/plain; charset=utf-8\r\n")
        head.append(b"Content-Length: %d\r\n" % len(body))
        if status == 503:
            head.append(b"Retry-After: 5\r\n")
        if close:
            head.append(b"Connection: close\r\n")
        head.append(b"\r\n")
        if not ex.is_head:
            head.append(body)
        ex.status = status
        if status >= 500 and ex.route is not None:
            logger.warning("%d for %s: %s", status,
                           ex.route.service.name, detail,
                           extra={"service": ex.route.service.name,
                                  "status": status})
        self.write(b"".join(head))
        self._exchange_done(ex, close)
        return 0

    cdef int _upstream_failed(self, Exchange ex, int status,
                              str detail) except -1:
        # The upstream failed; answer if no response byte went out yet.
        cdef Upstream upstream = ex.upstream
        if upstream is not None:
            upstream._detach()
            upstream.transport.abort()
            if upstream.head_forwarded:
                ex.upstream = None
                self._release(ex)
                self.current = None
                self.transport.close()
                return 0
        ex.upstream = None
        self._respond_error(ex, status, detail, False)
        return 0

    cdef int _fatal(self, int status, str detail) except -1:
        # The request stream cannot be parsed further: answer once the
        # exchanges before it are done, then close.
        cdef Exchange ex = Exchange()
        self.broken = True
        self.in_head = False
        self.parsing = None
        ex.error_status = status
        ex.error_detail = detail
        ex.method = b"-"
        ex.target = b"-"
        self.queue.append(ex)
        if self.current is None:
            self._next()
        return 0

    cdef int _close_gracefully(self) except -1:
        # Answered before the whole request was read (RFC 9112 section
        # 9.6): stop writing, keep discarding what the client still sends
        # for a moment so it reads the answer instead of a reset.
        if self.closing or self.closed:
            return 0
        self.closing = True
        self.linger_until = now() + LINGER
        if self.paused:
            self.paused = 0
            self.transport.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        else:
            self.transport.close()
        return 0

    cpdef check_timeouts(self, double t):
        cdef Exchange ex = self.current
        cdef Upstream upstream
        cdef Settings settings = self.settings
        if self.closed:
            return
        if self.closing:
            if self.linger_until and t > self.linger_until:
                self.transport.abort()
            return
        if self.in_head:
            if t - self.head_started > settings.header_timeout:
                self._fatal(408, "request head not received within %gs"
                            % settings.header_timeout)
            return
        if ex is None:
            if self.queue:
                return
            if self.parsing is not None:
                return
            if self.idle_since <= self.head_started:
                # A new connection that has not sent a byte yet.
                if t - self.head_started > settings.header_timeout:
                    self.closing = True
                    self.transport.close()
            elif t - self.idle_since > settings.keepalive_timeout:
                self.closing = True
                self.transport.close()
            return
        upstream = ex.upstream
        if (upstream is None or self.tunnel or not ex.sent_all or
                upstream.reading_paused):
            # Paused reading means the client is slow, not the upstream.
            return
        if t - upstream.last_activity > settings.upstream_timeout:
            ex.route.service.upstream_errors += 1
            self._upstream_failed(
                ex, 504, "service '%s' sent nothing for %gs"
                % (ex.route.service.name, settings.upstream_timeout))


# ---------------------------------------------------------------------------
# Upstream side


cdef class Upstream:
    """Protocol for one keep-alive connection to a backend."""

    def __init__(self, Pool pool):
        self.pool = pool

    def connection_made(self, transport):
        self.transport = transport
        self.write = transport.write
        transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        self._new_parser()
        self.last_activity = now()

    def connection_lost(self, exc):
        cdef Downstream downstream = self.downstream
        cdef Exchange ex = self.ex
        self.closed = True
        if downstream is None:
            self.pool.discard(self)
            return
        if self.tunnel:
            self._detach()
            downstream.transport.close()
            return
        if (self.close_delimited and self.head_forwarded and
                not self.broken and exc is None):
            # A read-until-close body ends here (RFC 9112 section 6.3).
            self.keep_alive = False
            self.finished = True
            if self.rechunk:
                downstream.write(b"0\r\n\r\n")
            self._complete()
            return
        if not self.got_bytes and self.uses > 1 and ex.tries == 0 and (
                not ex.body_sent or ex.idempotent):
            self._detach()
            downstream._retry(ex)
            return
        lifecycle = ex.route.service.lifecycle
        if (not self.got_bytes and not ex.body_sent and not ex.recovered and
                lifecycle is not None and lifecycle.managed):
            # The service may have died with this connection open (a crash
            # races new connections). If so it is started again and the
            # request, which sent no body yet, retried once, as for a
            # refused connection; if not, 502.
            self._detach()
            downstream.settings.loop.create_task(
                downstream._closed_unanswered(ex))
            return
        ex.route.service.upstream_errors += 1
        downstream._upstream_failed(
            ex, 502, "upstream of service '%s' closed the connection %s" % (
                ex.route.service.name,
                "mid-response" if self.got_bytes else "before responding"))

    def eof_received(self):
        cdef Downstream downstream = self.downstream
        if self.tunnel and downstream is not None:
            self.eof = True
            if downstream.client_eof:
                downstream.transport.close()
                return False
            downstream.transport.write_eof()
            return True
        return False

    def pause_writing(self):
        if self.downstream is not None:
            self.downstream._pause(PAUSE_UPSTREAM)

    def resume_writing(self):
        if self.downstream is not None:
            self.downstream._resume(PAUSE_UPSTREAM)

    cdef int _new_parser(self) except -1:
        parser = self.parser = HttpResponseParser(self)
        self.get_status_code = parser.get_status_code
        self.should_keep_alive = parser.should_keep_alive
        return 0

    cdef int _pause_reading(self) except -1:
        if not self.reading_paused and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()
        return 0

    cdef int _resume_reading(self) except -1:
        if self.reading_paused and not self.closed:
            self.reading_paused = False
            self.last_activity = now()
            self.transport.resume_reading()
        return 0

    cdef int _begin(self, Downstream downstream, Exchange ex) except -1:
        self.downstream = downstream
        self.ex = ex
        self.in_head = True
        self.scan = 0
        self.carry = None
        self.remaining = 0
        self.uses += 1
        self.got_bytes = False
        self.head_forwarded = False
        self.interim = False
        self.finished = False
        self.rechunk = False
        self.close_delimited = False
        self.close_client = False
        self.last_activity = now()
        return 0

    cdef int _detach(self) except -1:
        if self.downstream is not None:
            self.downstream._resume(PAUSE_UPSTREAM)
        self.downstream = None
        self.ex = None
        return 0

    def data_received(self, bytes data):
        cdef Downstream downstream = self.downstream
        cdef list out
        cdef Framing framing
        cdef Py_ssize_t size, end
        self.last_activity = now()
        if downstream is None:
            # Bytes on an idle pooled connection: the backend is confused.
            self.broken = True
            self.transport.close()
            return
        self.ex.route.service.bytes_out += len(data)
        if self.tunnel:
            downstream.write(data)
            return
        self.got_bytes = True
        if self.remaining:
            # The rest of a body whose length a simple head gave: counted,
            # not parsed.
            size = len(data)
            if size >= self.remaining:
                if size > self.remaining:
                    data = cut(data, 0, self.remaining)
                    self.broken = True
                self.remaining = 0
                self.finished = True
            else:
                self.remaining -= size
            downstream.write(data)
            if self.broken:
                self._stray()
            elif self.finished:
                self._complete()
            return
        if self.in_head and self.carry is None:
            end = simple_response(data, &framing)
            if end and self._simple_head(data, end, &framing):
                return
        out = self.out = []
        if self.in_head:
            # The head is read from the raw bytes (see on_headers_complete);
            # a head split over reads is carried until it is complete.
            if self.carry is not None:
                self.buf = self.carry + data
                self.carry = None
            else:
                self.buf = data
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            if self.tunnel:
                extra = data[exc.args[0]:]
                if extra:
                    out.append(extra)
            else:
                self.broken = True
        except HttpParserError as exc:
            self.broken = True
            logger.warning("malformed response from service %r: %s",
                           self.ex.route.service.name, exc,
                           extra={"service": self.ex.route.service.name})
        if self.in_head:
            self.carry = self.buf[self.scan:]
            self.scan = 0
            if len(self.carry) > MAX_RESPONSE_HEAD:
                self.broken = True
        self.buf = None
        if out:
            downstream.write(out[0] if len(out) == 1 else join_bytes(out))
        if self.tunnel:
            self.ex.status = 101
            downstream._tunnel_open()
            return
        if self.broken and self.finished:
            self._stray()
            return
        if self.broken:
            self.ex.route.service.upstream_errors += 1
            downstream._upstream_failed(
                self.ex, 502, "malformed response from service '%s'"
                % self.ex.route.service.name)
            return
        if self.finished:
            self._complete()

    cdef int _stray(self) except -1:
        # Bytes after a complete response: the client has its whole answer
        # and never sees them; the connection is closed instead of reused.
        logger.warning("service %r sent bytes after a complete response",
                       self.ex.route.service.name,
                       extra={"service": self.ex.route.service.name})
        self._complete()
        return 0

    cdef bint _simple_head(self, bytes data, Py_ssize_t end,
                           Framing *framing) except -1:
        # A response whose head arrived whole in one read and frames its
        # body with a plain Content-Length (see heads.simple_response) is
        # forwarded without httptools: the parser, still at a message
        # boundary, never sees it. False leaves the response to httptools.
        cdef Exchange ex = self.ex
        cdef int status = framing.status
        cdef long long body = len(data) - end
        cdef long long expected = framing.length
        cdef list out
        if status < 200:
            # Interim answers and 101 take the general path.
            return False
        if ex.is_head or status == 204 or status == 304:
            expected = 0
        if body > expected:
            # Bytes beyond the response: httptools reports them.
            return False
        out = self.out = []
        self._response_head(data if body == 0 else cut(data, 0, end), status,
                            framing)
        if body:
            out.append(cut(data, end, len(data)))
        self.keep_alive = framing.keep_alive
        self.remaining = expected - body
        if not self.remaining:
            self.finished = True
        self.downstream.write(out[0] if len(out) == 1 else join_bytes(out))
        if self.finished:
            self._complete()
        return True

    # -- parser callbacks ----------------------------------------------------
    # No on_header: httptools does no per-header work at all; the head is
    # taken from the raw bytes it has just validated.

    def on_message_begin(self):
        if self.finished:
            # Another response starts after the complete one, unasked for:
            # it is never passed on, and the connection is not reused.
            self.broken = True

    def on_headers_complete(self):
        cdef bytes buf = self.buf
        cdef Py_ssize_t end
        cdef bytes head
        if self.finished:
            return
        end = head_end(buf, self.scan)
        head = cut(buf, self.scan, end)
        self.scan = end
        self._response_head(head, self.get_status_code(), NULL)

    def on_body(self, bytes body):
        if self.finished or self.interim:
            # Bytes after a HEAD response's head: the backend is wrong.
            self.broken = True
            return
        if self.rechunk:
            self.out += [b"%x\r\n" % len(body), body, b"\r\n"]
        else:
            self.out.append(body)

    def on_message_complete(self):
        if self.interim:
            self.interim = False
            return
        if self.finished:
            return
        self.keep_alive = self.should_keep_alive()
        if self.rechunk:
            self.out.append(b"0\r\n\r\n")
        self.finished = True

    cdef int _response_head(self, bytes head, int status,
                            Framing *framing) except -1:
        # framing: what simple_response found in the head (the caller then
        # ends the message itself), or NULL when httptools read it.
        cdef Exchange ex = self.ex
        cdef Downstream downstream = self.downstream
        cdef bint no_body, close
        cdef ResponseInfo info
        cdef object drop = None
        cdef bytes tail
        if framing == NULL:
            scan_response(head, &info)
        else:
            info.has_length = True
            info.chunked = False
            info.names_others = framing.names_others
        if info.names_others:
            drop = self._named_by_connection(head)

        if status < 200:
            if status == 101:
                if not ex.upgrade:
                    self.broken = True
                    return 0
                self.tunnel = True
                self.in_head = False
                self.head_forwarded = True
                self.out.append(rewrite_response(head, True, b"\r\n", drop))
                return 0
            # 100 Continue, 103 Early Hints: forwarded to HTTP/1.1 clients
            # only (RFC 9110 section 15.2), then the real response follows.
            self.interim = True
            if not ex.http10:
                self.out.append(rewrite_response(head, False, b"\r\n", drop))
            return 0

        self.in_head = False
        no_body = ex.is_head or status == 204 or status == 304
        close = (not ex.keep_alive or downstream.settings.draining or
                 downstream.client_eof and not downstream.queue)
        if not no_body and not info.has_length:
            if ex.http10:
                # No chunked coding for HTTP/1.0: the end of the body is
                # the end of the connection.
                close = True
            else:
                self.rechunk = True
            self.close_delimited = not info.chunked
        if ex.upgrade or not ex.complete:
            close = True
        self.close_client = close
        ex.status = status
        self.head_forwarded = True
        tail = TAILS[self.rechunk * 3 + (1 if close else 2 if ex.http10 else 0)]
        if framing != NULL and drop is None and framing.runs >= 0:
            self.out.append(emit_response(head, framing, tail))
        else:
            self.out.append(rewrite_response(head, False, tail, drop))
        if no_body:
            # The message ends with its head. httptools cannot be told the
            # response answers a HEAD request, so after one the next
            # response is parsed afresh. (For a simple head, _simple_head
            # takes keep-alive from its own reading.)
            self.finished = True
            if framing == NULL:
                self.keep_alive = self.should_keep_alive()
                if ex.is_head:
                    self.new_parser = True
        return 0

    def _named_by_connection(self, bytes head):
        # Slow path: header names listed in the Connection header.
        cdef set names = set()
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"connection":
                names |= connection_tokens(value)
        return names

    cdef int _complete(self) except -1:
        # The response is complete: release the connection and let the
        # client connection move on.
        cdef Downstream downstream = self.downstream
        cdef Exchange ex = self.ex
        cdef bint reuse = (self.keep_alive and ex.sent_all and
                           not self.broken and not self.closed and
                           not self.close_delimited and ex.route.service.online)
        self._detach()
        if self.new_parser:
            self.new_parser = False
            self._new_parser()
        if reuse:
            self._resume_reading()
            self.pool.put(self)
        elif not self.closed:
            self.transport.close()
        downstream._exchange_done(ex, self.close_client)
        return 0
