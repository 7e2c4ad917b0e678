"""A tiny HTTP service for the cold-start benchmark.

Only `socket` and `selectors`, so that started as `python3 -I -S tinyapp.py
PORT` it is ready in a few tens of milliseconds and its own boot time varies
little: the gateway's cold-start overhead is measured as a difference from
this boot time, and a slow, noisy boot would hide it. Every request gets a
short 200 answer on a kept-alive connection; SIGTERM ends it.

    python3 -I -S tinyapp.py PORT [LAUNCHED]

LAUNCHED is the wall-clock time (seconds since the epoch, as bash's
$EPOCHREALTIME gives it) at which the launching shell ran the command. The
answers then carry it as `X-Launched-Us` and the moment this server was
listening as `X-Ready-Us` (microseconds since the epoch): the difference is
the service's own boot time as it measured it.
"""

import selectors
import signal
import socket
import sys
import time

BODY = b"ok\n"


def serve(port, launched):
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(128)
    ready = time.time()
    boot = b""
    if launched is not None:
        boot = b"X-Launched-Us: %d\r\nX-Ready-Us: %d\r\n" % (
            round(launched * 1e6),
            round(ready * 1e6),
        )
    response = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n%sContent-Length: %d"
        b"\r\n\r\n%s" % (boot, len(BODY), BODY)
    )
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, None)
    buffers = {}
    while True:
        for key, _ in selector.select():
            if key.data is None:
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(False)
                buffers[conn] = b""
                selector.register(conn, selectors.EVENT_READ, conn)
                continue
            conn = key.data
            try:
                data = conn.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                selector.unregister(conn)
                del buffers[conn]
                conn.close()
                continue
            buffer = buffers[conn] + data
            while b"\r\n\r\n" in buffer:
                _, buffer = buffer.split(b"\r\n\r\n", 1)
                conn.sendall(response)
            buffers[conn] = buffer


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        launched = float(sys.argv[2]) if len(sys.argv) > 2 else None
        serve(int(sys.argv[1]), launched)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
