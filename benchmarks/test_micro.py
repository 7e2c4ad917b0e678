"""Micro-benchmarks of the hot path (dynapm._fast.proxy), without a network.

A client connection (Downstream) and a backend connection (Upstream) are
driven through their protocol methods with fake transports that only count
the bytes written, so each benchmark measures the per-request Python and
Cython work: request head parse and rewrite, response head handling, and a
whole exchange.

Not part of the normal test run (testpaths = tests). Run, save, compare:

    pytest benchmarks/test_micro.py
    pytest benchmarks/test_micro.py --benchmark-storage=benchmarks/baseline \
        --benchmark-save=baseline
    pytest benchmarks/test_micro.py --benchmark-storage=benchmarks/baseline \
        --benchmark-compare=0001 --benchmark-compare-fail=mean:25%
"""

from __future__ import annotations

import pytest

pytest.importorskip("pytest_benchmark")
proxy = pytest.importorskip("dynapm._fast.proxy")

SMALL_GET = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
BROWSER_GET = (
    b"GET /static/app.js?v=1724 HTTP/1.1\r\n"
    b"Host: bench\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
    b"Accept-Language: en-US,en;q=0.5\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\n"
    b"Connection: keep-alive\r\n"
    b"Referer: http://bench/index.html\r\n"
    b"Cookie: session=0123456789abcdef0123456789abcdef; theme=dark\r\n"
    b"Cache-Control: max-age=0\r\n"
    b'If-None-Match: "5f3c-1a2b3c"\r\n'
    b"X-Forwarded-For: 10.0.0.7\r\n"
    b"\r\n"
)
SMALL_POST = (
    b"POST /api/items HTTP/1.1\r\nHost: bench\r\n"
    b"Content-Type: application/json\r\nContent-Length: 27\r\n\r\n"
    b'{"name":"item","count":123}'
)
SMALL_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Fri, 04 Dec 2026 16:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 19\r\n"
    b"Connection: keep-alive\r\n\r\nhello from backend\n"
)
CHUNKED_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
    b"Transfer-Encoding: chunked\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n"
    b"13\r\nhello from backend\n\r\n0\r\n\r\n"
)


class FakeTransport:
    """Accepts what a uvloop transport is asked to do; counts written bytes."""

    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        self.written = 0
        self.writes = 0
        self.closed = False

    def write(self, data) -> None:
        self.written += len(data)
        self.writes += 1

    def writelines(self, items) -> None:
        for item in items:
            self.write(item)

    def get_extra_info(self, name: str, default=None):
        if name == "peername":
            return self.peer
        if name == "sockname":
            return ("127.0.0.1", 3000)
        return default

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_reading(self) -> bool:
        return True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


class FakeLoop:
    """Just enough of an event loop for the hot path's connect step.

    create_connection completes at once with a fake transport, so a task
    made of it finishes in its first step, which create_task runs
    synchronously.
    """

    def __init__(self) -> None:
        self.upstreams: list = []

    def create_task(self, coro):
        try:
            coro.send(None)
        except StopIteration:
            return None
        coro.close()
        raise RuntimeError("the fake loop cannot suspend a coroutine")

    async def create_connection(self, factory, host=None, port=None, **kwargs):
        protocol = factory()
        transport = FakeTransport((host, port))
        protocol.connection_made(transport)
        self.upstreams.append(protocol)
        return transport, protocol

    def call_soon(self, callback, *args, **kwargs):
        callback(*args)

    def time(self) -> float:
        return proxy.monotonic()


class Bench:
    """One client connection to an online proxy_only service."""

    def __init__(self) -> None:
        self.loop = FakeLoop()
        state = proxy.ServiceState("bench")
        state.online = True
        pool = proxy.Pool("127.0.0.1", 8080)
        state.pools.append(pool)
        route = proxy.Route(state, pool, b"127.0.0.1:8080", False)
        self.settings = proxy.Settings(
            self.loop,
            {b"bench": route},
            max_body=100 * 1024 * 1024,
            max_header=64 * 1024,
            header_timeout=10.0,
            keepalive_timeout=75.0,
            upstream_timeout=60.0,
            access_log=False,
        )
        self.client = FakeTransport(("127.0.0.1", 40000))
        self.downstream = proxy.Downstream(self.settings)
        self.downstream.connection_made(self.client)
        # The first exchange opens the pooled upstream connection.
        self.exchange(SMALL_GET, SMALL_RESPONSE)
        assert len(self.loop.upstreams) == 1, "the upstream connection was not made"
        self.upstream = self.loop.upstreams[0]

    def request(self, data: bytes) -> None:
        self.downstream.data_received(data)

    def response(self, data: bytes) -> None:
        self.loop.upstreams[-1].data_received(data)

    def exchange(self, request: bytes, response: bytes) -> None:
        self.downstream.data_received(request)
        self.loop.upstreams[-1].data_received(response)


def check(bench: Bench, rounds_written: int) -> None:
    """The exchanges reached the client and reused one upstream connection."""
    assert len(bench.loop.upstreams) == 1
    assert bench.client.written >= rounds_written
    assert not bench.client.closed


@pytest.mark.parametrize(
    "request_bytes",
    [SMALL_GET, BROWSER_GET, SMALL_POST],
    ids=["small-get", "browser-get", "small-post"],
)
def test_request_head(benchmark, request_bytes):
    """Request head: parse, validate, route, rewrite, write upstream."""
    bench = Bench()
    open_exchange = [False]

    def setup():
        if open_exchange[0]:
            bench.response(SMALL_RESPONSE)
        open_exchange[0] = True

    benchmark.pedantic(
        bench.request,
        args=(request_bytes,),
        setup=setup,
        rounds=4000,
        iterations=1,
        warmup_rounds=200,
    )
    bench.response(SMALL_RESPONSE)
    check(bench, len(SMALL_RESPONSE))


@pytest.mark.parametrize(
    "response_bytes",
    [SMALL_RESPONSE, CHUNKED_RESPONSE],
    ids=["content-length", "chunked"],
)
def test_response_head(benchmark, response_bytes):
    """Response: parse, drop hop-by-hop headers, write to the client, reuse."""
    bench = Bench()

    def setup():
        bench.request(SMALL_GET)

    benchmark.pedantic(
        bench.response,
        args=(response_bytes,),
        setup=setup,
        rounds=4000,
        iterations=1,
        warmup_rounds=200,
    )
    check(bench, len(response_bytes))


@pytest.mark.parametrize(
    ("request_bytes", "response_bytes"),
    [(SMALL_GET, SMALL_RESPONSE), (BROWSER_GET, CHUNKED_RESPONSE)],
    ids=["small", "browser-chunked"],
)
def test_exchange(benchmark, request_bytes, response_bytes):
    """A whole keep-alive exchange on pooled connections."""
    bench = Bench()
    benchmark(bench.exchange, request_bytes, response_bytes)
    check(bench, len(response_bytes))


def test_pipelined_pair(benchmark):
    """Two pipelined requests in one read, answered in order."""
    bench = Bench()
    pair = SMALL_GET + SMALL_GET

    def run():
        bench.request(pair)
        bench.response(SMALL_RESPONSE)
        bench.response(SMALL_RESPONSE)

    benchmark(run)
    check(bench, 2 * len(SMALL_RESPONSE))
