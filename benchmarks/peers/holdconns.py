"""Opens many keep-alive connections to a proxy, makes one request on each,
and keeps them all open and idle until stdin closes.

    python benchmarks/peers/holdconns.py PORT HOST_HEADER COUNT [WINDOW]

At most WINDOW requests are in flight at once, so the proxy's upstream pool
stays small and the memory measured is that of idle client connections.
Prints one line "ready OPEN FAILED" when done, then waits for stdin to close.
"""

from __future__ import annotations

import errno
import resource
import selectors
import socket
import sys
import time

TIME_LIMIT = 180.0


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Conn:
    def __init__(self, sock: socket.socket, request: bytes) -> None:
        self.sock = sock
        self.out = request
        self.buffer = b""
        self.need = -1

    def got(self, data: bytes) -> bool:
        """Add response bytes; True once the whole response arrived."""
        self.buffer += data
        if self.need < 0:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return False
            length = 0
            for line in self.buffer[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            self.need = end + 4 + length
        return len(self.buffer) >= self.need


def main() -> int:
    port, host, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    window = int(sys.argv[4]) if len(sys.argv) > 4 else 64
    raise_nofile()
    request = b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode()
    selector = selectors.DefaultSelector()
    held: list[socket.socket] = []
    started = failed = active = 0
    deadline = time.monotonic() + TIME_LIMIT
    while (started < count or active) and time.monotonic() < deadline:
        while started < count and active < window:
            sock = socket.socket()
            sock.setblocking(False)
            code = sock.connect_ex(("127.0.0.1", port))
            started += 1
            if code not in (0, errno.EINPROGRESS):
                sock.close()
                failed += 1
                continue
            selector.register(sock, selectors.EVENT_WRITE, Conn(sock, request))
            active += 1
        for key, events in selector.select(timeout=1.0):
            conn: Conn = key.data
            try:
                if events & selectors.EVENT_WRITE:
                    sent = conn.sock.send(conn.out)
                    conn.out = conn.out[sent:]
                    if not conn.out:
                        selector.modify(conn.sock, selectors.EVENT_READ, conn)
                    continue
                data = conn.sock.recv(65536)
            except OSError:
                data = b""
            if data and not conn.got(data):
                continue
            selector.unregister(conn.sock)
            active -= 1
            if data and conn.buffer.startswith(b"HTTP/1.1 200"):
                held.append(conn.sock)
            else:
                conn.sock.close()
                failed += 1
    print(f"ready {len(held)} {failed + count - started + active}", flush=True)
    sys.stdin.read()
    for sock in held:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
