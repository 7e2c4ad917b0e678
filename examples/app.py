"""A small example app: a page, a JSON endpoint and a Server-Sent Events stream.

    python3 app.py PORT

Only the standard library, so it runs wherever python3 does.
"""

import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BOOTED = time.time()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def _reply(self, status, body, content_type):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        if self.path == "/health":
            self._reply(200, b"ok\n", "text/plain")
        elif self.path == "/api":
            info = {"pid": os.getpid(), "up_s": round(time.time() - BOOTED, 3)}
            self._reply(200, json.dumps(info).encode() + b"\n", "application/json")
        elif self.path == "/events":
            # Server-Sent Events: one tick a second, five in all.
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for tick in range(5):
                event = f"event: tick\ndata: {tick}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()
                time.sleep(1)
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/":
            page = (
                "<!doctype html><title>example app</title>"
                f"<h1>example app, pid {os.getpid()}</h1>"
                "<p>Try <code>/api</code> and <code>/events</code>.</p>\n"
            )
            self._reply(200, page.encode(), "text/html; charset=utf-8")
        else:
            self._reply(404, b"not found\n", "text/plain")

    do_HEAD = do_GET


if __name__ == "__main__":
    port = int(sys.argv[1])
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print(f"example app listening on 127.0.0.1:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
