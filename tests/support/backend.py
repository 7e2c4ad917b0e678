"""A real HTTP/1.1 backend for the tests, built on the standard library.

    python backend.py PORT [--boot-delay S] [--idle-close S] [--name NAME]

Endpoints (any method):
  /echo               JSON: method, target, version, headers (ordered pairs),
                      body length and sha256 (Content-Length or chunked body)
  /sse?n=N&gap=S      text/event-stream, N events S seconds apart (chunked)
  /download?size=N    N bytes, Content-Length, streamed in 64 KiB pieces
  /chunked?size=N     N bytes, chunked
  /close?size=N       N bytes, no length: ends when the connection closes
  /status/N           answers status N
  /cookies            three Set-Cookie headers and a mixed-case header
  /slow?delay=S       answers after S seconds
  /early              answers 200 without reading the request body
  /hints              103 Early Hints, then 200
  /crash              the process exits at once (status 3)
  /pid                the process id
  /ready?flag=PATH    200 once the file PATH exists, 503 before
  /hold?delay=S&mark=PATH
                      writes its pid to the file PATH on arrival, answers
                      after S seconds
  /peer               JSON: the client address and port this request came from
  /hop                a response carrying hop-by-hop headers and one end-to-end
                      header (X-Kept) that a proxy must keep
  /cut?size=N&framing=length|chunked|close&reset=0|1
                      a response cut short: N body bytes of a body framed by a
                      Content-Length of 2N, by chunks with no last chunk, or by
                      the connection close; then the connection closes (with a
                      TCP reset when reset=1)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import struct
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PIECE = 64 * 1024


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "testbackend"
    idle_close: float | None = None
    name = "backend"

    def setup(self) -> None:
        super().setup()
        if self.idle_close:
            # A socket timeout makes the handler close idle keep-alive
            # connections, like a backend with a short keep-alive timeout.
            self.connection.settimeout(self.idle_close)

    def log_message(self, format, *args) -> None:
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, headers=(), ctype="text/plain"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        for name, value in headers:
            self.send_header(name, value)
        if status not in (204, 304) and status >= 200:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and status not in (204, 304):
            self.wfile.write(body)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def handle_one(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        path = url.path
        size = int(query.get("size", 0))
        if path == "/echo":
            body = self._read_body()
            info = {
                "name": self.name,
                "method": self.command,
                "target": self.path,
                "version": self.request_version,
                "headers": [[k, v] for k, v in self.headers.raw_items()],
                "body_len": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "pid": os.getpid(),
            }
            self._send(200, json.dumps(info).encode(), ctype="application/json")
        elif path == "/sse":
            self._read_body()
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(int(query.get("n", 3))):
                self._chunk(b"data: event %d\n\n" % i)
                time.sleep(float(query.get("gap", 0.2)))
            self.wfile.write(b"0\r\n\r\n")
        elif path in ("/download", "/chunked", "/close"):
            self._read_body()
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            if path == "/download":
                self.send_header("Content-Length", str(size))
            elif path == "/chunked":
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            piece = bytes(range(256)) * (PIECE // 256)
            left = 0 if self.command == "HEAD" else size
            while left > 0:
                data = piece[: min(left, PIECE)]
                if path == "/chunked":
                    self._chunk(data)
                else:
                    self.wfile.write(data)
                left -= len(data)
            if path == "/chunked" and self.command != "HEAD":
                self.wfile.write(b"0\r\n\r\n")
        elif path.startswith("/status/"):
            self._read_body()
            status = int(path.rsplit("/", 1)[1])
            self._send(status, b"status %d\n" % status)
        elif path == "/cookies":
            self._read_body()
            self._send(
                200,
                b"cookies\n",
                headers=[
                    ("Set-Cookie", "a=1; Path=/"),
                    ("X-MiXeD-Case", "yes"),
                    ("Set-Cookie", "b=2; Path=/"),
                    ("Set-Cookie", "c=3; Path=/"),
                ],
            )
        elif path == "/slow":
            self._read_body()
            time.sleep(float(query.get("delay", 1)))
            self._send(200, b"slow\n")
        elif path == "/early":
            self.close_connection = True
            self._send(200, b"early\n", headers=[("Connection", "close")])
        elif path == "/hints":
            self._read_body()
            self.wfile.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n")
            self._send(200, b"hinted\n")
        elif path == "/crash":
            os._exit(3)
        elif path == "/pid":
            self._read_body()
            self._send(200, str(os.getpid()).encode())
        elif path == "/ready":
            self._read_body()
            if os.path.exists(query.get("flag", "")):
                self._send(200, b"ready\n")
            else:
                self._send(503, b"not ready\n")
        elif path == "/hold":
            self._read_body()
            if "mark" in query:
                with open(query["mark"], "w") as mark:
                    mark.write(str(os.getpid()))
            time.sleep(float(query.get("delay", 1)))
            self._send(200, b"held\n")
        elif path == "/peer":
            self._read_body()
            host, port = self.client_address[:2]
            peer = {"host": host, "port": port, "pid": os.getpid()}
            self._send(200, json.dumps(peer).encode(), ctype="application/json")
        elif path == "/hop":
            self._read_body()
            self._send(
                200,
                b"hop\n",
                headers=[
                    ("Connection", "X-Secret"),
                    ("X-Secret", "s"),
                    ("Keep-Alive", "timeout=5"),
                    ("Trailer", "X-T"),
                    ("TE", "trailers"),
                    ("Proxy-Authenticate", "Basic"),
                    ("Proxy-Other", "p"),
                    ("X-Kept", "yes"),
                ],
            )
        elif path == "/cut":
            self._read_body()
            framing = query.get("framing", "length")
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            if framing == "length":
                self.send_header("Content-Length", str(2 * size))
            elif framing == "chunked":
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Connection", "close")
            self.end_headers()
            data = (bytes(range(256)) * (size // 256 + 1))[:size]
            if framing == "chunked":
                self._chunk(data)
            else:
                self.wfile.write(data)
            self.wfile.flush()
            self.close_connection = True
            if query.get("reset") == "1":
                # Linger 0: closing sends a reset instead of a FIN.
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.connection.close()
            else:
                self.connection.shutdown(socket.SHUT_WR)
        else:
            self._read_body()
            self._send(404, b"backend: no such path\n")

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = handle_one
    do_PATCH = handle_one


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--boot-delay", type=float, default=0.0)
    parser.add_argument("--idle-close", type=float, default=None)
    parser.add_argument("--name", default="backend")
    args = parser.parse_args()
    time.sleep(args.boot_delay)
    Handler.idle_close = args.idle_close
    Handler.name = args.name
    ThreadingHTTPServer.allow_reuse_address = True
    ThreadingHTTPServer.daemon_threads = True
    # The default accept backlog of 5 makes bursts of connections wait.
    ThreadingHTTPServer.request_queue_size = 128
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    print(f"{args.name} listening on {args.port} pid {os.getpid()}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
